"""`migrate recover [NAME]`: settle what migrations left undecided on this host, from facts.

Every command first reconciles records with the processes (runtime/reconcile.py). What that
cannot settle alone is a container `in-doubt`: its migration asked the target to commit and
never learned the answer. Its processes are held frozen here; only the target's journal knows
whether the copy there is the container. So recover asks it (which decides `aborted` there if
nobody decided yet, ending the target's copy) and then:

| the target says | here |
|---|---|
| committed | the frozen processes are killed, the record and folders removed |
| aborted (or never heard of it) | the processes are thawed: it runs here again |
| aborted; the processes here gone (a restart) | the dump made when the doubt began becomes a snapshot (`checkpointed`) |
| the same, no such dump (the controller died) | `lost` |
| nothing (unreachable) | it stays frozen and in doubt; recover says so and exits 9 |
"""

import shutil
import time
from dataclasses import dataclass

from runtime import journal, states
from runtime.cgroups import Cgroups
from runtime.container import Runtime
from runtime.errors import MigrateError, NotFound
from runtime.reconcile import end_source_copy
from runtime.snapshots import Snapshots

from .hosts import resolve_host


@dataclass(frozen=True)
class Outcome:
    container: str
    peer: str
    result: str  # moved, kept, checkpointed, lost, in-doubt, running
    message: str


def recover(rt: Runtime, name: str | None = None, ssh_config: str | None = None,
            tool_config: str | None = None) -> list[Outcome]:
    if name is not None and rt.catalog.find_container(name) is None and not rt.catalog.journal.unfinished(name):
        raise NotFound(f"no such container or unfinished migration: {name}")
    outcomes = []
    for row in rt.catalog.journal.unfinished(name):
        rec = rt.catalog.find_container(row.container)
        if row.role == journal.TARGET:
            if row.outcome is not None and (rec is None or rec.migration != row.id):
                rt.catalog.journal.finish(row.id, row.role)  # its agent ended before closing it
            continue
        if rec is not None and rec.state == states.MIGRATING:
            outcomes.append(Outcome(row.container, row.peer, "running",
                                    f"{row.container}: its migration to {row.peer} is still under way "
                                    f"(pid {(rec.owner or {}).get('pid')})"))
            continue
        if rec is None or rec.state != states.IN_DOUBT:
            rt.catalog.journal.finish(row.id, row.role)  # settled already; only the journal was open
            continue
        outcomes.append(_resolve(rt, rec, row, ssh_config, tool_config))
    return outcomes


def _resolve(rt: Runtime, rec, row, ssh_config: str | None, tool_config: str | None) -> Outcome:
    from .controller import resolve_on  # slow to import (CRIU, rich): only where it is needed

    outcome = row.outcome
    if outcome is None:
        try:
            outcome = resolve_on(resolve_host(row.peer, ssh_config=ssh_config, tool_config=tool_config), row.id)
        except MigrateError as e:
            return Outcome(rec.name, row.peer, "in-doubt",
                           f"{rec.name}: cannot ask {row.peer} whether it took it ({e}); it stays frozen here")
    if outcome == journal.COMMITTED:
        end_source_copy(rt.catalog, rec.name, rt.discard)
        shutil.rmtree(rt.root.outgoing / rec.name, ignore_errors=True)
        return Outcome(rec.name, row.peer, "moved", f"{rec.name} runs on {row.peer} (it committed): removed here")
    rt.catalog.journal.decide(row.id, journal.SOURCE, journal.ABORTED)
    cgroups = Cgroups(rec.cgroups)
    outgoing = rt.root.outgoing / rec.name
    if cgroups.pids():
        cgroups.thaw()
        rt.catalog.transition(rec.name, "recover-kept")
        result, message = "kept", f"{row.peer} never committed {rec.name}: it runs here again"
    elif (snap := Snapshots(rt).keep_dump(rec.name, outgoing)) is not None:
        rt.release(rec.name)
        rt.catalog.transition(rec.name, "recover-checkpointed", pid=None, shim_pid=None, finished=time.time())
        result, message = "checkpointed", (
            f"{row.peer} never committed {rec.name}, and its processes here are gone (the host restarted?): "
            f"the checkpoint made for the move is kept as snapshot {snap.id}; `migrate restore {rec.name}` "
            "resumes it")
    else:
        rt.catalog.transition(rec.name, "lost", pid=None, shim_pid=None)
        rt.release(rec.name)
        result, message = "lost", (f"{row.peer} never committed {rec.name}, and its processes here are gone "
                                   "(the host restarted?): it is lost; restore it from a snapshot")
    shutil.rmtree(outgoing, ignore_errors=True)
    rt.catalog.journal.finish(row.id, journal.SOURCE)
    return Outcome(rec.name, row.peer, result, message)
