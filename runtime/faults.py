"""Named failure points, for tests that prove a failure anywhere rolls back cleanly.

MIGRATE_FAULTS=name[,name...] in a process's environment makes those points raise. They cost
one environment lookup and are inert otherwise.
"""

import os

from .errors import MigrateError


def point(name: str) -> None:
    if name in os.environ.get("MIGRATE_FAULTS", "").split(","):
        raise MigrateError(f"injected fault at {name}")
