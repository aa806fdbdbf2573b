"""Preflight is a pure comparison of two hosts' facts: every refusal reason is checked here."""

from migrate.preflight import judge, needs_pipe_size, version_tuple

GIB = 1 << 30


def facts(**over) -> dict:
    base = {"hostname": "host-b", "root": "/var/lib/migrate", "criu_ok": True, "criu_version": "4.1.1",
            "containers": [], "free_bytes": 100 * GIB, "lazy_pages": True, "pipe_max_size": 1 << 20, "layers": []}
    return {**base, **over}


def test_versions_compare_numerically():
    assert version_tuple("4.10") > version_tuple("4.9")
    assert version_tuple("4.1.1") < version_tuple("4.2")
    assert version_tuple(None) == (0,)


def test_everything_fine_auto_picks_lazy_when_both_support_it():
    v = judge(facts(), facts(), "c1", GIB, "auto")
    assert v == (v.__class__("lazy", ()))


def test_auto_falls_back_to_copy():
    assert judge(facts(), facts(lazy_pages=False), "c1", GIB, "auto").mode == "copy"
    assert judge(facts(), facts(), "c1", GIB, "auto", lazy_implemented=False).mode == "copy"


def test_lazy_refused_without_userfaultfd_on_target():
    v = judge(facts(), facts(lazy_pages=False), "c1", GIB, "lazy")
    assert any("lazy mode needs userfaultfd" in p and "host-b" in p for p in v.problems)


def test_older_criu_on_target_refused_newer_accepted():
    older = judge(facts(criu_version="4.2.1"), facts(criu_version="4.1.1"), "c1", GIB, "copy")
    assert any("older than 4.2.1" in p for p in older.problems)
    assert judge(facts(criu_version="4.1.1"), facts(criu_version="4.2.1"), "c1", GIB, "copy").problems == ()


def test_broken_criu_on_target():
    v = judge(facts(), facts(criu_ok=False, criu_message="vdso: Unexpected rt vDSO area bounds"), "c1", GIB, "copy")
    assert v.problems == ("criu does not work on host-b: vdso: Unexpected rt vDSO area bounds",)


def test_name_taken_and_disk_full_are_both_reported():
    v = judge(facts(), facts(containers=["c1"], free_bytes=GIB), "c1", GIB, "copy")
    assert len(v.problems) == 2
    assert "a container named c1 already exists on host-b" in v.problems
    assert any("free under /var/lib/migrate" in p for p in v.problems)


def test_pipe_size_needed_for_lazy_dumps():
    assert needs_pipe_size(facts(pipe_max_size=1 << 20))
    assert not needs_pipe_size(facts(pipe_max_size=4 << 20))
