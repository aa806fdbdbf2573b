"""What a host can say about itself before a migration: read here, compared by the controller.

The same function answers for the local host and, through `migrate agent`, for the remote one,
so both sides of a preflight are measured the same way.
"""

import os
import socket
import subprocess
import tempfile
from pathlib import Path

from .cgroups import HostCgroups, controllers
from .criu import Criu
from .errors import CriuError
from .paths import StateRoot

PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
LAZY_PIPE_SIZE = 4 * 1024 * 1024
MEMINFO = Path("/proc/meminfo")


def host_facts(root: StateRoot, containers: list[str], layers: list[str]) -> dict:
    facts: dict = {
        "hostname": socket.gethostname(),
        "root": str(root.root),
        "layers": layers,
        "containers": containers,
        "free_bytes": _free_bytes(root.root),
        "mem_available": meminfo("MemAvailable"),
        "pipe_max_size": int(PIPE_MAX_SIZE.read_text()),
        "cgroup_controllers": controllers(HostCgroups.of_this_host()),
    }
    try:
        criu = Criu()
    except CriuError as e:
        facts.update(criu_version=None, criu_ok=False, criu_message=str(e), lazy_pages=False)
        return facts
    ok, message = criu.check()
    facts.update(criu_version=criu.version(), criu_ok=ok, criu_message=message,
                 lazy_pages=criu.has_feature("uffd-noncoop"), dirty_tracking=criu.has_feature("mem_dirty_track"))
    return facts


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def meminfo(key: str) -> int | None:
    """A /proc/meminfo figure in bytes, such as MemAvailable (what `migrate drain` places
    containers by); None where the kernel has none."""
    for line in MEMINFO.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    return None


def cpuinfo_dump(criu: Criu) -> bytes:
    """This CPU's description as CRIU records it (cpuinfo.img), for the other host to check."""
    with tempfile.TemporaryDirectory() as d:
        _run([criu.binary, "cpuinfo", "dump", "-D", d])
        return (Path(d) / "cpuinfo.img").read_bytes()


def cpuinfo_check(criu: Criu, image: bytes) -> tuple[bool, str]:
    """Can processes dumped on the CPU described by `image` run here?"""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "cpuinfo.img").write_bytes(image)
        p = subprocess.run([criu.binary, "cpuinfo", "check", "-D", d], capture_output=True,
                           text=True, timeout=60)
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "rlimit" not in ln and ln.strip()]
        return p.returncode == 0, (lines[-1].strip() if lines else "")


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise CriuError(f"{' '.join(argv[1:3])} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
