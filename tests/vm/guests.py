"""Two real Debian 12 machines (../shared/vmhosts: QEMU guests with systemd, pure cgroup v2,
kernel 6.1), each with this checkout installed by its own ./scripts/setup, driven over SSH.

Setup in a guest is slow mostly because pip runs under TCG; the wheels it needs are fetched
once on this machine (cached by the hash of pyproject.toml) and installed there offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VMHOSTS = REPO.parent / "shared" / "vmhosts" / "vmhosts"
CACHE = Path("/var/cache/migrate-tests")
SETUP_TIMEOUT = 1500
GUEST_ROOT = "/var/lib/migrate"


class Guest:
    """One guest, reached with `vmhosts on NAME CMD` (a root SSH login, as a lab user's)."""

    def __init__(self, name: str):
        self.name = name

    def sh(self, command: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        p = subprocess.run([str(VMHOSTS), "on", self.name, command], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"{self.name}$ {command}\n-> rc {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def login(self, command: str) -> subprocess.Popen:
        """COMMAND in an SSH login of its own (vmhosts' `on` shares one connection, so one
        session, between all its commands): its own systemd session scope there."""
        config = Path(os.environ.get("VMHOSTS_DIR", "/var/tmp/vmhosts"), "run", "ssh_config")
        return subprocess.Popen(["ssh", "-F", str(config), "-o", "ControlPath=none", self.name, command],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def ok(self, command: str, timeout: float = 300) -> str:
        return self.sh(command, timeout, check=True).stdout

    def migrate(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.sh("migrate " + shlex.join(args), timeout)

    def ps(self) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(self.ok("migrate ps --json"))}

    def record(self, name: str) -> dict:
        """The catalog row (cgroups, shim PID), read from the guest's SQLite catalog."""
        code = ("import json, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.row_factory = sqlite3.Row; "
                "row = db.execute('SELECT * FROM containers WHERE name = ?', (sys.argv[2],)).fetchone(); "
                "print(json.dumps(dict(row) if row else None))")
        row = json.loads(self.ok(shlex.join(["python3", "-c", code, f"{GUEST_ROOT}/state.db", name])))
        if row is not None:
            row["cgroups"] = json.loads(row["cgroups"])
        return row

    def cgroup_of(self, pid: int) -> str:
        return self.ok(f"cat /proc/{int(pid)}/cgroup").strip()

    def wait(self, fn, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while True:
            got = fn()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out after {timeout} s waiting for {what}")
            time.sleep(interval)


def wheelhouse() -> Path:
    """Wheels for pyproject.toml's dependencies (and the build backend), downloaded once."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    out = CACHE / f"wheels-{key}"
    if (out / ".complete").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    tmp.mkdir(parents=True)
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["test"],
              *project["build-system"]["requires"], "wheel"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "-d", str(tmp), *wanted], check=True, timeout=600)
    (tmp / ".complete").touch()
    tmp.rename(out)
    return out


HOST_PACKAGES = ("linux-image-amd64", "qemu-system-x86", "qemu-utils", "e2fsprogs", "debootstrap")


def install_host_packages() -> None:
    """What vmhosts needs on this machine: QEMU, debootstrap, and Debian 12's 6.1 kernel (the
    guests boot it; this machine's own kernel stays the one it runs)."""
    listed = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *HOST_PACKAGES],
                            capture_output=True, text=True).stdout
    have = {line.split()[0] for line in listed.splitlines() if line.endswith(" installed")}
    missing = [p for p in HOST_PACKAGES if p not in have]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "-qq", "update"], ["apt-get", "-qq", "install", "-y", "--no-install-recommends", *missing]):
        p = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {p.stderr.strip()[-2000:]}")


def boot_and_install(names: tuple[str, ...], src: Path) -> dict[str, str]:
    """`vmhosts up`, then the checkout in SRC copied to /root/migrate on each and its setup
    run there (in parallel, pip offline from the wheelhouse). Returns each guest's setup output."""
    wheels = wheelhouse()
    apt_dates = registry_apt_settings()
    if not guests_up():
        install_host_packages()
        shut_down()  # what a run that was killed left (its namespace, taps, run folder) is in the way of `up`
        p = subprocess.run([str(VMHOSTS), "up", str(len(names))], timeout=1200, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"vmhosts up {len(names)} failed: {(p.stdout + p.stderr).strip()[-3000:]}")

    def install(name: str) -> str:
        for what, dest in ((src, "/root/src"), (wheels, "/root/wheels")):
            subprocess.run([str(VMHOSTS), "copy", name, str(what), dest], check=True, timeout=600,
                           capture_output=True)
        guest = Guest(name)
        # the checkout as it is here, the venv a setup made there before kept (so reused guests are quick)
        guest.ok("rsync -a --delete --exclude /.venv /root/src/ /root/migrate/")
        guest.ok("usermod -p '*' root")  # a locked root (Debian's '!') is refused by sshd: host-b logs in to host-a
        if apt_dates:  # the guests reach the registry this machine does, with its apt settings for it
            guest.ok(f"printf '%s\\n' {shlex.join(apt_dates)} >/etc/apt/apt.conf.d/99migrate-tests")
        return guest.ok("cd /root/migrate && PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheels ./scripts/setup",
                        timeout=SETUP_TIMEOUT)

    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(install, names), strict=True))


def registry_apt_settings() -> list[str]:
    """This machine's apt settings on the dates of Release files (a registry that serves a
    frozen copy of Debian sets them), as apt.conf lines."""
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in dump if line.split(" ")[0] in ("Acquire::Check-Valid-Until", "Acquire::Check-Date")]


def guests_up() -> bool:
    p = subprocess.run([str(VMHOSTS), "status"], capture_output=True, text=True, timeout=60)
    return " running " in p.stdout


def shut_down() -> None:
    subprocess.run([str(VMHOSTS), "down"], timeout=300, capture_output=True, stdin=subprocess.DEVNULL)
