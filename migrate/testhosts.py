"""Several SSH-reachable "hosts" on this one machine, for integration tests, the demo and benchmarks.

Each host is a network namespace on a private bridge, running its own sshd with its own host
key, its own hostname (a UTS namespace that lives as long as its sshd and sessions), and its own
MIGRATE_ROOT and HOME (set by sshd's SetEnv, with MIGRATE_CONFIG pointing at this set's tool
config, so every command run there sees them; a private HOME also keeps this machine's
~/.bashrc, ~0.1 s per command here, out of remote commands).
A client ssh config, known_hosts and key are written beside them and into each host's
$HOME/.ssh, and MIGRATE_SSH_CONFIG names that config there, so the code under test, here or on
any of the hosts, reaches `host-b` by name exactly as it would a real machine. (OpenSSH reads
the passwd home, /root/.ssh, not $HOME: hence MIGRATE_SSH_CONFIG, which the tool gives ssh as -F.)

Every name carries a random suffix, so parallel or leftover runs never clash. Teardown always
runs (explicitly, via `with`, or at exit) and removes everything it made; sshd is killed by pid
and waited for by us, its parent, because PID 1 here reaps orphans slowly.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from migrate.hosts import HostSpec, resolve_host
from runtime.linux import pid_running

SSHD = "/usr/sbin/sshd"
_LOCK = "/run/migrate-testhosts.lock"
_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SSHD_CONFIG = """\
ListenAddress {ip}
Port 22
AddressFamily inet
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized_keys}
StrictModes no
UsePAM no
UseDNS no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
MaxStartups 100:30:200
MaxSessions 100
PrintMotd no
SetEnv MIGRATE_ROOT={root} HOME={home} MIGRATE_CONFIG={tool_config} MIGRATE_SSH_CONFIG={home}/.ssh/config
"""
_CLIENT_HOST = """\
Host {name}
    HostName {ip}
    Port 22
    User root
    IdentityFile {key}
    IdentitiesOnly yes
    UserKnownHostsFile {known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
"""


@dataclass(frozen=True)
class TestHost:
    """One test host as the tests see it."""

    __test__ = False  # not a pytest test class

    name: str
    ip: str
    root: Path
    home: Path
    netns: str
    veth: str
    sshd_pid: int
    host_key: str
    sshd_log: Path


class TestHosts:
    """N hosts on one bridge; a context manager whose exit (or `teardown()`) removes them all."""

    __test__ = False

    def __init__(
        self,
        n: int = 2,
        *,
        names: Sequence[str] | None = None,
        remote_command: Sequence[str] | None = None,
    ):
        """REMOTE_COMMAND, if given, goes into the tool config as each host's `command`."""
        if os.geteuid() != 0:
            raise PermissionError("test hosts need root")
        names = list(names) if names is not None else [f"host-{c}" for c in string.ascii_lowercase[:n]]
        if len(names) != n or len(set(names)) != n or not 0 < n <= 200:
            raise ValueError(f"need 1..200 distinct names for {n} hosts, got {names}")
        bad = [name for name in names if not _NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"test host names must be short lowercase DNS labels: {bad}")
        self.suffix = secrets.token_hex(3)
        self.bridge = f"mgbr{self.suffix}"
        self.base = Path(tempfile.mkdtemp(prefix=f"mgth-{self.suffix}-"))
        self.ssh_config = self.base / "ssh_config"
        self.known_hosts = self.base / "known_hosts"
        self.tool_config = self.base / "config.toml"
        self.client_key = self.base / "client_key"
        self.hosts: dict[str, TestHost] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._netns: list[str] = []
        self._veths: list[str] = []
        self._bridge_made = False
        self._torn_down = False
        atexit.register(self.teardown)
        started = time.monotonic()
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            _keygen(self.client_key)
            network = self._make_bridge()
            for index, name in enumerate(names):
                self._make_host(index, name, str(network[index + 2]))
            self._write_client_files(remote_command)
        except BaseException:
            self.teardown(check=False)
            raise
        self.setup_seconds = time.monotonic() - started

    def __getitem__(self, name: str) -> TestHost:
        return self.hosts[name]

    def __iter__(self) -> Iterator[TestHost]:
        return iter(self.hosts.values())

    def __enter__(self) -> TestHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def spec(self, name: str) -> HostSpec:
        """NAME resolved through this set's own ssh config and tool config only."""
        return resolve_host(name, ssh_config=self.ssh_config, tool_config=self.tool_config)

    def client_entry(self, alias: str, name: str, **options: str) -> str:
        """An ssh_config `Host ALIAS` block reaching host NAME with this set's key and known_hosts.
        OPTIONS (ssh_config keywords) come first, so they win over those defaults."""
        host = self.hosts[name]
        lines = [f"    {key} {value}\n" for key, value in options.items()]
        default = _CLIENT_HOST.format(name=alias, ip=host.ip, key=self.client_key, known_hosts=self.known_hosts)
        first, _, rest = default.partition("\n")
        return "".join([first + "\n", *lines, rest])

    def env(self) -> dict[str, str]:
        """Environment for a `migrate` subprocess that should see exactly these hosts."""
        return {"MIGRATE_SSH_CONFIG": str(self.ssh_config), "MIGRATE_CONFIG": str(self.tool_config)}

    def local_argv(self, name: str, *argv: str) -> list[str]:
        """ARGV run on this machine as if on host NAME without an SSH login (no login cost in
        what a script times): in its network and UTS namespaces. Give it `local_env(NAME)`."""
        return ["nsenter", f"--target={self.hosts[name].sshd_pid}", "--net", "--uts", "--", *argv]

    def local_env(self, name: str) -> dict[str, str]:
        """This process's environment with host NAME's MIGRATE_ROOT and these hosts' configs."""
        return {**os.environ, **self.env(), "MIGRATE_ROOT": str(self.hosts[name].root)}

    def teardown(self, check: bool = True) -> None:
        """Remove everything; each step runs even if an earlier one failed. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        atexit.unregister(self.teardown)
        started = time.monotonic()
        errors: list[str] = []
        for name, proc in self._procs.items():
            _attempt(errors, f"stop sshd of {name}", _stop, proc)
        for netns in self._netns:
            _attempt(errors, f"kill processes in {netns}", _kill_netns_processes, netns)
        for veth in self._veths:
            _attempt(errors, f"delete {veth}", _ip_delete, ["link", "del", veth])
        for netns in self._netns:
            _attempt(errors, f"delete netns {netns}", _ip_delete, ["netns", "del", netns])
        if self._bridge_made:
            _attempt(errors, f"delete {self.bridge}", _ip_delete, ["link", "del", self.bridge])
        _attempt(errors, f"remove {self.base}", _remove_tree, self.base)
        self.teardown_seconds = time.monotonic() - started
        if errors and check:
            raise RuntimeError("test host teardown incomplete: " + "; ".join(errors))
        for error in errors:
            print(f"testhosts: {error}", file=sys.stderr)

    def _make_bridge(self) -> ipaddress.IPv4Network:
        """Create the bridge on a 10.250.X.0/24 that no interface or route here uses yet."""
        with open(_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            network = _free_subnet()
            _ip("link", "add", self.bridge, "type", "bridge")
            self._bridge_made = True
            _ip("addr", "add", f"{network[1]}/{network.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return network

    def _make_host(self, index: int, name: str, ip: str) -> None:
        netns = f"mgth-{self.suffix}-{name}"
        veth = f"mgv{self.suffix}{index}"
        _ip("netns", "add", netns)
        self._netns.append(netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._veths.append(veth)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")

        host_dir = self.base / name
        root = host_dir / "root"
        home = host_dir / "home"
        root.mkdir(parents=True)
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        host_key = host_dir / "ssh_host_ed25519_key"
        _keygen(host_key)
        config = host_dir / "sshd_config"
        config.write_text(
            _SSHD_CONFIG.format(
                ip=ip, host_key=host_key, authorized_keys=f"{self.client_key}.pub", root=root, home=home,
                tool_config=self.tool_config,
            )
        )
        log = host_dir / "sshd.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    "nsenter", f"--net=/run/netns/{netns}", "unshare", "--uts", "--",
                    "/bin/sh", "-c", 'hostname "$0" && exec "$@"', name, SSHD, "-D", "-e", "-f", str(config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[name] = proc
        _wait_listening(proc, log, ip)
        public = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
        self.hosts[name] = TestHost(name, ip, root, home, netns, veth, proc.pid, public, log)

    def _write_client_files(self, remote_command: Sequence[str] | None) -> None:
        self.known_hosts.write_text("".join(f"{h.ip} {h.host_key}\n" for h in self))
        self.ssh_config.write_text("\n".join(self.client_entry(h.name, h.name) for h in self))
        for host in self:
            shutil.copyfile(self.ssh_config, host.home / ".ssh" / "config")
        tables = ""
        if remote_command is not None:
            command = ", ".join(json.dumps(a) for a in remote_command)  # JSON strings are TOML strings
            tables = "".join(f'[hosts."{h.name}"]\ncommand = [{command}]\n\n' for h in self)
        self.tool_config.write_text(tables)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _ip_delete(args: list[str]) -> None:
    """Delete, treating "already gone" as done (a veth dies with its namespace)."""
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    gone = "Cannot find device" in result.stderr or "No such file" in result.stderr
    if result.returncode != 0 and not gone:
        raise RuntimeError(result.stderr.strip())


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "migrate-testhosts", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.250.X.0/24 overlapping no address or route in the root namespace."""
    used = []
    for args in (["-4", "-o", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        for line in subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout.splitlines():
            for word in line.split():
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(word, strict=False))
    candidates = [ipaddress.ip_network(f"10.250.{x}.0/24") for x in range(256)]
    random.shuffle(candidates)
    for network in candidates:
        if not any(network.overlaps(u) for u in used if u.prefixlen > 0):
            return network
    raise RuntimeError("no free 10.250.X.0/24 subnet for test hosts")


def _wait_listening(proc: subprocess.Popen, log: Path, ip: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    needle = f"Server listening on {ip} port 22".encode()
    while needle not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd for {ip} did not start: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.005)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs in NETNS (sessions outliving sshd), found by namespace identity."""
    try:
        ns = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return
    victims = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
            pid = int(entry)
            try:
                os.kill(pid, signal.SIGKILL)
                victims.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while (alive := [p for p in victims if pid_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    if alive:
        raise RuntimeError(f"processes {alive} in {netns} survived SIGKILL")


def _remove_tree(base: Path) -> None:
    """rmtree BASE, but only after unmounting whatever the tests mounted inside it.

    rmtree would descend into a bind mount and delete what it shows.
    """
    for mount in sorted(_mounts_under(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    left = _mounts_under(base)
    if left:
        raise RuntimeError(f"still mounted, not removed: {', '.join(left)}")
    shutil.rmtree(base, ignore_errors=False)


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [p for p in points if p.startswith(prefix) or p == str(base)]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _attempt(errors: list[str], what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # teardown must go on; the error is reported at the end
        errors.append(f"{what}: {e}")
