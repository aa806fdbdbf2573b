"""Scheduled snapshots: the shim decides when one is due, a worker process takes it.

A container with a schedule (`run --checkpoint-every`, `migrate schedule`) gets a leave-running
snapshot every `every` seconds while it runs, written aside and published whole like any
checkpoint (runtime/snapshots.py), so a crash during one never harms the one before. Then only
the newest `keep` scheduled snapshots of it are kept; tagged or hand-made ones are never pruned.
The worker is a process of its own so the shim keeps copying the container's output meanwhile,
and so a failing snapshot cannot take the supervisor down with it. No cron, no daemon.

Run as: python -m runtime.schedule NAME   (by the container's shim)
"""

import os
import sys
import time

from . import states
from .errors import MigrateError
from .spec import Schedule
from .store import Catalog, SnapshotRecord

RECHECK = 1.0  # seconds between looks at the catalog: a changed schedule counts from then


def next_due(schedule: Schedule, since: float, last_attempt: float | None, newest: float | None) -> float:
    """When the next snapshot is due: `every` after the newest of the supervisor's start, its
    last attempt (taken or failed) and the container's newest snapshot (a restored container
    keeps the rhythm of the snapshots it already has)."""
    return max(since, last_attempt or since, newest or since) + schedule.every


def to_prune(snapshots: list[SnapshotRecord], keep: int) -> list[SnapshotRecord]:
    """The scheduled snapshots beyond the newest KEEP, oldest first; others are the user's."""
    scheduled = sorted((s for s in snapshots if s.scheduled), key=lambda s: s.created)
    return scheduled[:max(0, len(scheduled) - keep)]


class Scheduler:
    """The shim's side: `tick()` from its loop starts the worker when a snapshot is due;
    `reaped(pid)` tells it the worker ended (the shim reaps every child it has)."""

    def __init__(self, catalog: Catalog, name: str, now: float):
        self.catalog = catalog
        self.name = name
        self.since = now
        self.last_attempt: float | None = None
        self.worker: int | None = None
        self.next_look = now

    def tick(self, now: float) -> None:
        if self.worker is not None or now < self.next_look:
            return
        self.next_look = now + RECHECK
        rec = self.catalog.find_container(self.name)
        schedule = rec.spec.schedule if rec is not None else None
        if schedule is None or rec.state != states.RUNNING or rec.migration:  # (a target's copy before its commit)
            return
        snaps = self.catalog.snapshots(self.name)
        due = next_due(schedule, self.since, self.last_attempt, snaps[-1].created if snaps else None)
        if now >= due:
            self.last_attempt = now
            self.worker = os.posix_spawn(sys.executable, [sys.executable, "-m", "runtime.schedule", self.name],
                                         os.environ, file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
        else:
            self.next_look = min(self.next_look, due)

    def reaped(self, pid: int) -> None:
        if pid == self.worker:
            self.worker = None


def take(name: str) -> SnapshotRecord:
    """One scheduled snapshot of NAME, then the retention."""
    from .container import Runtime
    from .snapshots import Snapshots

    rt = Runtime()
    try:
        snapshots = Snapshots(rt)
        snap = snapshots.checkpoint(name, leave_running=True, scheduled=True)
        rec = rt.catalog.container(name)
        if rec.spec.schedule is not None:
            for old in to_prune(rt.catalog.own_snapshots(rec), rec.spec.schedule.keep):
                snapshots.remove(old.id)
        return snap
    finally:
        rt.close()


def main(argv: list[str] | None = None) -> int:
    name = (argv if argv is not None else sys.argv[1:])[0]
    started = time.time()
    try:
        snap = take(name)
    except MigrateError as e:  # the shim's log is where a failed scheduled snapshot is told
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} scheduled snapshot of {name} failed: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} scheduled snapshot {snap.id} of {name} "
          f"({time.time() - started:.2f} s, paused {snap.pause if snap.pause is not None else '?'} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
