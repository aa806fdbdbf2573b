"""`migrate drain` without hosts: policy resolution, placement, and the execution of a plan
with a runner that answers as `migrate move|checkpoint|stop` would."""

import json
import threading
import time

import pytest

from migrate import drain
from migrate.cli import main
from migrate.drain import Drain, Entry, Need, place, resolve_policy

GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# policy: the container's own wins; --policy for the rest; live by default


@pytest.mark.parametrize("own,flag,expected", [
    ("checkpoint", "stop", "checkpoint"), ("live", "stop", "live"), (None, "stop", "stop"),
    (None, None, "live"), ("stop", None, "stop"),
])
def test_policy_resolution(own, flag, expected):
    assert resolve_policy(own, flag) == expected


# ---------------------------------------------------------------------------------------------
# placement


def test_each_goes_to_the_most_free_memory_counting_what_was_placed_there_before():
    needs = [Need(f"c{i}", 3 * GIB) for i in range(1, 5)]
    got = place(needs, {"host-b": 10 * GIB, "host-c": 8 * GIB}, {})
    # b 10 -> c1, b 7 < c 8 -> c2, b 7 > c 5 -> c3, b 4 < c 5 -> c4
    assert [(p.name, p.targets[0]) for p in got] == [("c1", "host-b"), ("c2", "host-c"), ("c3", "host-b"),
                                                      ("c4", "host-c")]
    assert got[0].targets == ("host-b", "host-c")  # the other is its fallback
    assert got[3].targets == ("host-c", "host-b")


def test_biggest_first_and_equal_memory_keeps_the_order_of_to():
    got = place([Need("small", GIB), Need("big", 4 * GIB)], {"host-b": 8 * GIB, "host-c": 8 * GIB}, {})
    assert [(p.name, p.targets[0]) for p in got] == [("big", "host-b"), ("small", "host-c")]


def test_a_refused_target_is_skipped_and_every_reason_is_named():
    refused = {("c2", "host-b"): "a container named c2 already exists on host-b",
               ("c2", "host-c"): "a container named c2 already exists on host-c",
               ("c1", "host-b"): "host-b has CRIU 4.1.1, older than 4.2.1 here"}
    got = {p.name: p for p in place([Need("c1", GIB), Need("c2", GIB), Need("c3", GIB)],
                                    {"host-b": 8 * GIB, "host-c": 7 * GIB}, refused)}
    assert got["c2"].targets == () and "on host-b" in got["c2"].reason and "on host-c" in got["c2"].reason
    assert got["c1"].targets == ("host-c",)
    assert got["c3"].targets[0] == "host-b"  # c2 took no memory anywhere; c1 took host-c's


def test_too_little_memory_left_refuses():
    got = place([Need("a", 5 * GIB), Need("b", 5 * GIB)], {"host-b": 6 * GIB}, {})
    assert got[0].targets == ("host-b",)
    assert got[1].targets == () and "host-b has 1.0 GiB of memory available" in got[1].reason


def test_a_target_that_does_not_say_its_memory_ranks_last_and_takes_any_size():
    got = place([Need("a", 100 * GIB), Need("b", GIB)], {"old": None, "new": 4 * GIB}, {})
    assert got[0].targets == ("old",)
    assert got[1].targets == ("new", "old")


# ---------------------------------------------------------------------------------------------
# execution


class FakeMigrate:
    """Answers `migrate move|checkpoint|stop` as the real verbs do (exit status, JSON, error line)."""

    def __init__(self, refuse=None, delay=0.0):
        self.refuse = refuse or {}  # (name, target) -> (rc, message)
        self.delay = delay
        self.calls = []
        self.running = self.most = 0
        self.lock = threading.Lock()
        self.stopped = False

    def run(self, args):
        with self.lock:
            self.calls.append(args)
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        if args[0] == "checkpoint":
            return 0, json.dumps({"id": "20260101-000000-abcd"}), ""
        if args[0] == "stop":
            return 0, f"{args[1]} exited (143)\n", ""
        name, target = args[1], args[2]
        if (name, target) in self.refuse:
            rc, message = self.refuse[(name, target)]
            return rc, "", f"migrate: note: something\nmigrate: error: {message}\n"
        return 0, json.dumps({"container": name, "target": target, "downtime_s": 0.25}), ""

    def stop(self):
        self.stopped = True


