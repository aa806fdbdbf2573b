"""A container's cgroups, on cgroup v1, v2 or the hybrid of both, in a place of the tool's own.

Never below the caller's cgroup: an SSH login's session scope is systemd's, may not have
controllers enabled below it, and is killed with everything in it when the session ends. So
the place is chosen from the host alone (`plan`, a pure function of its mounts and of whether
systemd runs), made anew on this host at every start and restore, and recorded with the
container so later calls from anywhere find exactly those folders:

- where PID 1 is systemd: one transient scope per container, `migrate.slice/GROUP-NAME.scope`,
  delegated to us (`Delegate=yes`), started around the shim by `systemd-run --scope`. When its
  last process ends, systemd removes the scope and everything below it.
- elsewhere (and for cgroup v1 hierarchies, which systemd does not delegate): a fixed folder
  GROUP/NAME at the top of each hierarchy, GROUP being `migrate` (or one per state root, so
  test hosts sharing a kernel never clash; MIGRATE_CGROUP_ROOT names another: paths.py).

Either folder (the scope, or GROUP/NAME) holds two leaves: `shim`, where the shim moves itself,
and `container`, for the container's processes, so that controllers can be enabled on the
folder (cgroup v2 allows no processes beside child cgroups that have them) and the limits
bind the container alone.
"""

import contextlib
import errno
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import linux
from .errors import Conflict, MigrateError
from .spec import Limits

CPU_PERIOD_US = 100_000
SLICE = "migrate.slice"
# the controllers the limits use, in v1 and v2 alike; on v2 enabled wherever available, so `ps`
# shows memory use without a limit
_CONTROLLERS = ("memory", "cpu", "pids")
SHIM_LEAF, CONTAINER_LEAF = "shim", "container"


@dataclass(frozen=True)
class HostCgroups:
    """What decides where cgroups go on a host: its cgroup mounts, and whether systemd runs."""

    v1: dict  # controller -> mount point
    v2: str | None  # the cgroup2 mount point (pure v2, or hybrid's /sys/fs/cgroup/unified)
    systemd: bool

    @classmethod
    def of_this_host(cls) -> "HostCgroups":
        with open("/proc/self/mountinfo") as f:
            v1, v2 = parse_mounts(f.read())
        return cls(v1, v2, systemd_runs())


def controllers(host: HostCgroups) -> list[str]:
    """The limit controllers containers can have here: v1 hierarchies, or cgroup2's own where
    there are no v1 ones (on hybrid hosts cgroup2 has none)."""
    found = set(host.v1)
    if host.v2 is not None and not host.v1:
        with contextlib.suppress(OSError):
            found |= set(Path(host.v2, "cgroup.controllers").read_text().split()) & set(_CONTROLLERS)
    return sorted(found)


def parse_mounts(mountinfo: str) -> tuple[dict[str, str], str | None]:
    """(v1 controller -> mount point, cgroup2 mount point) from /proc/self/mountinfo's text."""
    v1: dict[str, str] = {}
    v2 = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if not right:
            continue
        point = left.split()[4]
        fstype, _source, options = right.split()[:3]
        if fstype == "cgroup2":
            v2 = point
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in _CONTROLLERS:
                    v1[opt] = point
    return v1, v2


def systemd_runs() -> bool:
    """PID 1 is systemd (sd_booted's test) and systemd-run is there to ask it for a scope.
    MIGRATE_CGROUP_MANAGER=cgroupfs (or systemd) overrides what is found."""
    forced = os.environ.get("MIGRATE_CGROUP_MANAGER")
    if forced in ("cgroupfs", "systemd"):
        return forced == "systemd"
    return os.path.isdir("/run/systemd/system") and shutil.which("systemd-run") is not None


def plan(host: HostCgroups, group: str, name: str) -> "Cgroups":
    """The folders of container NAME on HOST: hierarchy key ('unified' for cgroup2) -> the
    absolute folder its processes go to. A pure function: the same host, the same answer."""
    paths = {ctrl: os.path.join(point, group, name, CONTAINER_LEAF) for ctrl, point in host.v1.items()}
    if host.v2 is not None:
        base = os.path.join(SLICE, f"{group}-{name}.scope") if host.systemd else os.path.join(group, name)
        paths["unified"] = os.path.join(host.v2, base, CONTAINER_LEAF)
    return Cgroups(paths)


