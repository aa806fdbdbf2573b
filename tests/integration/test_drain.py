"""`migrate drain` between test hosts through the real CLI, SSH and CRIU: a host emptied onto
the others, a container no target takes kept where it runs, per-container policies, a drain run
from a third machine. The fixtures (conftest.py) remove everything afterwards, whatever happened."""

import json
import os
import re

import pytest
from clihost import COUNTER, IMAGE, counter_numbers, wait_until
from cluster import Cluster, assert_counts_on, assert_no_migration_leftovers, start_counter

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

TARGETS = "host-b,host-c"
WIDE = {"COLUMNS": "400"}  # a table row on one line, however long its reason
ENTRY_KEYS = {"name", "state", "policy", "action", "memory", "targets", "result", "target", "reason", "downtime_s",
              "snapshot"}


def _three(cluster, busybox_archives, *, image_on=("host-a",)) -> Cluster:
    c = cluster(3)
    for name in image_on:
        c[name].import_busybox(busybox_archives["docker-archive"])
    return c


def _drain_json(node, *args: str, rc: int = 0) -> dict:
    r = node.run("drain", *args, "--json")
    assert r.rc == rc, str(r)
    report = json.loads(r.out)
    assert set(report) == {"host", "targets", "parallel", "policy", "dry_run", "complete", "containers"}, report
    assert all(set(e) == ENTRY_KEYS for e in report["containers"]), report
    assert report["complete"] == (rc == 0)
    return report


def _by_name(report: dict) -> dict[str, dict]:
    return {e["name"]: e for e in report["containers"]}


def test_drain_moves_four_counters_to_two_targets_and_empties_the_host(cluster, busybox_archives):
    c = _three(cluster, busybox_archives)
    a = c["host-a"]
    names = ("c1", "c2", "c3", "c4")
    before = {n: start_counter(c, "host-a", n) for n in names}

    # --dry-run: the placement, nothing changed
    state = a.snapshot_of_state()
    plan = _drain_json(a, "host-a", "--to", TARGETS, "--parallel", "2", "--dry-run")
    assert plan["dry_run"] and plan["host"] == "host-a" and plan["parallel"] == 2
    for e in plan["containers"]:
        assert (e["state"], e["policy"], e["action"], e["result"]) == ("running", "live", "move", "planned"), e
        assert e["target"] == e["targets"][0] and set(e["targets"]) == {"host-b", "host-c"}, e
        assert e["memory"] > 0 and e["downtime_s"] is None
    assert sorted(_by_name(plan)) == list(names)
    assert a.snapshot_of_state() == state
    assert c["host-b"].ps() == {} and c["host-c"].ps() == {}

    report = _drain_json(a, "host-a", "--to", TARGETS, "--parallel", "2")
    assert not report["dry_run"]
    for name, e in _by_name(report).items():
        assert e["result"] == "moved" and e["target"] in ("host-b", "host-c"), e
        assert isinstance(e["downtime_s"], float) and 0 < e["downtime_s"] < 30, e
        # it runs where the report says, its counter continuing without a gap or a restart
        assert_counts_on(c, e["target"], name, before[name], more=5)
        assert name not in c["host-b" if e["target"] == "host-c" else "host-c"].ps()
    assert a.ps() == {}
    assert_no_migration_leftovers(*c.nodes.values())

    # run again: nothing left to do
    again = _drain_json(a, "host-a", "--to", TARGETS)
    assert again["containers"] == []


def test_a_container_no_target_takes_keeps_running_here_and_a_rerun_finishes(cluster, busybox_archives):
    c = _three(cluster, busybox_archives, image_on=("host-a", "host-b", "host-c"))
    a, b = c["host-a"], c["host-b"]
    before = {n: start_counter(c, "host-a", n) for n in ("c1", "c2", "c3")}
    for node in ("host-b", "host-c"):  # both targets refuse c2: the name is taken there
        c[node].ok("run", "--name", "c2", IMAGE, "sleep", "1000")
        c.record(node, "c2")

    report = _drain_json(a, "host-a", "--to", TARGETS, "--parallel", "2", rc=10)
    got = _by_name(report)
    assert (got["c2"]["result"], got["c2"]["target"], got["c2"]["targets"]) == ("failed", None, [])
    assert "a container named c2 already exists on host-b" in got["c2"]["reason"]
    assert "a container named c2 already exists on host-c" in got["c2"]["reason"]
    for name in ("c1", "c3"):
        assert got[name]["result"] == "moved", got[name]
        assert_counts_on(c, got[name]["target"], name, before[name], more=3)
    assert set(a.ps()) == {"c2"}
    before["c2"] = assert_counts_on(c, "host-a", "c2", before["c2"], more=3)

    # the table says the same, and the error is one line
    r = a.run("drain", "host-a", "--to", TARGETS, env=WIDE)
    assert r.rc == 10, str(r)
    row = next(line for line in r.out.splitlines() if line.startswith("c2 "))
    assert "failed" in row and "already exists on host-b" in row, r.out
    assert r.err.strip() == "migrate: error: 1 container(s) stay on host-a: c2", str(r)

    # once host-b has room for the name, running the drain again finishes the rest
    b.ok("rm", "-f", "c2")
    report = _drain_json(a, "host-a", "--to", TARGETS)
    assert [(e["name"], e["result"], e["target"]) for e in report["containers"]] == [("c2", "moved", "host-b")]
    assert_counts_on(c, "host-b", "c2", before["c2"], more=3)
    assert a.ps() == {}


