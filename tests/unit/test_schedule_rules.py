"""When scheduled snapshots fall due, and which ones retention prunes (no CRIU, no processes)."""

import os

from runtime.schedule import Scheduler, next_due, to_prune
from runtime.spec import ContainerSpec, Schedule
from runtime.store import SnapshotRecord

SPEC = ContainerSpec(name="c1", image="i", image_id="sha256:x", layers=(), argv=("sh",))


def snap(sid: str, created: float, scheduled: bool = True, tag: str | None = None) -> SnapshotRecord:
    return SnapshotRecord(sid, "c1", tag, created, SPEC, "4.2.1", 10, scheduled)


def test_due_every_interval_after_the_newest_of_start_attempt_and_snapshot():
    every = Schedule(every=10)
    assert next_due(every, since=100, last_attempt=None, newest=None) == 110
    assert next_due(every, since=100, last_attempt=104, newest=None) == 114
    assert next_due(every, since=100, last_attempt=None, newest=107) == 117  # a restored one keeps its rhythm
    assert next_due(every, since=100, last_attempt=None, newest=3) == 110  # an old snapshot: from the start
    assert next_due(every, since=100, last_attempt=120, newest=115) == 130


def test_retention_prunes_only_scheduled_snapshots_beyond_the_newest_keep():
    snaps = [snap("a", 1), snap("m", 2, scheduled=False), snap("b", 3), snap("t", 4, scheduled=False, tag="x"),
             snap("c", 5), snap("d", 6)]
    assert [s.id for s in to_prune(snaps, 2)] == ["a", "b"]
    assert [s.id for s in to_prune(snaps, 4)] == []
    assert [s.id for s in to_prune(list(reversed(snaps)), 1)] == ["a", "b", "c"]


class FakeCatalog:
    def __init__(self, rec, snaps=()):
        self.rec, self.snaps, self.looks = rec, list(snaps), 0

    def find_container(self, name):
        self.looks += 1
        return self.rec

    def snapshots(self, name):
        return self.snaps


class Rec:
    def __init__(self, state="running", schedule=Schedule(every=5), migration=None):
        self.state, self.migration = state, migration
        self.spec = ContainerSpec(**{**SPEC.__dict__, "schedule": schedule})


def test_the_scheduler_starts_one_worker_when_due_and_waits_for_it(monkeypatch):
    spawned = []
    monkeypatch.setattr(os, "posix_spawn", lambda path, argv, env, **kw: spawned.append(argv) or 4242)
    cat = FakeCatalog(Rec())
    s = Scheduler(cat, "c1", now=1000)
    s.tick(1001)
    s.tick(1004.9)
    assert spawned == []
    s.tick(1005)
    assert spawned and spawned[0][-2:] == ["runtime.schedule", "c1"] and s.worker == 4242
    s.tick(1020)  # one at a time
    assert len(spawned) == 1
    s.reaped(999)  # not ours
    assert s.worker == 4242
    s.reaped(4242)
    s.tick(1006)
    assert len(spawned) == 1  # due again 5 s after the attempt began
    s.tick(1010)
    assert len(spawned) == 2


def test_no_snapshot_unless_running_scheduled_and_committed(monkeypatch):
    monkeypatch.setattr(os, "posix_spawn", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("spawned")))
    for rec in (Rec(state="checkpointing"), Rec(schedule=None), Rec(migration="m1"), None):
        s = Scheduler(FakeCatalog(rec), "c1", now=0)
        s.tick(100)
        s.tick(200)


def test_a_changed_schedule_is_seen_within_a_second():
    cat = FakeCatalog(Rec(schedule=None))
    s = Scheduler(cat, "c1", now=0)
    for t in (0, 0.5, 0.9, 1.0, 1.5, 2.0):
        s.tick(t)
    assert cat.looks == 3  # at 0, 1.0 and 2.0
