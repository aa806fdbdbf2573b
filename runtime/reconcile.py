"""Records that tell the truth: before a command acts, each container's record is checked
against the facts, and what an operation that died left behind is settled.

An operation holds a transient state (checkpointing, restoring, migrating) with its own process
recorded as the owner. If that process dies (SIGKILL, the OOM killer, a crash), nobody would
ever leave the state, and every command would refuse the container. And a host that crashed or
rebooted, or a shim that was killed, leaves `running` records whose processes are gone. So:

| record | facts | becomes |
|---|---|---|
| running | shim and every process gone | lost (mounts and cgroups freed) |
| checkpointing, migrating; owner dead | processes alive, none traced by a live CRIU | running (CRIU resumed them) |
| migrating; owner dead | processes held by a CRIU that outlived it | that CRIU is killed, then as the rest |
| migrating; owner dead | journal: the target committed | removed here (the target has it) |
| migrating; owner dead | journal: commit asked, no answer | in-doubt (held frozen until `migrate recover`) |
| checkpointing; owner dead | processes gone, its snapshot published | checkpointed (the snapshot is adopted) |
| checkpointing, migrating; owner dead | processes gone | lost |
| restoring; owner dead | shim gone | lost (a half-restored tree is killed) |

`lost` is never `running`: it can be restored from a snapshot or removed. Every change is
conditional on the record being unchanged since the facts were read, so a live operation
that moves on meanwhile always wins. The decision is a pure function of the facts.
"""

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import linux, states
from .cgroups import Cgroups
from .criu import frozen_seconds
from .paths import CHECKPOINT_META, DUMP_SYNCED, PARTIAL_PREFIX, SNAPSHOT_META, StateRoot
from .spec import ContainerSpec
from .store import Catalog, ContainerRecord, SnapshotRecord, own_identity

OWNER_FILE = "owner.json"  # in a folder an operation is writing: the process doing it


@dataclass(frozen=True)
class Facts:
    owner_alive: bool
    shim_alive: bool
    tree_alive: bool  # some process of the container runs (a zombie does not count)
    traced: bool  # one of them is held by a live tracer: CRIU is still at work
    commit: str | None = None  # its migration's commit: "committed" (known here) or "asked" (answer lost)
    published: bool = False  # its checkpoint published the snapshot: CRIU's dump was through


def decide(state: str, facts: Facts) -> tuple[str, str] | None:
    """(action, why) to settle a record in `state`, or None when it tells the truth."""
    if state == states.RUNNING:
        if not facts.shim_alive and not facts.tree_alive:
            return "lost", "its processes and its shim are gone"
        return None
    if state not in states.TRANSIENT or facts.owner_alive:
        return None
    what = {states.CHECKPOINTING: "checkpoint", states.MIGRATING: "migration",
            states.RESTORING: "restore"}[state]
    if state == states.RESTORING:
        if facts.shim_alive:
            return None  # the shim still restores or already supervises: it settles the record
        return "lost", f"its {what} was interrupted and nothing supervises it"
    if facts.traced:
        # A dump's CRIU notices its caller's death at its next notification and lets the tree
        # go. A lazy migration's page server may instead wait for a connection that will never
        # come, holding the tree frozen (seen; not every time): nothing can use it any more,
        # so it is ended.
        return ("release", "its migration died and left CRIU holding its processes") \
            if state == states.MIGRATING else None
    if state == states.CHECKPOINTING and facts.published and not facts.tree_alive:
        return "checkpoint-done-stopped", "its checkpoint died after the snapshot was complete"
    if state == states.MIGRATING and facts.commit == "committed":
        return "migrate-done", "its migration committed and died before it cleaned up here: the target has it"
    if state == states.MIGRATING and facts.commit == "asked":
        return ("migrate-in-doubt", "its migration died after asking the target to commit: it is held frozen "
                "here; run `migrate recover` to ask the target which copy is the one")
    if facts.tree_alive:
        return "resumed", f"its {what} was interrupted; its processes run on"
    return "lost", f"its {what} was interrupted and its processes are gone"


def _tracers(rec: ContainerRecord) -> set[int]:
    return {t for t in (_tracer(p) for p in Cgroups(rec.cgroups).pids()) if t}


