"""Container lifecycle on one host: run, stop, rm, exec, logs, ps.

The CLI calls these; the shim (runtime/shim.py) does the supervising. Each function opens the
catalog, checks the state machine, acts, and leaves the catalog consistent even when it fails.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import linux, rootfs, states
from .cgroups import Cgroups
from .errors import Conflict, CriuError, InvalidInput, MigrateError, NotFound, error_for
from .layers import LayerStore
from .paths import StateRoot
from .reconcile import owner_alive, reconcile, sweep_snapshots, sweep_transfers, unsupervised
from .shim import COMMIT, container_env
from .spec import DRAIN_POLICIES, ContainerSpec, Limits, Schedule, Volume, validate_name
from .store import Catalog, ContainerRecord

SHIM_TIMEOUT = 120.0


@dataclass(frozen=True)
class RunRequest:
    name: str
    image: str
    command: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    working_dir: str | None = None
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    schedule: Schedule | None = None  # leave-running snapshots on time (runtime/schedule.py)
    drain_policy: str | None = None  # one of spec.DRAIN_POLICIES; None: `migrate drain --policy` decides
    privileged: bool = False  # not confined (runtime/confine.py)


class Runtime:
    """The containers of one host (one state root)."""

    def __init__(self, root: StateRoot | None = None):
        self.root = root or StateRoot.from_env()
        self.root.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.catalog = Catalog(self.root.db)
        self.layers = LayerStore(self.root.layers)

    def close(self) -> None:
        self.catalog.close()

    def reconcile(self) -> list[str]:
        """Settle records that operations which died left behind: adopt the snapshots they
        published, remove their unfinished folders (runtime/reconcile.py)."""
        notes = sweep_snapshots(self.root, self.catalog)
        notes += reconcile(self.root, self.catalog, self.release, self.discard)
        return notes + sweep_transfers(self.root, self.catalog)

    # creating and starting
    def build_spec(self, req: RunRequest) -> ContainerSpec:
        validate_name(req.name)
        image = self.catalog.image(req.image)
        cfg = image.config
        argv = tuple(cfg.get("entrypoint") or ()) + (req.command or tuple(cfg.get("cmd") or ()))
        if not argv:
            raise InvalidInput(f"image {image.name} has no default command: give one after the image name")
        for e in req.env:
            if "=" not in e or not e.split("=", 1)[0]:
                raise InvalidInput(f"invalid environment variable {e!r}: use KEY=VALUE")
        volumes = tuple(Volume.parse(v) for v in req.volumes)
        for v in volumes:
            if not os.path.exists(v.host_path):
                raise NotFound(f"volume source {v.host_path} does not exist")
        if req.cpus is not None and req.cpus <= 0:
            raise InvalidInput("--cpus must be positive")
        if req.pids is not None and req.pids <= 0:
            raise InvalidInput("--pids must be positive")
        if req.drain_policy not in (None, *DRAIN_POLICIES):
            raise InvalidInput(f"invalid drain policy {req.drain_policy!r}: use {', '.join(DRAIN_POLICIES)}")
        working_dir = req.working_dir or cfg.get("working_dir") or "/"
        if not working_dir.startswith("/"):
            raise InvalidInput(f"working directory must be absolute: {working_dir}")
        return ContainerSpec(
            name=req.name, image=image.name, image_id=image.id, layers=image.layers, argv=argv,
            env=tuple(cfg.get("env") or ()) + req.env, working_dir=working_dir, volumes=volumes,
            limits=Limits(memory_bytes=req.memory, cpus=req.cpus, pids=req.pids), schedule=req.schedule,
            drain_policy=req.drain_policy, privileged=req.privileged,
        )

    def run(self, req: RunRequest) -> ContainerRecord:
        spec = self.build_spec(req)
        self.require_layers(spec)
        self.create_record(spec)
        try:
            self.spawn_shim(spec.name, "start")
        except MigrateError:
            self.discard(spec.name)
            raise
        return self.catalog.container(spec.name)

    def require_layers(self, spec: ContainerSpec) -> None:
        for digest in spec.layers:
            if not self.layers.has(digest):
                raise NotFound(f"layer {digest} of {spec.image} is missing from the layer store")

    def create_record(self, spec: ContainerSpec, state: str = states.CREATED) -> None:
        """Catalog entry and folders: the parts a start or restore builds on."""
        self.catalog.add_container(spec, state)
        cdir = self.root.container_dir(spec.name)
        try:
            cdir.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            self.catalog.remove_container(spec.name)
            raise Conflict(f"leftover directory {cdir} is in the way: remove it first") from None
        for sub in ("upper", "work", "rootfs"):
            (cdir / sub).mkdir()

    def spawn_shim(self, name: str, mode: str, snapshot: Path | None = None, lazy: bool = False,
                   tcp_close: bool = False) -> int:
        """Start the detached shim and wait for its verdict; returns the init PID."""
        return self.launch_shim(name, mode, snapshot, lazy, tcp_close).go()

    def launch_shim(self, name: str, mode: str, snapshot: Path | None = None, lazy: bool = False,
                    tcp_close: bool = False, migration: str | None = None) -> "LaunchedShim":
        """Start the shim's interpreter now; it builds or restores the container on `go()`.
        tcp_close: a restore brings connections to the outside back closed. migration: the
        restore of that migration's target, fenced: the container runs on only once `commit()`
        is called; if this process (or the LaunchedShim) goes before, the shim kills it unless
        the journal says the migration committed: a target copy never outlives an agent that
        did not commit it."""
        cdir = self.root.container_dir(name)
        # made anew for every start and restore, on this host: never a path recorded elsewhere
        cgroups = Cgroups.plan(self.root.cgroup_parent, name)
        launcher = cgroups.launcher(f"migrate container {name} ({self.root.root})")
        self.catalog.set_fields(name, cgroups=cgroups.paths)
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        argv = [*launcher, sys.executable, "-m", "runtime.shim", mode, name, "--status-fd", str(status_w)]
        if snapshot is not None:
            argv += ["--snapshot", str(snapshot)]
        if lazy:
            argv.append("--lazy")
        if tcp_close:
            argv.append("--tcp-close")
        if migration is not None:
            argv += ["--migration", migration]
        try:
            with open(cdir / "shim.log", "ab") as shim_log:
                proc = subprocess.Popen(
                    argv, pass_fds=(status_w,), start_new_session=True, cwd="/",
                    stdin=go_r, stdout=shim_log, stderr=subprocess.STDOUT,
                    env={**os.environ, "MIGRATE_ROOT": str(self.root.root)},
                )
        except BaseException:
            os.close(status_r)
            os.close(go_w)
            raise
        finally:
            os.close(status_w)
            os.close(go_r)
        return LaunchedShim(name, proc, status_r, go_w, cdir / "shim.log", migration is not None)

    # stopping and removing
    def stop(self, name: str, timeout: float = 10.0) -> ContainerRecord:
        rec = self.catalog.container(name)
        states.check("stop", rec.state, name)
        if unsupervised(rec):
            # unsupervised (its shim died): nobody would record an exit, so it is ended here
            # (killed by PID) and recorded as what it is now: lost
            self.release(name)
            return self.catalog.transition(name, "lost", pid=None, shim_pid=None)
        linux.send_signal(rec.pid, signal.SIGTERM)
        if not self.wait_for_exit(name, timeout):
            linux.send_signal(rec.pid, signal.SIGKILL)
            if not self.wait_for_exit(name, 30):
                raise MigrateError(f"{name} did not stop after SIGKILL (init pid {rec.pid})")
        return self.catalog.container(name)

    def wait_for_exit(self, name: str, timeout: float) -> bool:
        """True once the shim has recorded the exit and is gone."""
        deadline = time.monotonic() + timeout
        shim = self.catalog.container(name).shim_pid
        while time.monotonic() < deadline:
            rec = self.catalog.container(name)
            # the shim clears its PID with the exit it records, then still has to exit itself
            shim = rec.shim_pid or shim
            if rec.state != states.RUNNING and not (shim and linux.pid_running(shim)):
                return True
            time.sleep(0.05)
        return False

    def remove(self, name: str, force: bool = False) -> None:
        rec = self.catalog.container(name)
        if rec.state == states.RUNNING and force:
            self.stop(name, timeout=0)
            rec = self.catalog.container(name)
        states.check("remove", rec.state, name)
        self.discard(name)

    def await_snapshot(self, name: str, timeout: float = SHIM_TIMEOUT) -> None:
        """A snapshot under way (a scheduled one, most often) ends in a moment: an operation
        waits for it rather than being refused. Returns at once otherwise, and after `timeout`
        in any case (the operation then meets the state machine as usual)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.snapshot_under_way(self.catalog.find_container(name)):
            time.sleep(0.05)

    def take(self, name: str, action: str, timeout: float = SHIM_TIMEOUT, **fields) -> ContainerRecord:
        """Begin `action` on NAME (its state-machine transition), waiting out a snapshot under
        way in the same loop: a wait that returned before the transition would leave room for
        the next scheduled snapshot to begin in between."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.catalog.transition(name, action, **fields)
            except Conflict:
                if time.monotonic() >= deadline or not self.snapshot_under_way(self.catalog.find_container(name)):
                    raise
            time.sleep(0.05)

    @staticmethod
    def snapshot_under_way(rec: ContainerRecord | None) -> bool:
        """A live process is writing a snapshot of it (it runs on, or stops, in a moment)."""
        return rec is not None and rec.state == states.CHECKPOINTING and owner_alive(rec.owner)

    def set_schedule(self, name: str, schedule: Schedule | None) -> ContainerRecord:
        """Change when NAME's snapshots are taken; its shim sees it within a second. Refused
        while another host or a restore is deciding what the container is."""
        with self.catalog.transaction():
            rec = self.catalog.container(name)
            if rec.state in (states.MIGRATING, states.RESTORING, states.IN_DOUBT):
                hint = f"; run `migrate recover {name}`" if rec.state == states.IN_DOUBT else ""
                raise Conflict(f"cannot schedule {name}: it is {rec.state}{hint}")
            self.catalog.set_fields(name, spec=replace(rec.spec, schedule=schedule).to_json())
        return self.catalog.container(name)

    def release(self, name: str) -> None:
        """Free a container's kernel resources after a failed start or restore: processes left in
        its cgroups (killed by PID), mounts under its folder, the cgroups themselves."""
        rec = self.catalog.find_container(name)
        cgroups = Cgroups(rec.cgroups) if rec is not None else None
        if cgroups is not None:
            cgroups.kill()
        rootfs.unmount_all(self.root.container_dir(name))
        if cgroups is not None:
            cgroups.remove()

    def discard(self, name: str) -> None:
        """Remove every trace of a container that has no running process."""
        self.release(name)
        shutil.rmtree(self.root.container_dir(name), ignore_errors=True)
        self.catalog.remove_container(name)

    # looking inside
    def exec(self, name: str, command: list[str], env: tuple[str, ...] = ()) -> int:
        rec = self.catalog.container(name)
        states.check("exec", rec.state, name)
        if not command:
            raise InvalidInput("exec needs a command")
        cgroups = Cgroups(rec.cgroups)
        full_env = container_env(rec.spec) | dict(e.split("=", 1) for e in env)
        # a program of the host enters (the container's PATH only finds the command inside it)
        argv = [sys.executable, "-m", "runtime.nsexec", *(f"--env={k}={v}" for k, v in full_env.items()),
                *(["--privileged"] if rec.spec.privileged else []), str(rec.pid), "--", *command]
        proc = subprocess.run(argv, preexec_fn=lambda: cgroups.add(os.getpid()))
        return proc.returncode

    def log_path(self, name: str) -> Path:
        self.catalog.container(name)
        return self.root.container_dir(name) / "container.log"

    def follow_log(self, name: str, out, follow: bool) -> None:
        path = self.log_path(name)
        live = (states.RUNNING, states.RESTORING, states.MIGRATING, states.CHECKPOINTING)
        f = None
        try:
            while True:
                if f is None and path.exists():  # the shim creates it only after `run` returned
                    f = open(path, "rb")
                data = f.read(65536) if f else b""
                if data:
                    out.write(data)
                    out.flush()
                    continue
                if not follow:
                    return
                if self.catalog.container(name).state not in live:
                    # the shim writes the last output before it records the exit: read it too
                    if f is None and path.exists():
                        f = open(path, "rb")
                    if f:
                        out.write(f.read())
                        out.flush()
                    return
                time.sleep(0.1)
        finally:
            if f:
                f.close()

    def usage(self, rec: ContainerRecord) -> int | None:
        return Cgroups(rec.cgroups).memory_usage() if rec.state == states.RUNNING else None


@dataclass
class LaunchedShim:
    """A shim whose interpreter runs but which has not started work: `go()` or `cancel()` it."""

    name: str
    proc: subprocess.Popen
    status_r: int
    go_w: int
    log: Path
    fenced: bool = False
    started: bool = False

    def go(self) -> int:
        """Let it build or restore the container; returns the init PID once it runs."""
        self.started = True
        try:
            os.write(self.go_w, b"g")
        except BrokenPipeError:
            pass  # it died already: reported below
        finally:
            if not self.fenced:
                self._close_go()
        line = _read_line(self.status_r, SHIM_TIMEOUT)
        if not line:
            self.proc.kill()
            self.proc.wait()
            raise MigrateError(f"the shim of {self.name} died before reporting (see {self.log})")
        verdict = json.loads(line)
        if not verdict["ok"]:
            self.proc.wait(timeout=30)
            if verdict.get("criu_log"):  # a failed restore: the shim kept CRIU's log there
                raise CriuError(verdict["error"], log=verdict["criu_log"])
            raise error_for(verdict.get("exit_code", 1), verdict["error"])
        return int(verdict["pid"])

    def commit(self) -> None:
        """A fenced shim's container is this host's now: it runs on whatever happens to us."""
        try:
            os.write(self.go_w, COMMIT)
        except OSError as e:
            raise MigrateError(f"the shim of {self.name} is gone ({e.strerror})") from None
        finally:
            self._close_go()

    def cancel(self) -> None:
        """It was not needed: EOF on its go pipe makes it exit at once, and a fenced one that
        was started kills its container first. Returns once it has gone."""
        self._close_go()
        if not self.started:
            self.started = True
            os.close(self.status_r)
        elif not self.fenced:
            return  # it supervises a container of this host: nothing to wait for
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _close_go(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)
            self.go_w = -1


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(fd)
    return buf.decode(errors="replace").strip()


