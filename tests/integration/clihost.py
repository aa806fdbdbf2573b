"""Driving the real `migrate` CLI as a subprocess against one state root, and the checks the
integration tests share. The fixtures that use this are in conftest.py."""

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime import linux
from runtime.cgroups import Cgroups
from runtime.linux import proc_gone, proc_identity  # noqa: F401 - the tests import them from here
from runtime.paths import INTERNAL_ERRORS, StateRoot

CLI_TIMEOUT = 120.0  # no single CLI call in these tests may take longer
BUSYBOX = Path("/bin/busybox")
IMAGE = "busybox:latest"
COUNTER = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"
TIMINGS_FILE = Path("/tmp/migrate-integration-timings.txt")
DEBIAN_IMAGE = "debian12-services:latest"  # tests/images/build-debian-services; fixture debian_image


def _cli() -> list[str]:
    """The installed `migrate` entry point next to this Python, else `python -m migrate.cli`."""
    script = Path(sys.executable).parent / "migrate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "migrate.cli"]


def wait_until(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll fn until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def kill_leftover(pid: int, leaks: list[str]) -> None:
    """SIGKILL a leaked process by PID and wait until it is gone; one that stays is a leak too."""
    ident = proc_identity(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        wait_until(lambda: proc_gone(ident), 10, f"killed pid {pid} to go")
    except AssertionError as e:
        leaks.append(str(e))


def counter_numbers(text: str) -> list[int]:
    """The numbers of complete lines (a last line without newline may still be being written)."""
    lines = text.split("\n")[:-1]
    return [int(x) for x in lines]


def assert_consecutive(nums: list[int], start: int = 1) -> None:
    expected = list(range(start, start + len(nums)))
    if nums != expected:
        bad = next(i for i, (a, b) in enumerate(zip(nums, expected, strict=True)) if a != b)
        raise AssertionError(f"numbers are not consecutive from {start}: at line {bad + 1} got "
                             f"{nums[max(0, bad - 3):bad + 4]} (expected {expected[bad]})")


def record_timing(label: str, **values) -> None:
    """Print a measurement (visible with pytest -s) and append it to TIMINGS_FILE."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {label} " + " ".join(f"{k}={v}" for k, v in values.items())
    print(line)
    with open(TIMINGS_FILE, "a") as f:
        f.write(line + "\n")


@dataclass
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str
    seconds: float

    def __str__(self) -> str:
        return f"$ migrate {' '.join(self.argv)}\n-> rc {self.rc}\nstdout: {self.out!r}\nstderr: {self.err!r}"


class MigrateHost:
    """One state root, driven through the CLI."""

    # What runs "on this host" starts with this: nothing here (this machine's own namespaces);
    # a test host's HostCLI enters that host's network and UTS namespaces.
    prefix: list[str] = []

    def __init__(self, root: Path, work: Path):
        self.root = root
        self.work = work  # scratch space for images, volumes, programs
        self.state = StateRoot(root)
        self.env = {**os.environ, "MIGRATE_ROOT": str(root)}
        self.env.pop("MIGRATE_DEBUG", None)

    # running the CLI
    def run(self, *args: str, env: dict | None = None, timeout: float = CLI_TIMEOUT) -> Result:
        argv = [str(a) for a in args]
        t0 = time.monotonic()
        proc = subprocess.run([*_cli(), *argv], env={**self.env, **(env or {})}, cwd=self.work,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        return Result(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)

    def failure_logs(self, label: str = "") -> str:
        """On failure, what the shims said and the ends of the CRIU logs kept from failed
        dumps and restores: they rarely reach the CLI's one-line error."""
        parts = []
        for pattern, keep in (("containers/*/shim.log", 3000), ("criu-logs/*.log", 4000),
                              (INTERNAL_ERRORS, 6000)):
            for log in sorted(self.root.glob(pattern)):
                text = log.read_text(errors="replace").strip()
                if text:
                    parts.append(f"--- {label}{log}\n{text[-keep:]}")
        return "\n".join(parts)

    def ok(self, *args: str, **kw) -> Result:
        r = self.run(*args, **kw)
        assert r.rc == 0, str(r)
        return r

    def fails(self, rc: int, *args: str, **kw) -> Result:
        """The call fails with exit code rc and exactly one line of error, no traceback."""
        r = self.run(*args, **kw)
        assert r.rc == rc, str(r)
        assert "Traceback" not in r.err and "Traceback" not in r.out, str(r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("migrate"), str(r)
        return r

    def json(self, *args: str):
        return json.loads(self.ok(*args, "--json").out)

    # looking at the result
    def ps(self) -> dict[str, dict]:
        return {c["name"]: c for c in json.loads(self.ok("ps", "--json").out)}

    def container(self, name: str) -> dict:
        return self.ps()[name]

    def logs(self, name: str) -> str:
        return self.ok("logs", name).out

    def catalog(self, table: str = "containers") -> dict[str, dict]:
        """Rows of a catalog table straight from SQLite, keyed by their first column."""
        if not self.state.db.exists():
            return {}
        db = sqlite3.connect(str(self.state.db), timeout=30)
        try:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute(f"SELECT * FROM {table}")]
        finally:
            db.close()
        for r in rows:
            if "cgroups" in r:
                r["cgroups"] = json.loads(r["cgroups"])
        return {next(iter(r.values())): r for r in rows}

    def record(self, name: str) -> dict:
        return self.catalog()[name]

    def snapshot_of_state(self) -> dict:
        """What a failed command must leave unchanged: catalog rows and the folders of the root."""

        def names(p: Path) -> list[str]:
            return sorted(os.listdir(p)) if p.is_dir() else []

        containers = {n: sorted(names(self.state.container_dir(n))) for n in names(self.state.containers)}
        return {
            "containers": self.catalog("containers"),
            "images": self.catalog("images"),
            "snapshots": self.catalog("snapshots"),
            "container_dirs": containers,
            "snapshot_dirs": names(self.state.snapshots),
            "layers": names(self.state.layers),
            "tmp": names(self.state.tmp),
            "mounts": linux.mounts_under(str(self.root)),
        }

    def wait_log(self, name: str, pred: Callable[[str], bool], timeout: float = 20, what: str = "") -> str:
        holder = {}

        def check():
            holder["text"] = self.logs(name)
            return pred(holder["text"])

        try:
            wait_until(check, timeout, what or f"the log of {name}", interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}; log tail: {holder.get('text', '')[-300:]!r}") from None
        return holder["text"]

    def wait_count(self, name: str, at_least: int, timeout: float = 20) -> list[int]:
        """Wait until the counter in name's log reached at_least; returns all its numbers."""
        text = self.wait_log(name, lambda t: len(counter_numbers(t)) >= at_least and
                             counter_numbers(t)[-1] >= at_least, timeout, f"{name} to count to {at_least}")
        return counter_numbers(text)

    def import_busybox(self, archive: Path) -> None:
        self.ok("image", "import", archive)

    # running things on the host itself (its network namespace), beside its containers
    def host_run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *argv], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def host_python(self, code: str, *args: str, timeout: float = 30) -> str:
        """Run Python code on this host (in its network namespace, where its containers listen);
        returns its stdout, fails the test with its stderr."""
        p = self.host_run([sys.executable, "-c", code, *map(str, args)], timeout=timeout)
        assert p.returncode == 0, f"python on the host failed (rc {p.returncode}): {p.stderr.strip()[-2000:]}"
        return p.stdout

    def tcp_states(self, port: int) -> list[str]:
        """States of this host's TCP sockets (IPv4 and IPv6) with PORT at either end."""
        return self.host_python(_TCP_STATES, port).split()

    def wait_connections_closed(self, port: int, timeout: float = 10) -> None:
        """Wait until no connection to or from PORT is open any more (only a listener and
        TIME_WAIT remain): a container holding a connection to the outside is not dumpable."""
        holder = {}

        def closed() -> bool:
            holder["states"] = self.tcp_states(port)
            return set(holder["states"]) <= {"LISTEN", "TIME_WAIT"}

        try:
            wait_until(closed, timeout, f"the connections on port {port} to close", interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}: {holder.get('states')}") from None

    # cleaning up
    def cgroup_parents(self) -> list[str]:
        """This root's per-root cgroup folder in every hierarchy (containers live below it)."""
        planned = Cgroups.plan(self.state.cgroup_parent, "x").paths
        return sorted({str(Path(p).parents[1]) for p in planned.values()})

    def teardown(self) -> list[str]:
        """Remove everything; returns what had to be removed by force (leaks of the runtime)."""
        leaks: list[str] = []
        for name in self.catalog():
            try:
                r = self.run("rm", "-f", name, timeout=90)
                if r.rc != 0:
                    leaks.append(f"`migrate rm -f {name}` failed: {r.err.strip()}")
            except subprocess.TimeoutExpired:
                leaks.append(f"`migrate rm -f {name}` timed out")
        leaks += self._kill_leftovers()
        errors = self.root / INTERNAL_ERRORS
        if errors.exists():  # the CLI said "internal error" (a bug), whatever the test expected
            leaks.append(f"internal errors, kept in {errors}:\n{errors.read_text()[-4000:]}")
        for point in linux.mounts_under(str(self.root)):
            leaks.append(f"mount left behind: {point}")
            try:
                linux.umount(point, linux.MNT_DETACH)
            except OSError as e:
                leaks.append(f"cannot unmount {point}: {e}")
        if not linux.mounts_under(str(self.root)):
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            leaks.append(f"{self.root} kept: mounts remain below it")
        return leaks

    def _procs_of_root(self) -> set[int]:
        """Live processes in this root's cgroups, or started with its MIGRATE_ROOT (shims, criu, CLIs)."""
        pids: set[int] = set()
        for parent in self.cgroup_parents():
            for dirpath, _dirs, _files in os.walk(parent):
                try:
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
                except (FileNotFoundError, ValueError):
                    pass
        marker = f"MIGRATE_ROOT={self.root}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.add(int(entry))
            except OSError:
                pass
        return {p for p in pids if not proc_gone(proc_identity(p))}

    def _kill_leftovers(self) -> list[str]:
        leaks = []
        for _ in range(3):  # processes may fork while we kill; a few rounds settle it
            pids = self._procs_of_root()
            if not pids:
                break
            for pid in pids:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = "?"
                leaks.append(f"process left behind: {pid} {cmd.strip()[:120]}")
                kill_leftover(pid, leaks)
        for parent in self.cgroup_parents():
            if not os.path.isdir(parent):
                continue
            leaks.append(f"cgroup left behind: {parent}")
            for dirpath, _dirs, _files in sorted(os.walk(parent), key=lambda w: -len(w[0])):
                try:
                    wait_until(lambda d=dirpath: _rmdir(d), 10, f"cgroup {dirpath} to empty")
                except AssertionError as e:
                    leaks.append(str(e))
        return leaks


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def checksums(text: str) -> list[str]:
    return re.findall(r"^sum ([0-9a-f]{16})$", text, re.MULTILINE)


_TCP_STATES = r"""
import sys
port = int(sys.argv[1])
names = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
         7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(path).read().splitlines()[1:]
    except FileNotFoundError:
        continue
    for line in lines:
        f = line.split()
        if port in (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)):
            print(names.get(int(f[3], 16), f[3]))
"""

_FREE_PORTS = r"""
import socket, sys
for p in sys.argv[1:]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", int(p)))  # no SO_REUSEADDR: a port in TIME_WAIT counts as taken
        print(p)
    except OSError:
        pass
    finally:
        s.close()
"""


def free_port(*hosts: MigrateHost) -> int:
    """A TCP port free on 127.0.0.1 of every given host, below the ephemeral range (32768-60999
    here), so ports the tool and CRIU pick by binding port 0 never collide with it."""
    candidates = random.sample(range(20000, 32000), 40)
    free = set(candidates)
    for h in hosts:
        free &= {int(p) for p in h.host_python(_FREE_PORTS, *map(str, candidates)).split()}
    port = next((p for p in candidates if p in free), None)
    assert port is not None, f"none of {candidates} is free on every host"
    return port


def static_program(folder: Path, name: str, source: str) -> Path:
    """SOURCE (C) compiled statically into FOLDER/NAME, so it runs in any image."""
    (folder / f"{name}.c").write_text(source)
    p = subprocess.run(["gcc", "-static", "-O2", "-o", str(folder / name), str(folder / f"{name}.c")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"gcc failed (./scripts/setup installs gcc and libc6-dev): {p.stderr}"
    return folder / name