def release_tracers(rec: ContainerRecord, timeout: float = 10.0) -> None:
    """Kill whatever CRIU holds the container's processes and wait until they are free: a
    ptrace-seized tree runs on when its tracer dies (nothing of its state was changed yet)."""
    for tracer in _tracers(rec):
        linux.send_signal(tracer, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _tracers(rec) and time.monotonic() < deadline:
        time.sleep(0.05)


def owner_alive(owner: dict | None) -> bool:
    """Whether the process an owner record ({"pid", "start"}) names still runs."""
    return bool(owner) and not linux.proc_gone((owner.get("pid"), owner.get("start")))


def unsupervised(rec: ContainerRecord) -> bool:
    """A running record whose shim died: its processes run, nothing logs their output or will
    record their exit (`ps` shows it so, `stop` ends them by PID, `restore` refuses it)."""
    return rec.state == states.RUNNING and not (rec.shim_pid and linux.pid_running(rec.shim_pid))


def facts_of(rec: ContainerRecord, catalog: Catalog, root: StateRoot) -> Facts:
    tree = [p for p in Cgroups(rec.cgroups).pids() if linux.pid_running(p)]
    return Facts(
        owner_alive=owner_alive(rec.owner),
        shim_alive=bool(rec.shim_pid) and linux.pid_running(rec.shim_pid),
        tree_alive=bool(tree),
        traced=any(_tracer(p) for p in tree),
        commit=(catalog.journal.commit_state(rec.name) or (None,))[0] if rec.state == states.MIGRATING else None,
        published=rec.state == states.CHECKPOINTING and bool((rec.owner or {}).get("snapshot")) and (
            root.snapshot_dir(str(rec.owner["snapshot"])) / SNAPSHOT_META).exists(),
    )


def _tracer(pid: int) -> int | None:
    """The live process that ptrace-holds pid, if any."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    tracer = int(line.split()[1])
                    return tracer if tracer and linux.pid_running(tracer) else None
    except OSError:
        pass
    return None


def owner_file(incoming: Path) -> Path:
    return incoming.with_name(incoming.name + ".owner")


def write_owner(path: Path, **extra) -> None:
    """This process as the owner of what `path` names (atomically: a reader sees all or nothing)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**own_identity(), **extra}))
    os.rename(tmp, path)


def write_transfer_owner(incoming: Path, staging: Path) -> None:
    """Beside a migration's incoming folder: the agent that owns it and its layer staging folder."""
    write_owner(owner_file(incoming), staging=str(staging))


def adopt_snapshot(catalog: Catalog, sdir: Path) -> SnapshotRecord:
    """The catalog row of a published snapshot folder, from its snapshot.json (added if missing)."""
    meta = json.loads((sdir / SNAPSHOT_META).read_text())
    if meta["id"] != sdir.name:
        raise ValueError(f"{sdir} holds snapshot {meta['id']}")
    pause = frozen_seconds(sdir / "images" / "stats-dump")
    # one transaction: the checkpoint that published it and any command's sweep may both adopt it
    with catalog.transaction():
        existing = [s for s in catalog.snapshots(meta["container"]) if s.id == meta["id"]]
        if existing:
            return existing[0]
        tag = meta.get("tag")
        if tag and any(s.tag == tag for s in catalog.snapshots(meta["container"])):
            tag = None  # taken meanwhile by another snapshot: adopted untagged
        snap = SnapshotRecord(meta["id"], meta["container"], tag, float(meta["created"]),
                              ContainerSpec.from_json(json.dumps(meta["spec"])), meta["criu_version"],
                              int(meta["size"]), bool(meta.get("scheduled")), pause)
        catalog.add_snapshot(snap)
    return snap


def sweep_snapshots(root: StateRoot, catalog: Catalog) -> list[str]:
    """Snapshots a checkpoint published but did not live to register are adopted; folders of
    checkpoints that died before publishing are removed (they are incomplete by construction)."""
    notes = []
    known = {s.id for s in catalog.snapshots()}
    for folder in sorted(root.snapshots.iterdir()) if root.snapshots.is_dir() else []:
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None  # its owner file is written before anything else: it never began
        if folder.name.startswith(PARTIAL_PREFIX):
            if not owner_alive(owner):
                shutil.rmtree(folder, ignore_errors=True)
                notes.append(f"removed the unfinished snapshot {folder.name[len(PARTIAL_PREFIX):]} "
                             "of a checkpoint that died")
        elif folder.name not in known and (folder / SNAPSHOT_META).exists() and not owner_alive(owner):
            # (one whose checkpoint still runs is recorded by it, with what CRIU adds at its end)
            try:
                snap = adopt_snapshot(catalog, folder)
            except (OSError, ValueError, KeyError) as e:
                notes.append(f"snapshot folder {folder} is not readable ({e}): left alone")
                continue
            notes.append(f"adopted snapshot {snap.id} of {snap.container}, complete but not recorded by the "
                         "checkpoint that wrote it")
    return notes