def test_drain_from_a_third_machine_with_per_container_policies(cluster, busybox_archives):
    c = _three(cluster, busybox_archives)
    a, b, third = c["host-a"], c["host-b"], c["host-c"]
    before = {"c1": start_counter(c, "host-a", "c1")}
    for name, policy in (("c2", "checkpoint"), ("c4", "live")):
        a.ok("run", "--name", name, "--drain-policy", policy, IMAGE, "sh", "-c", COUNTER)
        c.record("host-a", name)
        before[name] = a.wait_count(name, 5)
    a.ok("run", "--name", "c3", "--drain-policy", "stop", IMAGE, "sh", "-c",
         "trap 'exit 0' TERM; while true; do sleep 0.1; done")
    c.record("host-a", "c3")
    a.ok("run", "--name", "c5", IMAGE, "true")  # exits at once: nothing to drain
    c.record("host-a", "c5")
    wait_until(lambda: a.container("c5")["state"] == "exited", 30, "c5 to exit")  # before the state is taken

    # from host-c, a dry run with --policy stop: containers without a policy of their own follow it
    state = a.snapshot_of_state()
    plan = _by_name(_drain_json(third, "host-a", "--to", "host-b", "--policy", "stop", "--dry-run"))
    assert {n: (e["policy"], e["action"], e["result"]) for n, e in plan.items()} == {
        "c1": ("stop", "stop", "planned"), "c2": ("checkpoint", "checkpoint", "planned"),
        "c3": ("stop", "stop", "planned"), "c4": ("live", "move", "planned"),
        "c5": ("stop", "none", "skipped")}
    assert plan["c4"]["target"] == "host-b" and "not running (exited)" in plan["c5"]["reason"]
    assert a.snapshot_of_state() == state

    # the drain itself, from host-c, as a table; without --policy, c1 moves (live by default)
    r = third.run("drain", "host-a", "--to", "host-b", env=WIDE)
    assert r.rc == 0, str(r)
    rows = {line.split()[0]: line for line in r.out.splitlines()[1:] if line.strip()}
    assert "moved" in rows["c1"] and "host-b" in rows["c1"] and re.search(r"\d\.\d{3} s", rows["c1"]), r.out
    assert "checkpointed" in rows["c2"] and "snapshot" in rows["c2"], r.out
    assert "stopped" in rows["c3"] and "skipped" in rows["c5"], r.out
    for name in ("c1", "c4"):
        assert_counts_on(c, "host-b", name, before[name], more=3)
    assert set(b.ps()) == {"c1", "c4"} and third.ps() == {}
    ps = a.ps()
    assert {n: ps[n]["state"] for n in ps} == {"c2": "checkpointed", "c3": "exited", "c5": "exited"}

    # the checkpointed one comes back with its counter where it was
    snaps = a.json("snapshots", "c2")
    assert len(snaps) == 1 and snaps[0]["id"] in rows["c2"]
    frozen = counter_numbers(a.logs("c2"))
    a.ok("restore", "c2")
    nums = assert_counts_on(c, "host-a", "c2", before["c2"], more=3)
    assert nums[len(frozen)] == frozen[-1] + 1
    assert_no_migration_leftovers(*c.nodes.values())


def test_a_container_under_scheduled_snapshots_is_drained_and_its_schedule_goes_on_there(cluster, busybox_archives):
    """A snapshot every second: drain meets one under way and waits for it rather than failing;
    on the target the shim takes them on, with the schedule the container brought."""
    c = cluster(2)
    a, b = c["host-a"], c["host-b"]
    a.import_busybox(busybox_archives["docker-archive"])
    a.ok("run", "--name", "s1", "--checkpoint-every", "1s", IMAGE, "sh", "-c", COUNTER)
    c.record("host-a", "s1")
    wait_until(lambda: any(s["scheduled"] for s in a.json("snapshots", "s1")), 30, "a scheduled snapshot on host-a")
    before = counter_numbers(a.logs("s1"))
    report = _drain_json(a, "host-a", "--to", "host-b")
    assert _by_name(report)["s1"]["result"] == "moved", report
    assert a.ps() == {}
    row = b.container("s1")
    assert row["state"] in ("running", "checkpointing") and row["schedule"] == {"every": 1.0, "keep": 3}, row
    nums = b.wait_count("s1", len(before) + 10)
    assert nums[:len(before)] == before and nums == list(range(1, len(nums) + 1))
    wait_until(lambda: any(s["scheduled"] for s in b.json("snapshots", "s1")), 30, "a scheduled snapshot on host-b")
    b.ok("rm", "-f", "s1")
