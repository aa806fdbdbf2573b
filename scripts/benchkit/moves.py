"""The ways the benchmark moves its container from host-a to host-b: the tool (copy, lazy) and
by hand, as a user without the tool would.

By hand (the baseline), on the tool's own container, so both move the very same thing:
  1. rsync the upper dir to host-b while it runs (what a careful user does first; the tool
     does it too, so the baseline is not made slow on purpose);
  2. `criu dump -t PID` to disk on host-a, with the options the tool gives CRIU through RPC
     (runtime/criu.py: --tcp-established --file-locks --skip-in-flight --network-lock
     nftables --manage-cgroups=ignore; the container has no volumes, so no --external);
  3. one rsync of the images and the upper dir (its last changes) over OpenSSH with
     aes128-gcm, the cipher the tool's rsync uses (a fresh login: no ControlMaster);
  4. one ssh login to host-b that mounts an overlay of the image's layers (imported there
     beforehand, like a pulled image) and the copied upper dir, and runs
     `criu restore -d --root` on it.
The container's frozen time is then dump start to restore end. Its copy on host-b is not
supervised by anything (an orphan of init); it is killed and unmounted afterwards.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from migrate.testhosts import TestHosts
from runtime.layers import LayerStore
from runtime.linux import pid_running
from runtime.paths import StateRoot

from . import workload

MIGRATE = [sys.executable, "-m", "migrate.cli"]
SOURCE, TARGET = "host-a", "host-b"
CIPHER = "aes128-gcm@openssh.com"
CRIU_COMMON = ("--tcp-established", "--file-locks", "--network-lock", "nftables", "--manage-cgroups=ignore",
               "-v4")
RSYNC_FLAGS = ("-aHAX", "--numeric-ids", "--stats")
READY_TICKS = 100  # 0.5 s of timestamps: memory filled, files written, ticking


class BenchError(RuntimeError):
    """A step of one trial failed; the trial is recorded as failed and the run goes on."""


def run(hosts: TestHosts, host: str, argv: list[str], timeout: float = 300, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    """ARGV as if on HOST (its namespaces and MIGRATE_ROOT, no login); BenchError if it fails."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.run(hosts.local_argv(host, *argv), env={**hosts.local_env(host), **(env or {})}, capture_output=True,
                       text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise BenchError(f"`{shlex.join(argv[-6:])}` on {host} failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-800:]}")
    return p


def migrate(hosts: TestHosts, host: str, *args: str, timeout: float = 300) -> str:
    return run(hosts, host, [*MIGRATE, *args], timeout=timeout).stdout


def ssh_argv(hosts: TestHosts) -> list[str]:
    """OpenSSH as a user would call it, with this set's config and the tool's cipher."""
    return ["ssh", "-F", str(hosts.ssh_config), "-c", CIPHER]


def tool_ticks(hosts: TestHosts, host: str, name: str) -> Path:
    return StateRoot(hosts[host].root).container_dir(name) / "upper" / workload.TICKS