@dataclass(frozen=True)
class Cgroups:
    """Folders of one container: hierarchy key -> absolute path ('unified' for cgroup2)."""

    paths: dict

    @classmethod
    def plan(cls, group: str, name: str) -> "Cgroups":
        return plan(HostCgroups.of_this_host(), group, name)

    @property
    def pure_v2(self) -> bool:
        return set(self.paths) == {"unified"}

    @property
    def scope(self) -> Path | None:
        """The systemd scope the container lives in, if it does."""
        unified = self.paths.get("unified")
        parent = Path(unified).parent if unified is not None else None
        return parent if parent is not None and parent.name.endswith(".scope") else None

    def launcher(self, description: str) -> list[str]:
        """argv prefix that starts the shim in the container's scope (none without systemd).
        A scope left by the container's previous run is waited for: systemd removes an empty
        one a moment after its last process ends."""
        scope = self.scope
        if scope is None:
            return []
        self._wait_gone(scope)
        return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={scope.name}", f"--slice={SLICE}",
                "--property=Delegate=yes", f"--description={description}", "--"]

    @staticmethod
    def _wait_gone(scope: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while scope.exists():
            events = _read(scope / "cgroup.events")
            if events is None:
                return
            if "populated 1" in events:
                pids = sorted(_procs_below(scope))[:5]
                raise Conflict(f"systemd unit {scope.name} of an earlier run still has processes "
                               f"({', '.join(map(str, pids))}): stop it with `systemctl stop {scope.name}`")
            if time.monotonic() > deadline:
                raise MigrateError(f"systemd did not remove the empty unit {scope.name} within {timeout:.0f} s")
            time.sleep(0.05)

    def create(self) -> None:
        """Make the folders and turn the controllers on, limits not yet (set_limits). Run by
        the shim, which first moves itself to the `shim` leaf: out of its caller's cgroup, and
        out of the way of the controllers."""
        for path in self.paths.values():
            shim_leaf = Path(path).parent / SHIM_LEAF
            shim_leaf.mkdir(parents=True, exist_ok=True)
            (shim_leaf / "cgroup.procs").write_text(str(os.getpid()))
            os.makedirs(path, exist_ok=True)
        unified = self.paths.get("unified")
        if unified is not None:
            scope = self.scope
            top = scope if scope is not None else Path(unified).parents[2]  # what is ours to write to
            self._enable_v2_controllers(top, Path(unified))

    def leave(self) -> None:
        """The shim, about to end, moves to the top of each hierarchy of ours, so that its
        folders can go (a scope is systemd's: it goes when the shim has ended)."""
        host = HostCgroups.of_this_host()
        for key in self.paths:
            top = host.v2 if key == "unified" else host.v1.get(key)
            if top is not None and not (key == "unified" and self.scope is not None):
                with contextlib.suppress(OSError):
                    Path(top, "cgroup.procs").write_text(str(os.getpid()))

    @staticmethod
    def _enable_v2_controllers(top: Path, leaf: Path) -> None:
        """From TOP down to LEAF's parent, each available controller of the wanted ones on."""
        chain = [top, *reversed([p for p in leaf.parents if top in p.parents])]
        for folder in chain:
            available = (folder / "cgroup.controllers").read_text().split()
            for controller in (c for c in _CONTROLLERS if c in available):
                # one by one: one that cannot be enabled (cpu, with realtime tasks about) must
                # not cost the others; a limit that needs it fails clearly when it is written
                with contextlib.suppress(OSError):
                    (folder / "cgroup.subtree_control").write_text("+" + controller)

    def set_limits(self, limits: Limits) -> None:
        """Exactly LIMITS: each one set is written (an error where the host cannot apply it),
        each one unset is lifted (a folder left by an earlier run may still hold it). Swap is
        kept to the limit where the kernel accounts it, so a container past its memory limit
        is OOM-killed, not swapped out."""
        memory, cpus, pids = limits.memory_bytes, limits.cpus, limits.pids
        # (hierarchy, file, value, required); v1 wants memsw >= memory at every step: memsw is
        # lifted first, then memory is written, then memsw follows it
        writes: list[tuple[str, str, str, bool]] = []
        if self.pure_v2:
            writes += [("unified", "memory.max", str(memory) if memory else "max", bool(memory)),
                       ("unified", "memory.swap.max", "0" if memory else "max", False),
                       ("unified", "cpu.max", f"{int(cpus * CPU_PERIOD_US) if cpus else 'max'} {CPU_PERIOD_US}",
                        bool(cpus)),
                       ("unified", "pids.max", str(pids) if pids else "max", bool(pids))]
        else:
            writes += [("memory", "memory.memsw.limit_in_bytes", "-1", False),
                       ("memory", "memory.limit_in_bytes", str(memory) if memory else "-1", bool(memory))]
            if memory:
                writes.append(("memory", "memory.memsw.limit_in_bytes", str(memory), False))
            writes += [("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), bool(cpus)),
                       ("cpu", "cpu.cfs_quota_us", str(int(cpus * CPU_PERIOD_US)) if cpus else "-1", bool(cpus)),
                       ("pids", "pids.max", str(pids) if pids else "max", bool(pids))]
        for key, filename, value, required in writes:
            target = Path(self.paths[key], filename) if key in self.paths else None
            if target is None or not target.exists():
                if not required:
                    continue
                raise MigrateError(f"cannot apply {filename}: this host has no {filename.split('.')[0]} "
                                   "cgroup controller for containers")
            try:
                target.write_text(value)
            except OSError as e:  # v1 refuses a memory limit below what is in use (EBUSY)
                raise MigrateError(f"cannot write {value} to {target}: {e.strerror}") from None

    def add(self, pid: int) -> None:
        for path in self.paths.values():
            Path(path, "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths.values():
            found.update(int(p) for p in (_read(Path(path, "cgroup.procs")) or "").split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in these cgroups, by PID."""
        for pid in self.pids():
            linux.send_signal(pid, signal.SIGKILL)

    def freeze(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Hold every process where it is (cgroup v2's freezer, also present on hybrid hosts;
        SIGSTOP by PID where there is no cgroup2). A frozen process runs on only when thawed,
        even if whoever held it before (CRIU) lets it go. wait=False for a tree CRIU holds:
        it freezes as CRIU lets each process go."""
        unified = self.paths.get("unified")
        if unified is None:
            for pid in self.pids():
                linux.send_signal(pid, signal.SIGSTOP)
            return
        if not _write(Path(unified, "cgroup.freeze"), "1"):
            return  # the cgroup is gone, and with it every process it held
        deadline = time.monotonic() + timeout
        while wait:
            events = _read(Path(unified, "cgroup.events"))
            if events is None or "frozen 1" in events.splitlines():
                return
            if time.monotonic() > deadline:
                raise MigrateError(f"the processes of {unified} did not freeze within {timeout} s")
            time.sleep(0.02)

    def thaw(self) -> None:
        unified = self.paths.get("unified")
        if unified is None:
            for pid in self.pids():
                linux.send_signal(pid, signal.SIGCONT)
            return
        _write(Path(unified, "cgroup.freeze"), "0")  # if removed already, nothing is held there

    def memory_usage(self) -> int | None:
        for key, filename in (("memory", "memory.usage_in_bytes"), ("unified", "memory.current")):
            text = _read(Path(self.paths[key], filename)) if key in self.paths else None
            with contextlib.suppress(TypeError, ValueError):
                return int(text)
        return None

    def remove(self, timeout: float = 10.0) -> None:
        """rmdir the container's folders; tasks that were just killed may take a moment to
        leave. Then, once empty, the shim's leaf, the container's folder and the group's (a
        scope is systemd's to remove: it does once its last process, the shim, has ended)."""
        deadline = time.monotonic() + timeout
        for path in self.paths.values():
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise MigrateError(f"cannot remove cgroup {path}: {e.strerror}") from None
                    time.sleep(0.05)
            base = Path(path).parent
            if base != self.scope:
                for folder in (base / SHIM_LEAF, base, base.parent):
                    with contextlib.suppress(OSError):  # busy: a shim still in it, or other containers
                        folder.rmdir()

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self.paths.values())


def _gone(e: OSError) -> bool:
    """A cgroup removed meanwhile (by its shim, or another command): ENOENT when its file is
    opened after the rmdir, ENODEV when it was opened just before and is read or written after."""
    return e.errno in (errno.ENOENT, errno.ENODEV)


def _read(path: Path) -> str | None:
    """A cgroup file's text, None if its cgroup is gone."""
    try:
        return path.read_text()
    except OSError as e:
        if _gone(e):
            return None
        raise


def _write(path: Path, value: str) -> bool:
    """Write a cgroup file; False if its cgroup is gone."""
    try:
        path.write_text(value)
        return True
    except OSError as e:
        if _gone(e):
            return False
        raise


def _procs_below(folder: Path) -> set[int]:
    found: set[int] = set()
    for dirpath, _dirs, _files in os.walk(folder):
        with contextlib.suppress(OSError, ValueError):
            found.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return found
