"""Checkpoint and restore on one host, and the snapshot catalog.

A snapshot is a folder that holds everything needed to bring a container back, here or on
another host: CRIU's images (with CRIU's logs), a copy of the upper dir taken while the tree
was frozen, the log so far, the spec, and the stdio pipe identities CRIU needs to re-attach
the output to a new shim. Only root can read it: CRIU images hold process memory.
"""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from . import criulogs, faults, linux, procfs, rootfs, states
from .cgroups import Cgroups
from .container import LaunchedShim, Runtime
from .criu import Criu, DumpOptions, tcp_images
from .errors import Conflict, CriuError, MigrateError, NotFound
from .paths import CHECKPOINT_META, DUMP_SYNCED, SNAPSHOT_META, STDIO_PIPES
from .reconcile import OWNER_FILE, adopt_snapshot, unsupervised, write_owner
from .spec import ContainerSpec, validate_name
from .store import ContainerRecord, SnapshotRecord, own_identity

SPEC_FILE = "spec.json"
UPPER_SNAPSHOT = "upper.snapshot"  # in a stopped container's folder: the snapshot its upper dir is
_NOT_SCANNED = frozenset({"proc", "sys", "dev"})


def copy_tree(src: Path, dst: Path) -> None:
    """cp -a: keeps xattrs, devices (overlay whiteouts), hardlinks; never reads devices as files."""
    proc = subprocess.run(["cp", "-a", "--", str(src), str(dst)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MigrateError(f"copying {src} failed: {proc.stderr.strip().splitlines()[-1:]}")


def stdio_pipes(cdir: Path, pid: int) -> dict[str, str]:
    """The pipe identities ('pipe:[inode]') of the container's stdout and stderr, as CRIU names
    them: as its shim recorded them when it made them, since a process may hold them on any fd
    (a shell running `{ ...; } > file` has its stdout on another fd meanwhile, and a restore
    that does not know that pipe gives it back without a reader); else init's fds 1 and 2."""
    try:
        recorded = json.loads((cdir / STDIO_PIPES).read_text())
        if isinstance(recorded, dict) and all(isinstance(v, str) and v.startswith("pipe:[") for v in recorded.values()):
            return {k: v for k, v in recorded.items() if k in ("stdout", "stderr")}
    except (OSError, ValueError):
        pass
    pipes = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            pipes[name] = target
    return pipes


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _mark_upper_snapshot(cdir: Path, snapshot_id: str) -> None:
    """Record that the stopped container's upper dir is exactly that snapshot's (durably)."""
    tmp = cdir / (UPPER_SNAPSHOT + ".tmp")
    with open(tmp, "w") as f:
        f.write(snapshot_id)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, cdir / UPPER_SNAPSHOT)
    linux.fsync_dir(cdir)


def _upper_is_of(cdir: Path, snapshot_id: str) -> bool:
    try:
        return (cdir / UPPER_SNAPSHOT).read_text() == snapshot_id
    except OSError:
        return False


def _forget_upper_snapshot(cdir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cdir / UPPER_SNAPSHOT)
        linux.fsync_dir(cdir)


def irmap_scan_paths(rootfs_dir: Path) -> tuple[str, ...]:
    """Where CRIU looks for the files inotify watches (overlay file handles cannot be opened):
    the container's top folders, without the kernel's (/proc alone holds tens of thousands)."""
    try:
        names = sorted(e.name for e in os.scandir(rootfs_dir) if e.is_dir(follow_symlinks=False))
    except OSError:
        return ()
    return tuple(f"/{n}" for n in names if n not in _NOT_SCANNED)


def dump_blocker(rec: ContainerRecord) -> str | None:
    """Why CRIU cannot dump this running container on this host, found before anything freezes."""
    others = procfs.foreign_ids(Cgroups(rec.cgroups).pids())
    if others and not procfs.can_dump_other_users():
        ids = ", ".join(str(i) for i in sorted(others)[:5])
        return (f"processes of {rec.name} run as uid/gid {ids}, and CRIU needs CAP_SYS_RESOURCE to dump "
                "another user's processes, which root lacks on this host")
    return None


def dump(rec: ContainerRecord, cdir: Path, sdir: Path, leave_running: bool, on_frozen: Callable[[], None],
         on_notify: Callable[[str], None] | None = None, lazy: bool = False,
         on_criu: Callable[[int], None] | None = None, page_socket: int | None = None,
         parent_images: str | None = None, freeze_cgroup: str | None = None,
         on_seized: Callable[[], None] | None = None) -> None:
    """Checkpoint a running container (its folder cdir) into the new folder sdir (images, spec,
    stdio identities).

    on_frozen runs at CRIU's post-dump notification, while the tree is still frozen: if it raises,
    CRIU resumes the tree and the dump fails. on_seized runs as soon as CRIU holds the whole tree,
    before it dumps anything (its query-ext-files notification, CRIU >= 3.19; never with an
    older one): what reads the frozen container's files can start there, beside CRIU's work. Any
    other notification goes to on_notify.
    With page_socket (the page connection to the other host's CRIU), memory stays out of the
    images: it goes to the page server there as CRIU dumps (only what was dirtied since the
    pre-dump in parent_images, if given); or, when lazy, CRIU serves it after post-dump (from
    `status-ready` on) to the lazy-pages daemon there, and returns once that has ended the
    connection. on_criu gets the PID of the dumping criu: killing it is the last resort to resume
    a tree it holds frozen. freeze_cgroup: the tree is held by that freezer (see dump_held).

    CRIU's network lock (an nftables table) holds TCP connections still while they are dumped;
    a container without any is dumped without it, which spares CRIU making and deleting the
    table (~20 ms, inside the pause of a lazy move). One opened in the instant before the freeze
    fails the dump (the tree resumes): try again.
    """
    sdir.mkdir(mode=0o700, exist_ok=True)
    (sdir / "images").mkdir(mode=0o700)
    (sdir / SPEC_FILE).write_text(rec.spec.to_json())
    memory_here = page_socket is None  # else the images lack it
    (sdir / CHECKPOINT_META).write_text(json.dumps({"pipes": stdio_pipes(cdir, rec.pid), "memory_here": memory_here}))

    criu = Criu()
    network_lock = not criu.can_skip_network_lock() or bool(procfs.tcp_connections(Cgroups(rec.cgroups).pids()))

    def notified(script: str, _pid: int) -> None:
        if script == "post-dump":
            if not network_lock and tcp_images(sdir / "images"):
                raise MigrateError(f"{rec.name} opened a TCP connection just as it was frozen, which the dump had "
                                   "not locked: it runs on; try again")
            on_frozen()
        elif script == "query-ext-files":
            if on_seized is not None:
                on_seized()
        elif on_notify is not None:
            on_notify(script)

    opts = DumpOptions(
        pid=rec.pid,
        leave_running=leave_running,
        irmap_scan_paths=irmap_scan_paths(Path(f"/proc/{rec.pid}/root")),
        external=_externals(rec),
        lazy_pages=lazy,
        page_socket=page_socket,
        parent_images=parent_images,
        freeze_cgroup=freeze_cgroup,
        network_lock=network_lock,
    )
    criu.dump(opts, sdir / "images", notified, on_criu)


def dump_held(rec: ContainerRecord, cdir: Path, sdir: Path) -> None:
    """A complete dump, memory included, of a tree held frozen (an in-doubt migration's source),
    into sdir anew; the tree stays frozen. The dump made for the move streamed the memory to the
    target, and this one is the tree's only copy should this host restart before the doubt is
    settled. Where the cgroup freezer holds it, CRIU is told so: it takes the tree through that
    freezer and leaves it frozen (stopped trees, where there is no cgroup2, it dumps as stopped)."""
    shutil.rmtree(sdir, ignore_errors=True)
    dump(rec, cdir, sdir, leave_running=True, on_frozen=lambda: None,
         freeze_cgroup=Cgroups(rec.cgroups).paths.get("unified"))


def pre_dump(rec: ContainerRecord, folder: Path, page_socket: int, parent: str | None) -> int:
    """A pre-copy round into the new FOLDER: the pages dirtied since the round in PARENT (all
    of them in the first) go through the page connection page_socket while the container runs
    on. Returns how many pages were sent."""
    folder.mkdir(mode=0o700)
    opts = DumpOptions(pid=rec.pid, external=_externals(rec), pre_dump=True, log_file="pre-dump.log",
                       page_socket=page_socket, parent_images=parent)
    return Criu().pre_dump(opts, folder)


def _externals(rec: ContainerRecord) -> tuple[str, ...]:
    return tuple(f"mnt[{v.container_path}]:{v.criu_key}" for v in rec.spec.volumes)


class Snapshots:
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.catalog = runtime.catalog
        self.root = runtime.root

    def checkpoint(self, name: str, leave_running: bool = False, tag: str | None = None,
                   scheduled: bool = False) -> SnapshotRecord:
        """Dump NAME into a new snapshot. It is written aside (snapshots/.partial-ID) and
        published by one rename while the tree is still frozen, after every file is on disk:
        so a snapshot exists only complete, before the tree it holds is ended, and once CRIU's
        dump is through it is never deleted (a checkpoint that dies later leaves it to be
        adopted by the next command, runtime/reconcile.py)."""
        if tag is not None:
            validate_name(tag, "tag")
            self.catalog.require_free_tag(name, tag)  # before the dump, not after it
        blocker = dump_blocker(self.catalog.container(name))
        if blocker:
            raise CriuError(f"cannot checkpoint {name}: {blocker}")
        snapshot_id = secrets.token_hex(6)
        # before anything changes: a missing or broken criu fails here, the container untouched
        meta = {"id": snapshot_id, "container": name, "tag": tag, "criu_version": Criu().version(),
                "scheduled": scheduled}
        rec = self.rt.take(name, "checkpoint", owner={**own_identity(), "snapshot": snapshot_id})
        final = self.root.snapshot_dir(snapshot_id)
        partial = self.root.partial_snapshot_dir(snapshot_id)
        try:
            self._dump(rec, partial, final, leave_running, meta)
        except BaseException as e:
            if final.exists():  # CRIU's dump was through: what failed after must not cost the snapshot
                snap = adopt_snapshot(self.catalog, final)
                alive = bool(Cgroups(rec.cgroups).pids())
                self.catalog.transition(name, "checkpoint-failed" if alive else "checkpoint-done-stopped",
                                        **({} if alive else {"pid": None, "shim_pid": None, "finished": time.time()}))
                raise MigrateError(f"the checkpoint of {name} failed after its snapshot {snap.id} was complete "
                                   f"(kept): {e}") from None
            # CRIU's log is in the partial folder, which goes now: the error names a kept copy instead
            failure = criulogs.keep_failed(self.root, name, e) if isinstance(e, CriuError) else e
            shutil.rmtree(partial, ignore_errors=True)
            self.catalog.transition(name, "checkpoint-failed")
            if failure is not e:
                raise failure from None
            raise
        faults.point("checkpoint-dumped")  # CRIU returned: the tree is ended (unless left running)
        snap = adopt_snapshot(self.catalog, final)
        if leave_running:
            self.catalog.transition(name, "checkpoint-done-running")
            return snap
        shim_gone = self.rt.wait_for_exit(name, 60)
        _mark_upper_snapshot(self.root.container_dir(name), snapshot_id)
        self.catalog.transition(name, "checkpoint-done-stopped", pid=None, shim_pid=None, finished=time.time())
        if not shim_gone:
            raise MigrateError(f"{name} is checkpointed as {snapshot_id}, but its shim did not exit")
        return snap

    def _dump(self, rec: ContainerRecord, partial: Path, final: Path, leave_running: bool, meta: dict) -> None:
        """CRIU dump into `partial`; while the tree is still frozen, it is published as `final`."""
        self.root.snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial.mkdir(mode=0o700)
        write_owner(partial / OWNER_FILE)
        dump(rec, self.root.container_dir(rec.name), partial, leave_running,
             lambda: self._publish(rec.name, partial, final, meta))

    def _publish(self, name: str, folder: Path, final: Path, meta: dict) -> None:
        """A dump in `folder` becomes the snapshot `final`: the container's upper dir and log are
        copied beside its images, everything is synced, and one rename publishes it."""
        cdir = self.root.container_dir(name)
        shutil.rmtree(folder / "upper", ignore_errors=True)  # a copy an earlier attempt began
        copy_tree(cdir / "upper", folder / "upper")
        if (cdir / "container.log").exists():
            shutil.copy2(cdir / "container.log", folder / "container.log")
        faults.point("checkpoint-written")
        spec = json.loads((folder / SPEC_FILE).read_text())
        (folder / SNAPSHOT_META).write_text(json.dumps({**meta, "created": time.time(), "spec": spec,
                                                        "size": tree_size(folder)}))
        linux.fsync_tree(folder)
        os.rename(folder, final)
        linux.fsync_dir(final.parent)
        faults.point("checkpoint-published")

    def keep_dump(self, name: str, folder: Path) -> SnapshotRecord | None:
        """The dump of a migration that never happened becomes NAME's snapshot, if it is complete
        and on disk (`secure_dump` marked it): its processes are gone, and it is the only copy
        of them. Published in place, so that no moment exists where a sweep could take it for
        an unfinished checkpoint; the upper dir is the one it was frozen with."""
        if not (folder / DUMP_SYNCED).exists():
            return None
        snapshot_id = secrets.token_hex(6)
        meta = {"id": snapshot_id, "container": name, "tag": None, "criu_version": Criu().version()}
        self.root.snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._publish(name, folder, self.root.snapshot_dir(snapshot_id), meta)
        snap = adopt_snapshot(self.catalog, self.root.snapshot_dir(snapshot_id))
        _mark_upper_snapshot(self.root.container_dir(name), snapshot_id)
        return snap

    def restore(self, name: str, ref: str | None = None, new_name: str | None = None,
                tcp_close: bool = False) -> ContainerRecord:
        snap = self._find(name, ref)
        target = validate_name(new_name or name)
        existing = self.catalog.find_container(target)
        if existing is not None and unsupervised(existing):
            raise Conflict(f"cannot restore {target}: it is unsupervised (its shim died, its processes run); "
                           f"`migrate stop {target}` first")
        cdir = self.root.container_dir(name)
        in_place = target == name and _upper_is_of(cdir, snap.id)
        try:
            return self.restore_dir(self.root.snapshot_dir(snap.id), target, move=False, in_place=in_place,
                                    tcp_close=tcp_close, snapshot_id=snap.id)
        except BaseException:
            if in_place:  # CRIU fails before the tree resumes: the upper dir is still the snapshot's
                _mark_upper_snapshot(cdir, snap.id)
            raise

    def restore_dir(self, sdir: Path, name: str, move: bool, lazy: bool = False,
                    shim: LaunchedShim | None = None, in_place: bool = False,
                    tcp_close: bool = False, snapshot_id: str | None = None) -> ContainerRecord:
        """Bring back the container checkpointed in sdir as NAME.

        move=False keeps sdir intact (a snapshot); move=True takes its upper dir and log
        (a migration's incoming folder, used once). in_place=True keeps the container's own
        upper dir, which is still exactly the snapshot's: its files keep their inode numbers,
        which programs such as SQLite compare with the ones they opened. tcp_close brings
        connections to the outside back closed. `shim` is one launched ahead of time for this
        restore (see Runtime.launch_shim), with its own tcp_close. snapshot_id: the snapshot
        sdir is, recorded as the one the container came from (its own among those of its name).
        """
        spec = ContainerSpec.from_json((sdir / SPEC_FILE).read_text()).renamed(name)
        self.rt.require_layers(spec)
        existing = self.catalog.find_container(name)
        if existing is None:
            self.rt.create_record(spec)
            previous = None
        else:
            states.check("restore", existing.state, name)
            previous = existing.state
            self.catalog.set_fields(name, spec=spec.to_json())
        try:
            self._prepare_dir(name, sdir, keep_log=existing is not None, move=move, in_place=in_place)
            self.catalog.transition(name, "restore", restored_from=snapshot_id)
            faults.point("restore")
            if shim is not None:
                shim.go()
            else:
                self.rt.spawn_shim(name, "restore", sdir, lazy, tcp_close)
        except BaseException:
            self.rt.release(name)
            if previous is None:
                self.rt.discard(name)
            else:
                self.catalog.set_fields(name, state=previous, owner=None, restored_from=existing.restored_from)
            raise
        return self.catalog.container(name)

    def _prepare_dir(self, name: str, sdir: Path, keep_log: bool, move: bool, in_place: bool) -> None:
        """The upper dir as sdir has it (kept, moved or copied); the log continues (or starts
        from sdir's copy)."""
        cdir = self.root.container_dir(name)
        rootfs.unmount_all(cdir)
        # from here on the upper dir may change: a later restore of that snapshot must copy
        _forget_upper_snapshot(cdir)
        shutil.rmtree(cdir / "work", ignore_errors=True)
        if not in_place:
            shutil.rmtree(cdir / "upper", ignore_errors=True)
            if move:
                (sdir / "upper").rename(cdir / "upper")
            else:
                copy_tree(sdir / "upper", cdir / "upper")
        (cdir / "work").mkdir()
        (cdir / "rootfs").mkdir(exist_ok=True)
        log = cdir / "container.log"
        if (not keep_log or not log.exists()) and (sdir / "container.log").exists():
            (os.rename if move else shutil.copy2)(sdir / "container.log", log)

    def _find(self, name: str, ref: str | None) -> SnapshotRecord:
        """REF, else the newest snapshot of NAME: of the container of that name if there is one
        (never one an earlier, removed container of its name left), else of the removed one."""
        if ref is not None:
            return self.catalog.snapshot(ref, container=name)
        rec = self.catalog.find_container(name)
        snaps = self.catalog.own_snapshots(rec) if rec is not None else self.catalog.snapshots(name)
        if not snaps:
            earlier = " (older ones of that name are an earlier container's: name one with --snapshot)" \
                if self.catalog.snapshots(name) else ""
            raise NotFound(f"no snapshot of {name}{earlier}")
        return snaps[-1]

    def lost_with_snapshot(self) -> list[str]:
        """The lost containers that a snapshot can bring back (`restore --all`, e.g. at boot)."""
        return [r.name for r in self.catalog.containers() if r.state == states.LOST and self.catalog.own_snapshots(r)]

    def list(self, name: str | None = None) -> list[SnapshotRecord]:
        if name is not None and self.catalog.find_container(name) is None and not self.catalog.snapshots(name):
            raise NotFound(f"no such container: {name}")
        return self.catalog.snapshots(name)

    def remove(self, snapshot_id: str) -> None:
        """The row first, then the folder, renamed aside before it is deleted: interrupted, it
        is either still whole (and adopted again) or an unfinished folder that the next
        command removes, never a row naming half a snapshot."""
        snap = self.catalog.snapshot(snapshot_id)
        self.catalog.remove_snapshot(snap.id)
        trash = self.root.partial_snapshot_dir(snap.id)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.root.snapshot_dir(snap.id), trash)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(trash / OWNER_FILE)  # whoever wrote it is no owner of the trash
        shutil.rmtree(trash, ignore_errors=True)
