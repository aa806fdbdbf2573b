"""The soak behind ./scripts/soak N: N live migrations back and forth between two local test
hosts of a container that checks its own memory against its own file (copy or lazy mode, the
pages through SSH or by --direct, at random), with random faults
(MIGRATE_FAULTS: the controller or the agent SIGKILLed at a step, the connection cut, an agent
that stops answering) injected into about half of them, `migrate recover` on both hosts after
each. Counts losses (the counter restarted, skipped, or the container gone), duplicates (it
runs on both hosts, or its file disagrees with its memory) and leaks (processes, mounts,
folders left behind), internal errors (bugs the CLI or an agent met, from each host's
internal-errors.log) and failures of `migrate ps`, which a watcher runs on both hosts all
through each migration, as a user watching it would; exits 1 if there is any."""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from migrate.steps import STEPS
from migrate.testhosts import TestHosts
from runtime.imagebuild import build_image, busybox_layer
from runtime.paths import INTERNAL_ERRORS, StateRoot

MIGRATE = [sys.executable, "-m", "migrate.cli"]
NAME = "soak1"
MODES = ("copy", "lazy", "copy-direct", "lazy-direct")  # -direct: with --direct (pages by plain TCP)
# its memory (i) must always equal its file (/state): a restore that brought back one without
# the other, or two copies writing the same file, shows as CHECK lines; ticks show losses
WORKLOAD = ('i=0; while true; do j=$(cat /state 2>/dev/null || echo 0); '
            '[ "$j" = "$i" ] || echo "CHECK file=$j memory=$i"; '
            'i=$((i+1)); echo $i > /state; echo "tick $i"; sleep 0.1; done')
TARGET_STEPS = ("prepare", "layers", "preload", "restore", "memory pages", "commit")


def faults_for(mode: str) -> list[tuple[str, str]]:
    """(side, fault) pairs that this mode can meet."""
    out = []
    for step in (s.name for s in STEPS):
        if step != "memory pages" or mode == "lazy":
            out.append(("source", f"source-{step.replace(' ', '-')}:kill"))
    for step in TARGET_STEPS:
        if step != "memory pages" or mode == "lazy":
            for how in ("kill", "kill-parent"):
                out.append(("target", f"target-{step.replace(' ', '-')}:{how}"))
    out += [("target", "commit-decided:kill"), ("target", "committed:kill"), ("target", "commit:hang"),
            ("source", "sent-commit:kill")]
    return out


