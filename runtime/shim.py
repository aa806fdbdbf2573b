"""The per-container supervisor: parent of the container's init, keeper of its log.

One shim per running container, detached from the CLI. It builds the container (start) or has
CRIU bring it back (restore), tells the CLI the outcome through a status pipe, then copies the
container's stdout/stderr into its log until init exits, records the exit status, and tears
down the container's mounts and cgroups.

Run as: python -m runtime.shim start|restore NAME --status-fd FD [--snapshot DIR] [--lazy] [--tcp-close]
        [--migration ID]

It waits for one byte on stdin before it starts: a migration launches it before the freeze,
so the interpreter's start-up is not part of the downtime. EOF instead means "not needed".
"""

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import confine, criulogs, faults, journal, linux, rootfs, states
from .cgroups import Cgroups
from .criu import Criu, RestoreOptions, _rpc, tcp_images
from .errors import CriuError, MigrateError
from .layers import LayerStore
from .paths import CHECKPOINT_META, STDIO_PIPES, StateRoot
from .schedule import Scheduler
from .spec import ContainerSpec, Limits
from .store import Catalog

COMMIT = b"c"  # on a fenced shim's go pipe: the migration committed, the copy here is the one
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_PATH = f"PATH={STANDARD_PATH}"


def container_env(spec: ContainerSpec) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in (DEFAULT_PATH, f"HOSTNAME={spec.name}", *spec.env) if "=" in e)
    return env


