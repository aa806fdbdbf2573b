"""A container's cgroups, on cgroup v1, v2 or the hybrid of both, behind one small interface.

Containers go below the cgroup the tool itself runs in (per hierarchy), so the tool never
escapes the limits it was given. The absolute folders are recorded with the container,
so a later call from elsewhere finds and removes exactly those.
"""

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import linux
from .errors import MigrateError
from .spec import Limits

CPU_PERIOD_US = 100_000
_V1_CONTROLLERS = ("memory", "cpu", "pids")


def _mounts() -> tuple[dict[str, str], str | None]:
    """(v1 controller -> mount point, cgroup2 mount point)."""
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            fstype, _source, options = right.split()[:3]
            if fstype == "cgroup2":
                v2 = point
            elif fstype == "cgroup":
                for opt in options.split(","):
                    if opt in _V1_CONTROLLERS:
                        v1[opt] = point
    return v1, v2


def _own_paths() -> dict[str, str]:
    """Hierarchy key ('memory', 'cpu', ... or '' for cgroup2) -> our cgroup path in it."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                own[c] = path
    return own


@dataclass(frozen=True)
class Cgroups:
    """Folders of one container: hierarchy key -> absolute path ('unified' for cgroup2)."""

    paths: dict

    @classmethod
    def plan(cls, parent: str, name: str) -> "Cgroups":
        v1, v2 = _mounts()
        own = _own_paths()
        paths = {}
        for ctrl, point in v1.items():
            paths[ctrl] = os.path.join(point, own.get(ctrl, "/").lstrip("/"), parent, name)
        if v2 is not None:
            paths["unified"] = os.path.join(v2, own.get("", "/").lstrip("/"), parent, name)
        return cls(paths)

    @property
    def pure_v2(self) -> bool:
        return set(self.paths) == {"unified"}

    def create(self, limits: Limits) -> None:
        for path in self.paths.values():
            os.makedirs(path, exist_ok=True)
        if self.pure_v2:
            self._enable_v2_controllers()
        self._write_limits(limits)

    def _enable_v2_controllers(self) -> None:
        parent = Path(self.paths["unified"]).parent
        available = (parent.parent / "cgroup.subtree_control").read_text().split()
        wanted = [c for c in ("memory", "cpu", "pids") if c in available]
        if wanted:
            (parent / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))

    def _write_limits(self, limits: Limits) -> None:
        writes: list[tuple[str, str, str]] = []
        if self.pure_v2:
            if limits.memory_bytes:
                writes.append(("unified", "memory.max", str(limits.memory_bytes)))
            if limits.cpus:
                writes.append(("unified", "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}"))
            if limits.pids:
                writes.append(("unified", "pids.max", str(limits.pids)))
        else:
            if limits.memory_bytes:
                writes.append(("memory", "memory.limit_in_bytes", str(limits.memory_bytes)))
            if limits.cpus:
                writes.append(("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
                writes.append(("cpu", "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US))))
            if limits.pids:
                writes.append(("pids", "pids.max", str(limits.pids)))
        for key, filename, value in writes:
            if key not in self.paths:
                raise MigrateError(f"cannot apply {filename}: this host has no {key} cgroup controller")
            Path(self.paths[key], filename).write_text(value)

    def add(self, pid: int) -> None:
        for path in self.paths.values():
            Path(path, "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths.values():
            try:
                found.update(int(p) for p in Path(path, "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
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
        try:
            Path(unified, "cgroup.freeze").write_text("1")
            deadline = time.monotonic() + timeout
            while wait and "frozen 1" not in Path(unified, "cgroup.events").read_text().splitlines():
                if time.monotonic() > deadline:
                    raise MigrateError(f"the processes of {unified} did not freeze within {timeout} s")
                time.sleep(0.02)
        except FileNotFoundError:
            pass  # the cgroup is gone, and with it every process it held

    def thaw(self) -> None:
        unified = self.paths.get("unified")
        if unified is None:
            for pid in self.pids():
                linux.send_signal(pid, signal.SIGCONT)
            return
        with contextlib.suppress(FileNotFoundError):  # removed already: nothing is held there
            Path(unified, "cgroup.freeze").write_text("0")

    def memory_usage(self) -> int | None:
        for key, filename in (("memory", "memory.usage_in_bytes"), ("unified", "memory.current")):
            try:
                return int(Path(self.paths[key], filename).read_text())
            except (KeyError, FileNotFoundError, ValueError):
                continue
        return None

    def remove(self, timeout: float = 10.0) -> None:
        """rmdir every folder; tasks that were just killed may take a moment to leave."""
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
            try:  # the per-root parent goes too once its last container is gone
                os.rmdir(os.path.dirname(path))
            except OSError:
                pass

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self.paths.values())
