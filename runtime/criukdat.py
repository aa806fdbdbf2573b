"""CRIU's cache of what it learned about the kernel, made to work where /run is not a tmpfs.

Every CRIU run starts by probing the kernel (a network namespace with a veth pair, ptrace of
a child, the vDSO, ...: 30-60 ms on a loaded 2-core machine) unless /run/criu.kdat holds the
answers of an earlier run. CRIU writes that file only where /run is a tmpfs, so that it is gone
after a reboot (every systemd host). Where /run is a plain folder (machines and containers
without systemd, like the project's test machines) it probes at every run, and a lazy
migration's freeze pays for it three times: the dump, the lazy-pages daemon, the restore.

There the cache is made once per boot: CRIU, run with a private tmpfs on /run, writes it; it
is copied to /run, beside a note of the boot it belongs to. CRIU reads the file from any
filesystem (and removes it itself if another CRIU build wrote it); one of an earlier boot is
removed before any CRIU run of ours, since the kernel may have changed since.
"""

import subprocess
from functools import cache
from pathlib import Path

from . import linux

CACHE = Path("/run/criu.kdat")  # where CRIU looks (fixed when CRIU is built)
BOOT_NOTE = Path("/run/criu.kdat.boot-id")  # ours: the boot the cache was made in
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MAKE_TIMEOUT = 60.0


def ensure(binary: str) -> None:
    """Before a CRIU run: a cache of this boot in place where CRIU does not keep one itself.
    Best effort: without it CRIU probes by itself, as it always did."""
    if run_is_tmpfs():
        return
    boot = _read(BOOT_ID)
    if boot and _read(BOOT_NOTE) == boot and CACHE.exists():
        return
    try:
        CACHE.unlink(missing_ok=True)  # of an earlier boot, or unaccounted for
        made = _make(binary)
        if made:
            linux.write_atomic(CACHE, made, 0o600)
            linux.write_atomic(BOOT_NOTE, boot.encode(), 0o600)
    except (OSError, subprocess.SubprocessError):
        pass


@cache
def run_is_tmpfs() -> bool:
    """Whether /run is a tmpfs (then CRIU keeps its cache there itself): the type of the last
    mount on /run, else of the root's."""
    kinds: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                kinds[fields[4]] = fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return True  # unknown: leave CRIU to itself
    return kinds.get("/run", kinds.get("/")) == "tmpfs"


def _make(binary: str) -> bytes:
    """The cache as CRIU writes it on a tmpfs /run: `criu check` in a mount namespace of its own."""
    script = 'mount -t tmpfs -o size=4m,mode=0755 criu-kdat /run && "$0" check >/dev/null 2>&1; cat /run/criu.kdat'
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, binary],
                       capture_output=True, timeout=MAKE_TIMEOUT, stdin=subprocess.DEVNULL)
    return p.stdout if p.returncode == 0 else b""


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