def sweep_transfers(root: StateRoot, catalog: Catalog) -> list[str]:
    """Remove what migrations whose process died left here (CRIU images of a container's memory):
    incoming folders whose agent is gone, outgoing folders of containers no live migration holds."""
    removed = []
    for marker in sorted(root.incoming.glob("*.owner")) if root.incoming.is_dir() else []:
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if owner_alive(owner):
            continue
        incoming = marker.with_suffix("")
        staging = Path(str(owner.get("staging", "")))
        shutil.rmtree(incoming, ignore_errors=True)
        if staging.parent == root.layers / "tmp" and staging.name.startswith("incoming-"):
            shutil.rmtree(staging, ignore_errors=True)
        marker.unlink(missing_ok=True)
        removed.append(f"incoming/{incoming.name}")
    for folder in sorted(root.outgoing.iterdir()) if root.outgoing.is_dir() else []:
        rec = catalog.find_container(folder.name)
        held = rec is not None and (rec.state == states.IN_DOUBT or rec.state == states.MIGRATING and owner_alive(rec.owner))
        if not held:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"outgoing/{folder.name}")
    for folder in (root.incoming, root.outgoing):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only once empty
    return [f"removed what a migration that died left in {root.root}: {', '.join(removed)}"] if removed else []


def secure_dump(folder: Path) -> None:
    """An in-doubt migration's dump, if complete (copy mode: lazy and pre-copy dumps send
    memory to the target, not into the images), is put on disk and marked so: should the host
    restart before the doubt is settled, `recover` makes it the container's snapshot
    (Snapshots.keep_dump)."""
    try:
        memory_here = json.loads((folder / CHECKPOINT_META).read_text()).get("memory_here", False)
    except (OSError, ValueError):
        return
    if not memory_here:
        return
    linux.fsync_tree(folder)
    (folder / DUMP_SYNCED).touch()
    linux.fsync_dir(folder)


def end_source_copy(catalog: Catalog, name: str, discard) -> None:
    """The target has the container: end what is left of it here (frozen or already killed by
    CRIU), its record and folder, and close its journal."""
    state = catalog.journal.commit_state(name)
    discard(name)  # kills by PID: a frozen process dies of SIGKILL too
    if state is not None:
        catalog.journal.decide(state[1].id, "source", "committed")
        catalog.journal.finish(state[1].id, "source")


def reconcile(root: StateRoot, catalog: Catalog, release, discard) -> list[str]:
    """Settle every record that does not tell the truth; returns one note per change.
    `release(name)` frees a lost container's mounts and cgroups (and kills what is left);
    `discard(name)` removes every trace of one that moved."""
    notes = []
    for rec in catalog.containers():
        verdict = decide(rec.state, facts_of(rec, catalog, root))
        if verdict is not None and verdict[0] == "release":
            release_tracers(rec)
            verdict = decide(rec.state, facts_of(rec, catalog, root))
        if verdict is None or verdict[0] == "release":
            continue
        action, why = verdict
        if action == "resumed":
            cgroups = Cgroups(rec.cgroups)
            cgroups.thaw()  # frozen just before a commit that was never asked for
            for pid in cgroups.pids():  # a tree a dead CRIU left stopped goes on
                if linux.proc_state(pid) == "T":
                    linux.send_signal(pid, signal.SIGCONT)
            settled = catalog.settle(rec.name, rec, action)
        elif action == "migrate-done":
            settled = catalog.settle(rec.name, rec, "migrate-in-doubt")
            if settled:
                end_source_copy(catalog, rec.name, discard)
                notes.append(f"{rec.name} was {rec.state}, but {why}: removed here")
            continue
        elif action == "migrate-in-doubt":
            Cgroups(rec.cgroups).freeze(wait=False)  # it is already; and stays so without a CRIU
            settled = catalog.settle(rec.name, rec, action)
            if settled:
                secure_dump(root.outgoing / rec.name)
        else:
            settled = catalog.settle(rec.name, rec, action, pid=None, shim_pid=None)
            if settled:
                release(rec.name)
        if settled:
            notes.append(f"{rec.name} was {rec.state}, but {why}: now {states.check(action, rec.state)}")
    return notes
