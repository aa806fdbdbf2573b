"""The container state machine: which lifecycle steps are allowed from which state.

Every state change in the catalog goes through `check`, so a container can never be, say,
restored while it runs or removed while a checkpoint is being written.
"""

from .errors import Conflict

CREATED = "created"          # record and directories exist, no process yet
RUNNING = "running"          # init runs under its shim
EXITED = "exited"            # init ended by itself or by stop; exit code recorded
CHECKPOINTING = "checkpointing"  # a dump is being written; the shim leaves the record alone
CHECKPOINTED = "checkpointed"    # stopped with a complete snapshot that can be restored
RESTORING = "restoring"      # CRIU is bringing it back
MIGRATING = "migrating"      # from the end of preflight until the source is cleaned up or rolled back
LOST = "lost"                # its processes and its shim are gone without a recorded exit (crash, kill)
# a migration lost the target's answer to its commit and could not ask again: the processes are
# held frozen here until `migrate recover` learns from the target which copy is the container
IN_DOUBT = "in-doubt"

ALL = (CREATED, RUNNING, EXITED, CHECKPOINTING, CHECKPOINTED, RESTORING, MIGRATING, LOST, IN_DOUBT)
# states an operation holds: the record names the process doing it (its owner)
TRANSIENT = frozenset({CHECKPOINTING, RESTORING, MIGRATING})

# action -> (states it may start from, state while it runs or after it)
_ACTIONS: dict[str, tuple[frozenset[str], str]] = {
    "start": (frozenset({CREATED}), RUNNING),
    "exit": (frozenset({RUNNING}), EXITED),
    "checkpoint": (frozenset({RUNNING}), CHECKPOINTING),
    "checkpoint-done-stopped": (frozenset({CHECKPOINTING}), CHECKPOINTED),
    "checkpoint-done-running": (frozenset({CHECKPOINTING}), RUNNING),
    "checkpoint-failed": (frozenset({CHECKPOINTING}), RUNNING),
    "restore": (frozenset({CHECKPOINTED, EXITED, CREATED, LOST}), RESTORING),
    "restore-done": (frozenset({RESTORING}), RUNNING),
    "migrate": (frozenset({RUNNING}), MIGRATING),
    "migrate-rolled-back": (frozenset({MIGRATING}), RUNNING),
    "migrate-in-doubt": (frozenset({MIGRATING}), IN_DOUBT),
    "recover-kept": (frozenset({IN_DOUBT}), RUNNING),  # the target never committed: it runs here again
    "recover-checkpointed": (frozenset({IN_DOUBT}), CHECKPOINTED),  # ... and its processes were gone: its dump is kept
    "stop": (frozenset({RUNNING}), RUNNING),
    "remove": (frozenset({CREATED, EXITED, CHECKPOINTED, LOST}), "removed"),
    # found by reconcile (runtime/reconcile.py), from facts rather than from the operation itself
    "lost": (frozenset({RUNNING, CHECKPOINTING, RESTORING, MIGRATING, IN_DOUBT}), LOST),
    "resumed": (frozenset({CHECKPOINTING, MIGRATING}), RUNNING),
    "exec": (frozenset({RUNNING}), RUNNING),
}

ACTIONS = tuple(_ACTIONS)


def check(action: str, state: str, name: str = "container") -> str:
    """Return the state after `action`, or raise Conflict with a message a user understands."""
    allowed, after = _ACTIONS[action]
    if state not in allowed:
        hint = f"; run `migrate recover {name}`" if state == IN_DOUBT else ""
        raise Conflict(f"cannot {action.split('-')[0]} {name}: it is {state}{hint}")
    return after


def allowed_from(action: str) -> frozenset[str]:
    return _ACTIONS[action][0]