def _drain(*entries, parallel=1):
    d = Drain("host-a", ["host-b", "host-c"], parallel=parallel)
    d.entries = list(entries)
    return d


def _move(name, *targets, memory=GIB):
    return Entry(name, "running", "live", "move", memory, tuple(targets), target=targets[0] if targets else None)


def test_a_refusal_by_one_target_tries_the_next():
    fake = FakeMigrate({("c1", "host-b"): (8, "cannot migrate c1 to host-b: ports of c1 are taken on host-b")})
    d = _drain(_move("c1", "host-b", "host-c"))
    drain.execute(d, fake)
    e = d.entries[0]
    assert (e.result, e.target, e.downtime_s) == ("moved", "host-c", 0.25)
    assert "ports of c1 are taken on host-b" in e.reason
    assert [c[:3] for c in fake.calls] == [["move", "c1", "host-b"], ["move", "c1", "host-c"]]


def test_each_move_gets_the_drains_ssh_config_and_direct():
    fake = FakeMigrate({})
    d = _drain(_move("c1", "host-b"))
    d.ssh_config, d.direct = "/etc/lab_ssh_config", True
    drain.execute(d, fake)
    assert fake.calls == [["move", "c1", "host-b", "--json", "--ssh-config", "/etc/lab_ssh_config", "--direct"]]


def test_a_failure_that_is_not_the_target_s_stops_trying_and_others_go_on():
    fake = FakeMigrate({("c1", "host-b"): (4, "cannot migrate c1: it is exited")})
    d = _drain(_move("c1", "host-b", "host-c"), _move("c2", "host-c", "host-b"))
    drain.execute(d, fake)
    c1, c2 = d.entries
    assert (c1.result, c1.target, c1.reason) == ("failed", None, "cannot migrate c1: it is exited")
    assert (c2.result, c2.target) == ("moved", "host-c")
    assert not d.report()["complete"]


def test_in_doubt_is_said_so():
    fake = FakeMigrate({("c1", "host-b"): (9, "the answer of host-b to the commit of c1 was lost")})
    d = _drain(_move("c1", "host-b", "host-c"))
    drain.execute(d, fake)
    assert d.entries[0].result == "in-doubt" and len(fake.calls) == 1


def test_policies_checkpoint_and_stop_and_what_is_not_planned_is_left_alone():
    d = _drain(Entry("cp", "running", "checkpoint", "checkpoint", GIB),
               Entry("st", "running", "stop", "stop", GIB),
               Entry("ex", "exited", "live", "none", result="skipped", reason="not running (exited)"))
    drain.execute(d, FakeMigrate())
    got = {e.name: (e.result, e.snapshot) for e in d.entries}
    assert got == {"cp": ("checkpointed", "20260101-000000-abcd"), "st": ("stopped", None),
                   "ex": ("skipped", None)}
    assert d.report()["complete"]


def test_at_most_parallel_at_once():
    fake = FakeMigrate(delay=0.1)
    d = _drain(*(_move(f"c{i}", "host-b") for i in range(6)), parallel=2)
    drain.execute(d, fake)
    assert fake.most == 2 and all(e.result == "moved" for e in d.entries)


def test_report_shape():
    d = _drain(_move("b", "host-b"), Entry("a", "exited", "live", "none", result="skipped", reason="r"))
    report = d.report()
    assert set(report) == {"host", "targets", "parallel", "policy", "dry_run", "complete", "containers"}
    assert [c["name"] for c in report["containers"]] == ["a", "b"]
    assert set(report["containers"][0]) == {"name", "state", "policy", "action", "memory", "targets", "result",
                                            "target", "reason", "downtime_s", "snapshot"}


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing done


@pytest.mark.parametrize("args,words", [
    (["drain", "host-a", "--to", ","], "--to names no host"),
    (["drain", "host-a", "--to", "host-b,host-a"], "into itself"),
    (["drain", "host-a", "--to=host-b,-oProxyCommand=x"], "must not start with '-'"),
    (["drain", "localhost", "--to", "host-b", "--parallel", "0"], "--parallel must be at least 1"),
    (["drain", "localhost", "--to", "host-b", "--policy", "later"], "invalid choice"),
])
def test_bad_input(args, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIGRATE_ROOT", str(tmp_path / "root"))
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("migrate: error: ") and words in err[0], err
