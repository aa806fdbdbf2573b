"""Named failure points, for tests that prove a failure anywhere rolls back cleanly.

MIGRATE_FAULTS=name[,name...] in a process's environment (points: restore, pages, commit,
commit-decided, committed on the target; page-server-ready and sent-OP after each request OP
to the agent on the source; restored in a restore's shim; checkpoint-written,
checkpoint-published, checkpoint-dumped in `checkpoint`; pages-stall, not a failure
but a silent page connection: the target's lazy-pages daemon is stopped) makes those points raise;
`name:kill` makes the process die there at once (SIGKILL), as it would by the OOM killer or a
crash, `name:kill-parent` kills the process that started it (and waits until it is gone), and
`name:hang` stops there, answering nothing and sending no heartbeat, until its stdin ends
(the agent: until the controller gives up on it), as a stalled network or host would.
They cost one environment lookup and are inert otherwise.
"""

import os
import select
import signal
import sys
import threading
import time

from .errors import MigrateError

HANG_LIMIT = 600.0
_hanging = threading.Event()


def active(name: str) -> bool:
    """Whether the fault NAME is asked for (for faults that are a behaviour, not a failure:
    `pages-stall` stops the target's lazy-pages daemon, as a silent network would)."""
    return name in os.environ.get("MIGRATE_FAULTS", "").split(",")


def point(name: str) -> None:
    faults = os.environ.get("MIGRATE_FAULTS", "").split(",")
    if f"{name}:kill" in faults:
        os.kill(os.getpid(), signal.SIGKILL)
    if f"{name}:kill-parent" in faults:
        parent = os.getppid()
        os.kill(parent, signal.SIGKILL)
        while os.path.exists(f"/proc/{parent}") and os.getppid() == parent:
            time.sleep(0.01)
    if f"{name}:hang" in faults:
        _hang()
    if name in faults:
        raise MigrateError(f"injected fault at {name}")


def hanging() -> bool:
    """Whether this process is stopped at a `hang` point (its heartbeat stops too)."""
    return _hanging.is_set()


def _hang() -> None:
    """Wait until stdin's other end is closed: only hang-up and errors are polled for, not
    data, so heartbeats arriving meanwhile do not end it."""
    _hanging.set()
    try:
        poller = select.poll()
        poller.register(sys.stdin.fileno(), getattr(select, "POLLRDHUP", 0))
        poller.poll(HANG_LIMIT * 1000)
    finally:
        _hanging.clear()
