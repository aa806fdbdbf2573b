"""Scheduled snapshots, taken by the container's own shim with real CRIU, and bringing back what
a crash lost: `run --checkpoint-every`, `schedule`, retention, `ps`/`inspect`/`snapshots`, a
snapshot whose CRIU is killed half-way, `lost` and `restore` / `restore --all`."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from clihost import COUNTER, IMAGE, assert_consecutive, counter_numbers, proc_gone, proc_identity, wait_until

from runtime.cgroups import SHIM_LEAF, Cgroups

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def scheduled(host, name: str) -> list[dict]:
    return [s for s in host.json("snapshots", name) if s["scheduled"]]


def wait_snapshots(host, name: str, count: int, timeout: float = 60) -> list[dict]:
    return wait_until(lambda: (s := scheduled(host, name)) and len(s) >= count and s, timeout,
                      f"{count} scheduled snapshot(s) of {name}", interval=0.2)


def kill_everything(host, name: str) -> list[int]:
    """A crash of the host, as far as the container goes: its shim, a scheduled snapshot it
    may be taking (the worker and its CRIU, in the shim's cgroup) and every process of it gone
    at once, nothing recorded; `ps` then says lost. Returns the numbers it had written."""
    rec = host.record(name)
    shim = proc_identity(rec["shim_pid"])
    os.kill(rec["shim_pid"], signal.SIGKILL)  # the shim first: nothing may record an exit
    wait_until(lambda: proc_gone(shim), 10, "the shim to die")
    beside = Cgroups({k: str(Path(v).parent / SHIM_LEAF) for k, v in rec["cgroups"].items()})
    for group in (beside, Cgroups(rec["cgroups"])):
        group.kill()
        wait_until(lambda: not group.pids(), 10, f"the processes of {name} to die")
    wait_until(lambda: host.container(name)["state"] == "lost", 30, f"{name} to be lost")
    return counter_numbers(host.logs(name))


def resumed_from_snapshot(host, name: str, before: list[int]) -> tuple[int, int]:
    """The counter runs again from a snapshot, not from 1: the log holds BEFORE, the numbers up
    to the crash, then the snapshot's next number onwards (the one after BEFORE's last when the
    snapshot came after the last count: nothing lost). Returns (its first number, counts lost)."""
    assert_consecutive(before)
    after = wait_until(lambda: len(a := counter_numbers(host.logs(name))[len(before):]) >= 5 and a, 30,
                       f"{name} to count again", interval=0.2)
    assert counter_numbers(host.logs(name))[:len(before)] == before
    assert 1 < after[0] <= before[-1] + 1, (before[-1], after[:20])
    assert after == list(range(after[0], after[0] + len(after))), after[:20]
    return after[0], before[-1] + 1 - after[0]


def test_snapshots_are_taken_on_time_pruned_to_keep_and_shown(bb):
    bb.ok("run", "--name", "c1", "--checkpoint-every", "1s", "--keep", "2", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("c1", 3)
    tagged = bb.ok("checkpoint", "--leave-running", "--tag", "mine", "c1").out.strip()
    seen: set[str] = set()
    # what meets a scheduled snapshot under way waits for it instead of being refused
    for _ in range(4):
        bb.ok("exec", "c1", "true")
        time.sleep(0.2)

    def taken_four():
        seen.update(s["id"] for s in scheduled(bb, "c1"))
        return len(seen) >= 4

    wait_until(taken_four, 60, "four scheduled snapshots", interval=0.2)
    # retention: the newest two scheduled ones, and the tagged one, which is never pruned
    snaps = wait_until(lambda: len(s := scheduled(bb, "c1")) == 2 and s, 10, "retention to keep two")
    assert tagged in [s["id"] for s in bb.json("snapshots", "c1")]
    for s in snaps:
        assert s["size"] > 0 and s["tag"] is None
        assert 0 < s["pause"] < 10, s  # how long the job was frozen for it, as CRIU measured
        assert (bb.state.snapshot_dir(s["id"]) / "snapshot.json").exists()
    assert not [p for p in os.listdir(bb.state.snapshots) if p.startswith(".partial-")
                and not (bb.state.snapshots / p / "owner.json").exists()]
    table = bb.ok("snapshots", "c1").out
    assert "(scheduled)" in table and "PAUSED" in table

    # every second a snapshot is under way for about half of it (`checkpointing`): between two
    row = wait_until(lambda: (r := bb.container("c1"))["state"] == "running" and r, 10, "c1 between two snapshots")
    assert row["schedule"] == {"every": 1.0, "keep": 2}
    assert time.time() - row["last_snapshot"]["created"] < 30
    assert "(every 1s)" in bb.ok("ps").out
    info = json.loads(bb.ok("inspect", "c1").out)
    assert info["schedule"] == {"every": 1.0, "keep": 2} and info["spec"]["schedule"] == {"every": 1.0, "keep": 2}
    assert {s["id"] for s in info["snapshots"]} >= {tagged} and info["last_snapshot"]["age"] >= 0
    # the job never noticed: leave-running snapshots, its counter without a gap
    assert_consecutive(bb.wait_count("c1", len(counter_numbers(bb.logs("c1"))) + 5))

    # off: no more snapshots; on again with another interval
    assert "no scheduled snapshots" in bb.ok("schedule", "c1", "--off").out
    # one due right then may still be taken (the shim looks once a second); then none for 4 s,
    # where a schedule still on would have taken four
    quiet = {"ids": None, "since": 0.0}

    def no_new_snapshot_for_4s():
        ids = {s["id"] for s in scheduled(bb, "c1")}
        if ids != quiet["ids"]:
            quiet.update(ids=ids, since=time.monotonic())
        return time.monotonic() - quiet["since"] >= 4

    wait_until(no_new_snapshot_for_4s, 15, "the snapshots to stop", interval=0.2)
    ids = quiet["ids"]
    assert bb.container("c1")["schedule"] is None
    bb.ok("schedule", "c1", "--every", "1s", "--keep", "1")
    wait_until(lambda: {s["id"] for s in scheduled(bb, "c1")} - ids, 30, "a snapshot after --every again")
    wait_until(lambda: len(scheduled(bb, "c1")) == 1, 10, "retention to keep one")
    bb.ok("rm", "-f", "c1")


def test_bad_schedules_are_refused_in_one_line(bb):
    bb.fails(2, "run", "--name", "c1", "--checkpoint-every", "soon", IMAGE, "true")
    bb.fails(2, "run", "--name", "c1", "--checkpoint-every", "0s", IMAGE, "true")
    bb.fails(2, "run", "--name", "c1", "--keep", "2", IMAGE, "true")
    bb.fails(2, "run", "--name", "c1", "--checkpoint-every", "1m", "--keep", "0", IMAGE, "true")
    assert "c1" not in bb.ps()
    bb.fails(3, "schedule", "nosuch", "--every", "1m")
    bb.fails(2, "schedule", "nosuch")
    bb.fails(2, "restore")
    bb.fails(2, "restore", "--all", "c1")


def test_a_crashed_job_is_lost_and_restore_resumes_it_from_the_newest_snapshot(bb):
    every = 2.0
    bb.ok("run", "--name", "job", "--checkpoint-every", "2s", IMAGE, "sh", "-c", COUNTER)
    wait_snapshots(bb, "job", 2)
    before = kill_everything(bb, "job")
    row = bb.container("job")
    assert row["state"] == "lost" and row["last_snapshot"], row
    assert "lost" in bb.ok("ps").out
    newest = bb.json("snapshots", "job")[-1]
    assert row["last_snapshot"]["id"] == newest["id"]

    bb.ok("restore", "job")
    first, lost = resumed_from_snapshot(bb, "job", before)
    # at most one interval of work (10 counts a second), and a little for the snapshot itself
    assert 0 <= lost <= every * 10 + 10, (first, before[-1])
    row = bb.container("job")
    assert row["state"] == "running" and row["schedule"]["every"] == every
    # its schedule goes on after the restore
    before = {s["id"] for s in scheduled(bb, "job")}
    wait_until(lambda: {s["id"] for s in scheduled(bb, "job")} - before, 30, "a snapshot after the restore")
    bb.ok("rm", "-f", "job")


def test_restore_all_brings_back_every_lost_container_that_has_a_snapshot(bb):
    for name in ("a1", "a2"):
        bb.ok("run", "--name", name, "--checkpoint-every", "1s", IMAGE, "sh", "-c", COUNTER)
    bb.ok("run", "--name", "quiet", "--checkpoint-every", "1s", IMAGE, "sleep", "1000")
    bb.ok("run", "--name", "nosnap", IMAGE, "sh", "-c", COUNTER)
    for name in ("a1", "a2", "quiet"):
        wait_snapshots(bb, name, 1)
    bb.wait_count("nosnap", 3)
    logged = {name: kill_everything(bb, name) for name in ("a1", "a2")}
    kill_everything(bb, "nosnap")
    # the shim alone dies: its process runs on, unsupervised, never `running`; restore refuses
    rec = bb.record("quiet")
    os.kill(rec["shim_pid"], signal.SIGKILL)
    wait_until(lambda: bb.container("quiet")["state"] == "unsupervised", 10, "quiet to be unsupervised")
    r = bb.fails(4, "restore", "quiet")
    assert "unsupervised" in r.err and "migrate stop quiet" in r.err, str(r)
    bb.ok("stop", "quiet")
    assert {n: c["state"] for n, c in bb.ps().items()} == {"a1": "lost", "a2": "lost", "quiet": "lost",
                                                          "nosnap": "lost"}

    r = bb.ok("restore", "--all")
    assert sorted(line.split()[0] for line in r.out.splitlines()) == ["a1", "a2", "quiet"], str(r)
    states = {n: c["state"] for n, c in bb.ps().items()}
    assert states == {"a1": "running", "a2": "running", "quiet": "running", "nosnap": "lost"}
    for name, before in logged.items():
        resumed_from_snapshot(bb, name, before)
    assert "no lost container with a snapshot" in bb.ok("restore", "--all").out
    for name in ("a1", "a2", "quiet", "nosnap"):
        bb.ok("rm", "-f", name)


def _criu_of(root: Path) -> int | None:
    """A `criu swrk` working for this state root (its environment names it), if one runs."""
    want = f"MIGRATE_ROOT={root}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"swrk" in cmdline and want in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                return int(entry)
        except OSError:
            continue
    return None


def test_a_snapshot_whose_criu_is_killed_half_way_leaves_the_previous_ones_whole(bb):
    bb.ok("run", "--name", "c1", "--checkpoint-every", "1s", "--keep", "5", IMAGE, "sh", "-c", COUNTER)
    before = [s["id"] for s in wait_snapshots(bb, "c1", 2)]
    criu = wait_until(lambda: _criu_of(bb.root), 30, "the next scheduled snapshot's criu", interval=0.005)
    os.kill(criu, signal.SIGKILL)
    bb.ok("schedule", "c1", "--off")
    wait_until(lambda: bb.container("c1")["state"] != "checkpointing", 30, "the failed snapshot to end")
    listed = [s["id"] for s in bb.json("snapshots", "c1")]
    assert set(before) <= set(listed), (before, listed)
    for snap_id in listed:  # each one listed is whole; no half snapshot is among them
        assert (bb.state.snapshot_dir(snap_id) / "snapshot.json").exists()
        assert (bb.state.snapshot_dir(snap_id) / "images" / "inventory.img").exists()
    wait_until(lambda: not [p for p in os.listdir(bb.state.snapshots) if p.startswith(".partial-")], 30,
               "the half-written snapshot folder to be removed")
    # the newest complete snapshot still restores: the job (dead or alive after the killed
    # dump) is stopped and brought back from it
    if bb.container("c1")["state"] in ("running", "unsupervised"):
        bb.ok("stop", "c1")
    before = counter_numbers(bb.logs("c1"))
    bb.ok("restore", "c1")
    resumed_from_snapshot(bb, "c1", before)
    bb.ok("rm", "-f", "c1")


def test_a_new_container_of_a_removed_ones_name_never_gets_its_snapshots(bb):
    """Snapshots outlive `rm` (a removed container can be restored from them by name), but a
    container run anew under that name is another job: it is not restored from them."""
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("c1", 3)
    old = bb.ok("checkpoint", "c1").out.strip()
    bb.ok("rm", "c1")
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    assert bb.container("c1")["last_snapshot"] is None
    bb.wait_count("c1", 3)
    kill_everything(bb, "c1")
    assert bb.container("c1")["state"] == "lost"
    assert "no lost container with a snapshot" in bb.ok("restore", "--all").out
    r = bb.fails(3, "restore", "c1")
    assert "earlier container" in r.err, str(r)
    # named explicitly, the old snapshot is restored, and from then on it is this one's
    bb.ok("restore", "--snapshot", old, "c1")
    assert json.loads(bb.ok("inspect", "c1").out)["restored_from"] == old
    assert bb.container("c1")["last_snapshot"]["id"] == old
    bb.ok("rm", "-f", "c1")
