"""Named failure points, for tests that prove a failure anywhere rolls back cleanly.

MIGRATE_FAULTS=name[,name...] in a process's environment (points: restore, pages, commit on the
target; page-server-ready on the source) makes those points raise; `name:kill`
makes the process die there at once (SIGKILL), as it would by the OOM killer or a crash. They
cost one environment lookup and are inert otherwise.
"""

import os
import signal

from .errors import MigrateError


def point(name: str) -> None:
    faults = os.environ.get("MIGRATE_FAULTS", "").split(",")
    if f"{name}:kill" in faults:
        os.kill(os.getpid(), signal.SIGKILL)
    if name in faults:
        raise MigrateError(f"injected fault at {name}")