class Soak:
    def __init__(self, hosts: TestHosts):
        self.hosts = hosts
        self.counts = {"migrations": 0, "moved": 0, "rolled back": 0, "faults injected": 0,
                       "losses": 0, "duplicates": 0, "leaks": 0, "internal errors": 0, "watch failures": 0}
        self.problems: list[str] = []

    def cli(self, host: str, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.hosts.local_argv(host, *MIGRATE, *args),
                              env={**self.hosts.local_env(host), **(env or {})},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def set_target_faults(self, host: str, faults: str) -> None:
        tables = []
        for h in self.hosts:
            env = {"MIGRATE_FAULTS": faults} if h.name == host and faults else {}
            tables.append(f'[hosts."{h.name}"]\ncommand = {json.dumps(MIGRATE)}\n'
                          + (f'env = {{ "MIGRATE_FAULTS" = {json.dumps(faults)} }}\n' if env else ""))
        self.hosts.tool_config.write_text("\n".join(tables))

    def ps(self, host: str) -> dict:
        r = self.cli(host, "ps", "--json")
        if r.returncode != 0:
            raise RuntimeError(f"ps on {host} failed: {r.stderr.strip()}")
        return {c["name"]: c for c in json.loads(r.stdout)}

    def log(self, host: str) -> str:
        path = self.hosts[host].root / "containers" / NAME / "container.log"
        return path.read_text() if path.exists() else ""

    def problem(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        self.problems.append(f"{kind}: {text}")
        print(f"soak: {kind}: {text}", file=sys.stderr)

    def one(self, i: int, src: str, dst: str, mode: str, fault: tuple[str, str] | None) -> str:
        """One migration; returns where the container runs afterwards."""
        self.counts["migrations"] += 1
        env = {}
        if fault is not None:
            self.counts["faults injected"] += 1
            side, name = fault
            if side == "source":
                env = {"MIGRATE_FAULTS": name}
            else:
                self.set_target_faults(dst, name)
        try:
            base, _, direct = mode.partition("-")
            with Watcher(self, (src, dst)):
                r = self.cli(src, NAME, dst, "--mode", base, *(["--direct"] if direct else []), env=env)
        finally:
            self.set_target_faults(dst, "")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # a CRIU or an agent may still be letting go
            states = [self.ps(h).get(NAME, {}).get("state") for h in (src, dst)]
            if "migrating" not in states:
                break
            time.sleep(0.2)
        for h in (src, dst):
            self.cli(h, "recover")
        where = [h for h in (src, dst) if self.ps(h).get(NAME, {}).get("state") == "running"]
        others = {h: self.ps(h).get(NAME, {}).get("state") for h in (src, dst)}
        what = f"#{i} {src}->{dst} {mode} fault={fault[1] if fault else '-'} rc={r.returncode}"
        if len(where) == 2:
            self.problem("duplicates", f"{what}: it runs on both hosts")
            return src
        if not where:
            self.problem("losses", f"{what}: it runs nowhere ({others}; {r.stderr.strip()[-300:]})")
            return src
        here = where[0]
        other = dst if here == src else src
        if others[other] is not None:
            self.problem("leaks", f"{what}: a {others[other]} record stayed on {other}")
        self.counts["moved" if here == dst else "rolled back"] += 1
        self.check_workload(what, here)
        self.check_leaks(what, here, other)
        self.check_internal_errors(what, (src, dst))
        return here

    def check_workload(self, what: str, host: str) -> None:
        before = len(self.ticks(host))
        deadline = time.monotonic() + 20
        while len(self.ticks(host)) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        ticks = self.ticks(host)
        if len(ticks) < before + 3:
            self.problem("losses", f"{what}: its counter stopped at {ticks[-1:]} on {host}")
        elif ticks != list(range(1, len(ticks) + 1)):
            gaps = [(a, b) for a, b in zip(ticks, ticks[1:], strict=False) if b != a + 1][:3]
            self.problem("losses", f"{what}: its counter jumped or restarted: {gaps}")
        checks = [ln for ln in self.log(host).splitlines() if ln.startswith("CHECK")]
        if checks:
            self.problem("duplicates", f"{what}: its file and memory disagree: {checks[:2]}")

    def ticks(self, host: str) -> list[int]:
        return [int(m.group(1)) for m in re.finditer(r"^tick (\d+)$", self.log(host), re.M)]

    def check_leaks(self, what: str, here: str, other: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.ps(here), self.ps(other)  # each sweeps what a dead agent or controller left
            found = self.leftovers(here, 1) + self.leftovers(other, 0)
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for leak in found:
            self.problem("leaks", f"{what}: {leak}")

    def check_internal_errors(self, what: str, hosts: tuple[str, ...]) -> None:
        """Each internal error is counted once: its log is read and removed."""
        for host in hosts:
            log = self.hosts[host].root / INTERNAL_ERRORS
            if log.exists():
                text = log.read_text(errors="replace")
                log.unlink()
                for entry in text.split("\n--- "):
                    self.problem("internal errors", f"{what}: {host}: {entry.strip()[-600:]}")

    def leftovers(self, host: str, shims: int) -> list[str]:
        root = self.hosts[host].root
        state = StateRoot(root)
        found = [f"{host}: {p} left behind" for p in (state.incoming, state.outgoing) if p.exists()]
        found += [f"{host}: {m} still mounted" for m in _mounts_under(root / "containers")
                  if shims == 0 or f"/{NAME}/" not in m + "/"]
        procs = _procs_with_root(root)
        if len(procs) != shims:
            found.append(f"{host}: {len(procs)} processes of the tool run there, {shims} expected: {procs}")
        return found


class Watcher:
    """A user watching `migrate ps` on both hosts while a migration runs: each call runs every
    host's reconcile beside the live operation, and must answer (a failure is counted)."""

    def __init__(self, soak: Soak, hosts: tuple[str, ...]):
        self.soak, self.hosts = soak, hosts
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ps-watcher", daemon=True)

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)

    def _watch(self) -> None:
        while not self.stop.is_set():
            for host in self.hosts:
                try:
                    r = self.soak.cli(host, "ps", "--json", timeout=60)
                except subprocess.TimeoutExpired:
                    self.soak.problem("watch failures", f"`migrate ps` on {host} did not answer within 60 s")
                    continue
                if r.returncode != 0:
                    self.soak.problem("watch failures", f"`migrate ps` on {host} during a migration: "
                                                        f"rc {r.returncode}: {r.stderr.strip()[-300:]}")
            self.stop.wait(0.1)


def _procs_with_root(root: Path) -> list[str]:
    """Processes of the tool (shims, agents, CRIU) with this MIGRATE_ROOT, but the shim's own
    CRIU-free tree: what should be there is exactly one shim where the container runs."""
    want = f"MIGRATE_ROOT={root}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if want not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"{d.name} {cmdline}")
        except OSError:
            continue
    return found


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(base) + "/")]


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="number of migrations")
    ap.add_argument("--fault-rate", type=float, default=0.5, help="share of migrations with a fault (0.5)")
    ap.add_argument("--seed", type=int, help="random seed (default: printed)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("soak: run as root (containers, namespaces and CRIU need it)")
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"soak: {a.n} migrations, fault rate {a.fault_rate}, seed {seed}")
    started = time.monotonic()
    with TestHosts(2, remote_command=MIGRATE) as hosts, tempfile.TemporaryDirectory() as tmp:
        soak = Soak(hosts)
        image = Path(tmp) / "busybox.tar"
        build_image(image, busybox_layer(), fmt="docker-archive", name="busybox:latest", config={"Cmd": ["sh"]})
        for h in ("host-a", "host-b"):  # both have the image: a failure never hinges on layers alone
            subprocess.run([*MIGRATE, "image", "import", str(image)], check=True, capture_output=True,
                           env={**os.environ, "MIGRATE_ROOT": str(hosts[h].root)})
        r = soak.cli("host-a", "run", "--name", NAME, "busybox", "sh", "-c", WORKLOAD)
        if r.returncode != 0:
            raise SystemExit(f"soak: run failed: {r.stderr.strip()}")
        time.sleep(1.0)
        here = "host-a"
        for i in range(1, a.n + 1):
            there = "host-b" if here == "host-a" else "host-a"
            mode = rng.choice(MODES)
            fault = rng.choice(faults_for(mode.partition("-")[0])) if rng.random() < a.fault_rate else None
            here = soak.one(i, here, there, mode, fault)
            if i % 10 == 0 or i == a.n:
                print(f"soak: {i}/{a.n} done, {time.monotonic() - started:.0f} s, " +
                      ", ".join(f"{k} {v}" for k, v in soak.counts.items()))
        soak.cli(here, "rm", "-f", NAME)
    print("\n".join(f"{k:>16}: {v}" for k, v in soak.counts.items()))
    print(f"{'seconds':>16}: {time.monotonic() - started:.0f}")
    bad = sum(soak.counts[k] for k in ("losses", "duplicates", "leaks", "internal errors", "watch failures"))
    for p in soak.problems:
        print(f"soak: {p}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