def start(hosts: TestHosts, name: str, size_mib: int, touch: bool, timeout: float = 120) -> None:
    """Run the workload on host-a and wait until it ticks."""
    migrate(hosts, SOURCE, "run", "--name", name, workload.IMAGE, *workload.argv(size_mib, touch))
    ticks = tool_ticks(hosts, SOURCE, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ticks.exists() and ticks.read_bytes().count(b"\n") >= READY_TICKS:
            return
        state = json.loads(migrate(hosts, SOURCE, "inspect", name))["state"]
        if state != "running":
            raise BenchError(f"the workload {name} is {state} before it ticked: "
                             f"{migrate(hosts, SOURCE, 'logs', name).strip()[-300:]}")
        time.sleep(0.2)
    raise BenchError(f"the workload {name} did not start ticking within {timeout:.0f} s")


def move_tool(hosts: TestHosts, name: str, mode: str) -> dict:
    """`migrate NAME host-b --mode MODE --json` on host-a (MODE-direct: with --direct); its statistics."""
    mode, _, direct = mode.partition("-")
    return json.loads(migrate(hosts, SOURCE, name, TARGET, "--mode", mode, "--json", *(["--direct"] if direct else [])))


def remove_tool(hosts: TestHosts, name: str) -> None:
    """`rm -f` the container wherever the tool has a record of it (best effort)."""
    for host in (SOURCE, TARGET):
        subprocess.run(hosts.local_argv(host, *MIGRATE, "rm", "-f", name), env=hosts.local_env(host),
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


@dataclass
class ByHand:
    """The baseline's folders: the dump on host-a, the copy on host-b (under the test hosts'
    base, so their teardown unmounts and removes whatever a failed trial left)."""

    hosts: TestHosts
    name: str
    criu: str

    @property
    def here(self) -> Path:
        return self.hosts.base / "by-hand" / SOURCE / self.name

    @property
    def there(self) -> Path:
        return self.hosts.base / "by-hand" / TARGET / self.name

    @property
    def ticks(self) -> Path:
        return self.there / "upper" / workload.TICKS

    def move(self) -> dict:
        """Move the running container by hand; times of its steps and the frozen time."""
        info = json.loads(migrate(self.hosts, SOURCE, "inspect", self.name))
        spec = info["spec"]
        if spec.get("volumes"):
            raise BenchError("the by-hand baseline does not handle volumes (no --external given)")
        upper = StateRoot(self.hosts[SOURCE].root).container_dir(self.name) / "upper"
        images = self.here / "images"
        images.mkdir(parents=True)
        self.there.mkdir(parents=True)  # as `mkdir` on host-b: one filesystem here
        layers = LayerStore(StateRoot(self.hosts[TARGET].root).layers)
        lowers = ":".join(str(layers.path_of(d)) for d in reversed(spec["layers"]))
        rsync = ["rsync", *RSYNC_FLAGS, "-e", shlex.join(ssh_argv(self.hosts))]
        phases = {}
        started = time.monotonic()
        t = time.monotonic()
        run(self.hosts, SOURCE, [*rsync, str(upper), f"{TARGET}:{self.there}/"])
        phases["upper sync (running)"] = time.monotonic() - t
        frozen = time.monotonic()
        run(self.hosts, SOURCE, [self.criu, "dump", "-t", str(info["pid"]), "-D", str(images), "-o", "dump.log",
                                 "--skip-in-flight", *CRIU_COMMON])
        phases["dump"] = time.monotonic() - frozen
        t = time.monotonic()
        run(self.hosts, SOURCE, [*rsync, str(images), str(upper), f"{TARGET}:{self.there}/"])
        phases["sync (frozen)"] = time.monotonic() - t
        t = time.monotonic()
        rootfs, work = self.there / "rootfs", self.there / "work"
        remote = " && ".join(shlex.join(c) for c in (
            ["mkdir", "-p", str(rootfs), str(work)],
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers},upperdir={self.there / 'upper'},"
             f"workdir={work}", str(rootfs)],
            [self.criu, "restore", "-d", "-D", str(self.there / "images"), "-o", "restore.log", "--root",
             str(rootfs), "--pidfile", str(self.there / "pid"), *CRIU_COMMON],
        ))
        run(self.hosts, SOURCE, [*ssh_argv(self.hosts), TARGET, remote])
        now = time.monotonic()
        phases["login, mount, restore"] = now - t
        return {"downtime_s": now - frozen, "total_s": now - started, "phases_s": phases,
                "bytes": _size(images) + _size(upper)}

    def clean(self) -> None:
        """Kill the restored copy, unmount its root, drop the dump's network lock table on host-a
        and the container's record there (its shim saw it end at the dump). Best effort."""
        pidfile = self.there / "pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().strip() or 0)
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while pid_running(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
        subprocess.run(["umount", "-l", str(self.there / "rootfs")], capture_output=True)
        tables = subprocess.run(self.hosts.local_argv(SOURCE, "nft", "list", "tables", "inet"),
                                capture_output=True, text=True)
        for line in tables.stdout.splitlines():
            table = line.split()[-1] if line.startswith("table inet CRIU-") else ""
            if table:
                subprocess.run(self.hosts.local_argv(SOURCE, "nft", "delete", "table", "inet", table),
                               capture_output=True)
        remove_tool(self.hosts, self.name)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.here), str(self.there)], capture_output=True)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
