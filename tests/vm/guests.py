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


def boot_and_install(names: tuple[str, ...], src: Path) -> dict[str, str]:
    """`vmhosts up`, then the checkout in SRC copied to /root/migrate on each and its setup
    run there (in parallel, pip offline from the wheelhouse). Returns each guest's setup output."""
    wheels = wheelhouse()
    if not guests_up():
        subprocess.run([str(VMHOSTS), "up", str(len(names))], check=True, timeout=1200,
                       stdin=subprocess.DEVNULL, capture_output=True)

    def install(name: str) -> str:
        for what, dest in ((src, "/root/src"), (wheels, "/root/wheels")):
            subprocess.run([str(VMHOSTS), "copy", name, str(what), dest], check=True, timeout=600,
                           capture_output=True)
        guest = Guest(name)
        # the checkout as it is here, the venv a setup made there before kept (so reused guests are quick)
        guest.ok("rsync -a --delete --exclude /.venv /root/src/ /root/migrate/")
        guest.ok("usermod -p '*' root")  # a locked root (Debian's '!') is refused by sshd: host-b logs in to host-a
        return guest.ok("cd /root/migrate && PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheels ./scripts/setup",
                        timeout=SETUP_TIMEOUT)

    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(install, names), strict=True))


def guests_up() -> bool:
    p = subprocess.run([str(VMHOSTS), "status"], capture_output=True, text=True, timeout=60)
    return " running " in p.stdout


def shut_down() -> None:
    subprocess.run([str(VMHOSTS), "down"], timeout=300, capture_output=True, stdin=subprocess.DEVNULL)