class Shim:
    def __init__(self, root: StateRoot, catalog: Catalog, name: str):
        self.root = root
        self.catalog = catalog
        rec = catalog.container(name)
        self.spec = rec.spec
        self.cgroups = Cgroups(rec.cgroups)
        self.dir = root.container_dir(name)
        self.rootfs = self.dir / "rootfs"
        self.readers: list[int] = []

    # building the container
    def prepare(self) -> None:
        layers = LayerStore(self.root.layers)
        lowers = [layers.path_of(d) for d in reversed(self.spec.layers)]
        rootfs.mount_overlay(lowers, self.dir / "upper", self.dir / "work", self.rootfs,
                             confined=not self.spec.privileged)
        self.cgroups.create()

    def _pipes(self) -> tuple[int, int]:
        """Two pipes (stdout, stderr): read ends stay here, write ends go to the container."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.readers = [out_r, err_r]
        # a dump finds them by these names wherever the container holds them (see stdio_pipes)
        names = {"stdout": f"pipe:[{os.fstat(out_r).st_ino}]", "stderr": f"pipe:[{os.fstat(err_r).st_ino}]"}
        linux.write_atomic(self.dir / STDIO_PIPES, json.dumps(names).encode())
        return out_w, err_w

    def start(self) -> int:
        self.cgroups.set_limits(self.spec.limits)
        out_w, err_w = self._pipes()
        pid_r, pid_w = os.pipe()
        err_pipe_r, err_pipe_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            self._child(out_w, err_w, pid_w, err_pipe_w)
        for fd in (out_w, err_w, pid_w, err_pipe_w):
            os.close(fd)
        os.waitpid(child, 0)
        with os.fdopen(pid_r) as f:
            text = f.read().strip()
        with os.fdopen(err_pipe_r, "rb") as f:
            failure = f.read().decode(errors="replace").strip()
        if failure or not text:
            raise MigrateError(failure or "the container's init could not be started")
        return int(text)

    def _child(self, out_w: int, err_w: int, pid_w: int, err_pipe_w: int) -> None:
        """Runs in the forked child; never returns. Its child is the container's init (PID 1 inside)."""
        try:
            self.cgroups.add(os.getpid())
            linux.unshare(linux.CLONE_NEWPID | linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC)
            init = os.fork()
            if init:
                os.write(pid_w, str(init).encode())
                os._exit(0)
            os.setsid()  # inside the pid namespace, as CRIU requires
            rootfs.enter(self.rootfs, self.spec.name, self.spec.volumes, self.spec.working_dir,
                         confined=not self.spec.privileged)
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            keep = err_pipe_w
            os.closerange(3, keep)
            os.closerange(keep + 1, 65536)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            if not self.spec.privileged:
                confine.apply()  # last: the filter and the kept capabilities are what the command gets
            os.execvpe(self.spec.argv[0], list(self.spec.argv), container_env(self.spec))
        except BaseException as e:  # report to the shim through the close-on-exec pipe
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            what = f"cannot start {self.spec.argv[0]!r}: {msg}" if isinstance(e, OSError) else msg
            try:
                os.write(err_pipe_w, what.encode())
            finally:
                os._exit(127)

    def restore(self, snapshot: Path, lazy: bool = False, tcp_close: bool = False) -> int:
        meta = json.loads((snapshot / CHECKPOINT_META).read_text())
        out_w, err_w = self._pipes()
        inherit = []
        for key, fd in ((meta["pipes"].get("stdout"), out_w), (meta["pipes"].get("stderr"), err_w)):
            if key and key not in (k for k, _ in inherit):
                inherit.append((key, fd))
        criu = Criu()
        opts = RestoreOptions(
            root=str(self.rootfs),
            external=tuple(f"mnt[{v.criu_key}]:{v.host_path}" for v in self.spec.volumes),
            inherit_fds=tuple(inherit),
            lazy_pages=lazy,
            tcp_close=tcp_close,
            # no TCP connection in the images: nothing for CRIU's nftables lock to release (~10 ms)
            network_lock=bool(tcp_images(snapshot / "images")) or not criu.can_skip_network_lock(),
        )
        # CRIU restores from inside the container's cgroups, so that what it restores is born
        # there; the limits follow once it has exited: its own memory (about 50 MB to restore
        # a shell) and CPU time are not the container's, and would OOM-kill it or throttle it
        self.cgroups.set_limits(Limits())
        try:
            pid = criu.restore(opts, snapshot / "images", on_spawn=self.cgroups.add)
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            self.cgroups.set_limits(self.spec.limits)
        except BaseException:
            self.cgroups.kill()  # a container its limits cannot hold does not go on
            raise
        return pid

    # supervising it
    def supervise(self, init_pid: int, fence_fd: int | None = None,
                  fence_holds: Callable[[], bool] = lambda: True,
                  scheduler: Scheduler | None = None) -> tuple[int, bool]:
        """Copy output to the log until init exits; returns init's exit code and whether the
        container was fenced: with fence_fd (the go pipe of a migration's restore), EOF there
        before the commit byte means whoever restored it is gone: unless `fence_holds()` says
        the migration committed meanwhile (the agent decided, then died before telling us),
        this copy must not run on (the source resumes), and the tree is killed at once.
        The scheduler, if any, starts scheduled snapshots on time meanwhile."""
        on_other = scheduler.reaped if scheduler is not None else None
        log = os.open(self.dir / "container.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        sel = selectors.DefaultSelector()
        for fd in self.readers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if fence_fd is not None:
            sel.register(fence_fd, selectors.EVENT_READ)
        exit_code = None
        drain_until = None
        fenced = False
        lost = 0  # bytes of output the log could not take (a full disk)
        while any(k.fd != fence_fd for k in sel.get_map().values()):
            for key, _ in sel.select(timeout=0.1):
                if key.fd == fence_fd:
                    sel.unregister(fence_fd)
                    if os.read(fence_fd, 1) != COMMIT and fence_holds():
                        fenced = True
                        self.cgroups.kill()
                    fence_fd = None
                    continue
                data = os.read(key.fd, 65536)
                if data:
                    lost = _append(log, data, lost)
                else:
                    sel.unregister(key.fd)
                    os.close(key.fd)
            if lost:  # tell the loss as soon as there is room, even if nothing more comes
                lost = _append(log, b"", lost)
            if exit_code is None:
                exit_code = _reap(init_pid, on_other)
                if exit_code is not None:
                    drain_until = time.monotonic() + 2.0
                elif scheduler is not None:
                    scheduler.tick(time.time())
            elif time.monotonic() > drain_until:
                break  # a leaked writer elsewhere must not keep us alive
        while exit_code is None:
            exit_code = _reap(init_pid, on_other)
            time.sleep(0.05)
        if fence_fd is not None and not fenced:  # it ended before the commit: no commit may follow
            fenced = fence_holds()
        _reap_all()
        os.close(log)
        return exit_code, fenced

    def teardown(self) -> None:
        rootfs.unmount_all(self.rootfs)
        self.cgroups.leave()
        self.cgroups.remove()


def _append(log: int, data: bytes, lost: int) -> int:
    """Output into the log. A write that fails (a full disk) drops it and counts it: the
    container runs on (its output is read all the same, so it never blocks or dies of SIGPIPE)
    and the log says how much is missing as soon as it can take a line again. Returns the
    bytes lost and not yet told."""
    try:
        if lost:
            os.write(log, f"\n[migrate: {lost} bytes of output were lost here: the log could not be written]\n".encode())
            lost = 0
        if data:
            os.write(log, data)
    except OSError:
        lost += len(data)
    return lost


def _reap(init_pid: int, on_other: Callable[[int], None] | None = None) -> int | None:
    """Reap any finished children (we are a subreaper); return init's exit code once it is gone.
    Every other child reaped is told to on_other (the scheduled snapshot's worker)."""
    result = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return result if result is not None else (0 if not _alive(init_pid) else None)
        if pid == 0:
            return result
        if pid == init_pid:
            result = os.waitstatus_to_exitcode(status)
            result = 128 - result if result < 0 else result
        elif on_other is not None:
            on_other(pid)


def _reap_all() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.05)
        except ChildProcessError:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _drop_preloaded(name: str, migration: str) -> None:
    """A migration's target record that its agent will never have restored (the agent ended,
    or died, before the restore): nothing else would remove it if the agent died."""
    root = StateRoot.from_env()
    catalog = Catalog(root.db)
    try:
        with catalog.transaction():
            rec = catalog.find_container(name)
            if rec is None or rec.state != states.CREATED or rec.migration != migration:
                return
            catalog.remove_container(name)
        shutil.rmtree(root.container_dir(name), ignore_errors=True)  # nothing is mounted before the go
    finally:
        catalog.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.shim")
    ap.add_argument("mode", choices=("start", "restore"))
    ap.add_argument("name")
    ap.add_argument("--status-fd", type=int, required=True)
    ap.add_argument("--snapshot", type=Path)
    ap.add_argument("--lazy", action="store_true", help="memory pages come from `criu lazy-pages`")
    ap.add_argument("--tcp-close", action="store_true", help="restore connections to the outside closed")
    ap.add_argument("--migration", metavar="ID",
                    help="a migration's restore, fenced: the container is killed if the go pipe ends "
                         "before a commit byte, unless the journal says that migration committed")
    args = ap.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        # a handler, not SIG_IGN: ignored signals would be inherited by criu and the container
        signal.signal(sig, lambda *_: None)
    linux.set_child_subreaper()
    with contextlib.suppress(MigrateError):  # without pycriu, a restore reports it after the go
        _rpc()  # import pycriu before the go: it is part of the start-up we keep out of the downtime
        Criu().can_skip_network_lock()  # and ask CRIU its version
    if not os.read(sys.stdin.fileno(), 1):  # unbuffered: a fenced shim reads its commit byte later
        if args.migration:
            _drop_preloaded(args.name, args.migration)
        return 0
    root = StateRoot.from_env()
    catalog = Catalog(root.db)
    status = os.fdopen(args.status_fd, "w")
    shim = Shim(root, catalog, args.name)
    try:
        shim.prepare()
        if args.mode == "start":
            pid = shim.start()
            catalog.transition(args.name, "start", pid=pid, shim_pid=os.getpid(), started=time.time())
        else:
            pid = shim.restore(args.snapshot, args.lazy, args.tcp_close)
            # STARTED is the container's first start, kept across restores and moves (the
            # target of a move gets it with the record); only a record without one starts now
            started = catalog.container(args.name).started or time.time()
            catalog.transition(args.name, "restore-done", pid=pid, shim_pid=os.getpid(), started=started)
    except Exception as e:
        if not isinstance(e, MigrateError):
            traceback.print_exc()
        _safe(shim.teardown)
        code = e.exit_code if isinstance(e, MigrateError) else 1
        verdict = {"ok": False, "error": str(e), "exit_code": code}
        if isinstance(e, CriuError):  # its log is in the snapshot or incoming folder: keep a copy
            kept = criulogs.keep_failed(root, args.name, e)
            if kept.log is not None:
                verdict.update(error=kept.detail, criu_log=str(kept.log))
        _report(status, verdict)
        return 1
    # whoever started us may be gone by now (an agent killed during the restore): a fenced
    # container then sees the end of its go pipe at once in supervise() and is killed there
    faults.point("restored")
    _report(status, {"ok": True, "pid": pid})
    code, fenced = shim.supervise(pid, fence_fd=sys.stdin.fileno() if args.migration else None,
                                  fence_holds=lambda: _abort_unless_committed(catalog, args.name, args.migration),
                                  scheduler=Scheduler(catalog, args.name, time.time()))
    _safe(shim.teardown)
    if fenced:  # it never became this host's container: no record, no folder remains of it
        if catalog.remove_if_state(args.name, states.RUNNING):
            shutil.rmtree(shim.dir, ignore_errors=True)
        return 0
    catalog.update_if_state(args.name, states.RUNNING, state=states.EXITED, exit_code=code,
                            finished=time.time(), pid=None, shim_pid=None)
    return 0


def _abort_unless_committed(catalog: Catalog, name: str, migration: str) -> bool:
    """The journal's one decision, taken here if nobody took it yet: True when the migration is
    (now) aborted and this copy must go. A commit its agent decided and did not live to tell
    us about is completed here."""
    if catalog.journal.decide(migration, journal.TARGET, journal.ABORTED) != journal.COMMITTED:
        return True
    catalog.set_fields(name, migration=None)
    catalog.journal.finish(migration, journal.TARGET)
    return False


def _report(status, verdict: dict) -> None:
    """The verdict to whoever started us; that it is gone must not kill the supervisor."""
    with contextlib.suppress(OSError):
        status.write(json.dumps(verdict) + "\n")
        status.flush()
    with contextlib.suppress(OSError):
        status.close()


def _safe(fn) -> None:
    try:
        fn()
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
