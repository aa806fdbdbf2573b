"""WarmMemory really holds touched memory, and gives it back part by part."""

from migrate.warmmemory import WarmMemory

MIB = 1 << 20


def resident() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_memory_is_resident_while_held_and_freed_part_by_part():
    before = resident()
    warm = WarmMemory(128 * MIB, 2)
    assert warm.parts == 2 and resident() - before > 120 * MIB
    warm.release(1).join(10)
    assert warm.parts == 1 and 56 * MIB < resident() - before < 72 * MIB
    warm.release().join(10)
    assert warm.parts == 0 and resident() - before < 8 * MIB
    assert warm.release() is None  # nothing left: nothing to do


def test_less_than_a_page_holds_nothing():
    assert WarmMemory(100, 1).parts == 0 and WarmMemory(8 * MIB, 0).parts == 0
