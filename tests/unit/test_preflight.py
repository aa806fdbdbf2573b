"""Preflight is a pure comparison of two hosts' facts: every refusal reason is checked here."""

from migrate.preflight import blobs_verdict, judge, limits_verdict, needs_pipe_size, version_tuple
from runtime.spec import Limits

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
    assert (v.mode, v.problems) == ("lazy", ()) and v.why.startswith("lazy: both hosts have userfaultfd")


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


def test_holdings_refuse_connections_to_outside_unless_closed():
    from migrate.preflight import holdings_verdict
    from runtime.procfs import Connection

    out = [Connection(("127.0.0.1", 8000), ("10.0.0.9", 5000))]
    problems, notes = holdings_verdict("c1", "host-b", None, out, [], tcp_close=False, allow_new_inodes=False)
    assert len(problems) == 1 and "127.0.0.1:8000 -> 10.0.0.9:5000" in problems[0] and "--tcp-close" in problems[0]
    assert notes == []
    problems, notes = holdings_verdict("c1", "host-b", None, out, [], tcp_close=True, allow_new_inodes=False)
    assert problems == [] and "127.0.0.1:8000 -> 10.0.0.9:5000" in notes[0]


def test_holdings_refuse_open_sqlite_databases_unless_allowed():
    from migrate.preflight import holdings_verdict

    problems, _ = holdings_verdict("c1", "host-b", None, [], ["/data.db"], tcp_close=False, allow_new_inodes=False)
    assert "/data.db" in problems[0] and "SQLITE_READONLY_DBMOVED" in problems[0]
    problems, notes = holdings_verdict("c1", "host-b", None, [], ["/data.db"], False, allow_new_inodes=True)
    assert problems == [] and "/data.db" in notes[0]
    problems, _ = holdings_verdict("c1", "host-b", "uid 1000 needs CAP_SYS_RESOURCE", [], [], False, False)
    assert problems == ["uid 1000 needs CAP_SYS_RESOURCE"]


def test_holdings_refuse_ports_taken_on_the_target():
    from migrate.preflight import holdings_verdict

    problems, _ = holdings_verdict("c1", "host-b", None, [], [], False, False, taken=["tcp 127.0.0.1:6379"])
    assert len(problems) == 1 and "tcp 127.0.0.1:6379" in problems[0] and "host-b" in problems[0]


def test_lazy_needs_both_criu_on_the_same_side_of_the_page_protocol_change():
    """CRIU 4.2 widened its page-server messages: a 4.2 page server and a 4.1 lazy-pages (or a
    3.17 one) misread each other. Copy mode still works where the target's CRIU is newer."""
    old, new = facts(criu_version="3.17.1"), facts(criu_version="4.2.1")
    v = judge(old, new, "c1", GIB, "lazy")
    assert len(v.problems) == 1 and "changed how its page server talks in 4.2" in v.problems[0]
    auto = judge(old, new, "c1", GIB, "auto")
    assert (auto.mode, auto.problems) == ("copy", ()) and "cannot stream memory to each other" in auto.why
    assert judge(facts(criu_version="4.1.1"), facts(criu_version="3.17.1"), "c1", GIB, "auto").problems != ()
    same = judge(facts(criu_version="3.17.1"), facts(criu_version="4.1.1"), "c1", GIB, "auto")
    assert (same.mode, same.problems) == ("lazy", ()) and same.why.startswith("lazy")


def test_copy_mode_streams_memory_only_between_criu_of_the_same_page_wire():
    """Copy mode's dump writes memory straight to a page server on the target where both CRIUs
    speak the same page-server wire, and dumps to disk for rsync where they do not (4.1 -> 4.2)."""
    for here, there, stream in (("4.2.1", "4.2.1", True), ("3.17.1", "4.1.1", True), ("3.17.1", "4.2.1", False),
                                ("4.1.1", "4.2.1", False)):
        plain = facts(criu_version=here, lazy_pages=False), facts(criu_version=there, lazy_pages=False)
        for mode in ("copy", "auto"):
            v = judge(*plain, "c1", GIB, mode)
            assert (v.mode, v.problems, v.stream) == ("copy", (), stream), (here, there, mode, v)
    # pre-copy's final dump streams whether asked for or chosen by auto; lazy mode's never does
    both = facts(dirty_tracking=True, criu_version="4.2.1")
    for mode in ("precopy", "auto"):
        v = judge(both, both, "c1", GIB, mode)
        assert (v.mode, v.problems, v.stream) == ("precopy", (), True), (mode, v)
    assert not judge(facts(), facts(), "c1", GIB, "lazy").stream


def test_precopy_needs_soft_dirty_tracking_and_criu_3_17_on_both_and_auto_prefers_it():
    both = facts(dirty_tracking=True, criu_version="3.17.1")
    v = judge(both, both, "c1", GIB, "auto")
    assert (v.mode, v.problems) == ("precopy", ()) and "track dirtied memory" in v.why
    v = judge(both, facts(dirty_tracking=False, criu_version="3.17.1"), "c1", GIB, "precopy")
    assert "soft-dirty memory tracking" in v.problems[0] and "host-b" in v.problems[0]
    old = facts(dirty_tracking=True, criu_version="3.16.1")
    assert "3.17 or later" in judge(old, both, "c1", GIB, "precopy").problems[0]
    assert judge(old, both, "c1", GIB, "auto").mode == "lazy"
    new = facts(dirty_tracking=True, criu_version="4.2.1")
    assert "changed how its page server talks in 4.2" in judge(both, new, "c1", GIB, "precopy").problems[0]
    assert judge(both, new, "c1", GIB, "auto").mode == "copy"


def test_limits_need_their_controllers_on_the_target():
    limits = Limits(memory_bytes=64 << 20, cpus=0.5)
    assert limits_verdict("c1", limits, facts(cgroup_controllers=["cpu", "memory", "pids"])) == []
    assert limits_verdict("c1", limits, facts(cgroup_controllers=["memory", "pids"])) == [
        "host-b cannot apply the limits of c1: it has no cpu cgroup controller for containers"]
    assert limits_verdict("c1", Limits(), facts(cgroup_controllers=[])) == []
    assert limits_verdict("c1", limits, facts()) == []  # an agent that does not say is not judged


def test_layers_without_a_blob_here_cannot_be_sent():
    assert blobs_verdict("busybox:latest", []) == []
    [problem] = blobs_verdict("busybox:latest", ["sha256:" + "ab" * 32])
    assert "sha256:abababababab" in problem and "busybox:latest" in problem and "import the image again" in problem
