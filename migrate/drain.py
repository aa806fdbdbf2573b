"""`migrate drain HOST --to T1,T2`: empty a host, each running container as its drain policy says.

Placement is a pure function of facts (`place`): every target's MemAvailable and what a
preflight of its facts says about each container. The work is one `migrate move`, `checkpoint`
or `stop` process per container, at most --parallel at once: each reuses the whole crash-safe
path of its verb (rollback, journal, exit codes, JSON statistics), and a failure or crash of
one cannot take another down. A move refused or rolled back by one target is tried on the next
best. Everything is decided from the host's state as it is now, so an interrupted drain run
again finishes the rest. Run anywhere but on HOST, drain logs in to HOST, runs itself there
with the same options and relays its report.
"""

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

from runtime import states
from runtime.container import Runtime
from runtime.errors import DrainIncomplete, InDoubt, InvalidInput, MigrationFailed, RemoteError, error_for
from runtime.facts import host_facts

from . import output, preflight
from .hosts import resolve_host, validate_host_name

DEFAULT_POLICY = "live"
DEFAULT_PARALLEL = 1  # one move at a time: each container's downtime stays that of a lone move
FACTS_TIMEOUT = 60.0
# a move that ended with these left the container running here: the next target may take it
TRY_NEXT = (RemoteError.exit_code, MigrationFailed.exit_code)
ACTIONS = {"live": "move", "checkpoint": "checkpoint", "stop": "stop"}
LOCAL_NAMES = ("localhost",)  # besides this machine's hostname: HOST is here, nothing to relay


def resolve_policy(own: str | None, flag: str | None) -> str:
    """The container's own policy (`run --drain-policy`) when it set one; else --policy; else live."""
    return own or flag or DEFAULT_POLICY


@dataclass(frozen=True)
class Need:
    """A container to be moved live, and the memory it will take on its target."""

    name: str
    memory: int


@dataclass(frozen=True)
class Placement:
    name: str
    targets: tuple[str, ...]  # every target that takes it, best first: it goes to the first
    reason: str = ""  # when none does: why each refused


def place(needs: list[Need], free: dict[str, int | None], refused: dict[tuple[str, str], str]) -> list[Placement]:
    """Biggest first, each container to the target with the most memory available once what was
    placed there before is taken off, among those that take it: not refused by preflight
    (REFUSED[(container, target)]) and with room for its memory. FREE is each target's
    MemAvailable in --to order (ties keep it); None (a target that does not say) ranks last and
    is not refused for memory."""
    left = dict(free)
    placements = []
    for need in sorted(needs, key=lambda n: (-n.memory, n.name)):
        takers, reasons = [], []
        for target, avail in left.items():
            why = refused.get((need.name, target))
            if why is None and avail is not None and avail < need.memory:
                why = (f"{target} has {output.human_size(avail)} of memory available (after the containers placed "
                       f"there), {need.name} uses {output.human_size(need.memory)}")
            (reasons if why else takers).append(why or target)
        takers.sort(key=lambda t: -1 if left[t] is None else -left[t])
        if takers and left[takers[0]] is not None:
            left[takers[0]] -= need.memory
        placements.append(Placement(need.name, tuple(takers), "; ".join(reasons)))
    return placements


@dataclass
class Entry:
    """One container's line of the report."""

    name: str
    state: str
    policy: str
    action: str  # move, checkpoint, stop, or none (not running)
    memory: int | None = None
    targets: tuple[str, ...] = ()
    result: str = "planned"  # planned (dry run), moved, checkpointed, stopped, skipped, failed, in-doubt
    target: str | None = None
    reason: str = ""
    downtime_s: float | None = None
    snapshot: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "state": self.state, "policy": self.policy, "action": self.action,
                "memory": self.memory, "targets": list(self.targets), "result": self.result, "target": self.target,
                "reason": self.reason, "downtime_s": self.downtime_s, "snapshot": self.snapshot}


@dataclass
class Drain:
    host: str
    targets: list[str]
    parallel: int = DEFAULT_PARALLEL
    policy: str | None = None
    dry_run: bool = False
    ssh_config: str | None = None
    direct: bool = False  # moves send memory by direct TCP connections (migrate/pagelink.py)
    entries: list[Entry] = field(default_factory=list)

    def move_options(self) -> list[str]:
        """The options every `migrate move` of the drain gets."""
        return [*(["--ssh-config", self.ssh_config] if self.ssh_config else []), *(["--direct"] if self.direct else [])]

    def report(self) -> dict:
        entries = sorted(self.entries, key=lambda e: e.name)
        return {"host": self.host, "targets": self.targets, "parallel": self.parallel, "policy": self.policy,
                "dry_run": self.dry_run, "complete": not any(e.result in ("failed", "in-doubt") for e in entries),
                "containers": [e.to_json() for e in entries]}


def run(rt: Runtime, host: str, to: str, *, parallel: int | None = None, policy: str | None = None,
        dry_run: bool = False, as_json: bool = False, ssh_config: str | None = None, direct: bool = False) -> int:
    """The `drain` verb: here when HOST is this machine, else relayed to HOST. Exit status 0 when
    every running container was dealt with, DrainIncomplete's when some stay."""
    parallel = DEFAULT_PARALLEL if parallel is None else parallel
    d = Drain(validate_host_name(host), _targets(host, to), parallel, policy, dry_run, ssh_config, direct)
    if parallel < 1:
        raise InvalidInput("--parallel must be at least 1")
    if _is_here(host):
        d.host = socket.gethostname()
        if d.host in d.targets:
            raise InvalidInput(f"cannot drain {d.host} into itself: it is among the targets")
        survey(rt, d)
        plan(rt, d)
        if not dry_run:
            execute(d, Children(), progress=None if as_json else _progress)
        report = d.report()
    else:
        report = relay(d)
    print_report(report, as_json)
    return 0 if report["complete"] else DrainIncomplete.exit_code


def _targets(host: str, to: str) -> list[str]:
    targets = list(dict.fromkeys(t.strip() for t in to.split(",") if t.strip()))
    if not targets:
        raise InvalidInput("--to names no host: give HOST1,HOST2,...")
    for t in targets:
        validate_host_name(t)
    if host in targets:
        raise InvalidInput(f"cannot drain {host} into itself: it is among the targets")
    return targets


def _is_here(host: str) -> bool:
    name = socket.gethostname()
    return host in (*LOCAL_NAMES, name, name.split(".")[0])


def survey(rt: Runtime, d: Drain) -> None:
    """What each container of this host is to become: running ones as their policy says; the
    rest are no work (nothing runs), except those held by an operation or in doubt."""
    for rec in rt.catalog.containers():
        if rec.state == states.CHECKPOINTING:  # a (scheduled) snapshot under way ends in a moment
            rt.await_snapshot(rec.name)
            rec = rt.catalog.find_container(rec.name)
            if rec is None:  # removed meanwhile: nothing to drain
                continue
        policy = resolve_policy(rec.spec.drain_policy, d.policy)
        e = Entry(rec.name, rec.state, policy, ACTIONS[policy] if rec.state == states.RUNNING else "none")
        if rec.state == states.RUNNING:
            e.memory = rt.usage(rec)
        elif rec.state == states.IN_DOUBT:
            e.result, e.reason = "in-doubt", f"held frozen here by a migration in doubt: run `migrate recover {rec.name}`"
        elif rec.state in states.TRANSIENT:
            e.result, e.reason = "failed", f"{rec.state} (by pid {(rec.owner or {}).get('pid')}): run drain again later"
        else:
            e.result, e.reason = "skipped", f"not running ({rec.state}): nothing to drain"
        d.entries.append(e)


def plan(rt: Runtime, d: Drain) -> None:
    """Each container to move gets its targets, best first, from the targets' facts."""
    moving = [e for e in d.entries if e.action == "move"]
    if not moving:
        return
    local = host_facts(rt.root, [], [])
    with ThreadPoolExecutor(len(d.targets)) as pool:
        asked = {t: pool.submit(target_facts, t, d.ssh_config) for t in d.targets}
    facts: dict[str, dict] = {}
    refused: dict[tuple[str, str], str] = {}
    for target, future in asked.items():
        try:
            facts[target] = future.result()
        except RemoteError as e:
            refused.update({(m.name, target): f"{target}: {e}" for m in moving})
    from .controller import bytes_to_send  # slow to import (CRIU, rich): only where it is needed

    for m in moving:
        rec = rt.catalog.container(m.name)
        for target, remote in facts.items():
            problems = preflight.judge(local, remote, m.name, bytes_to_send(rt, rec, remote["layers"]), "auto").problems
            problems += tuple(preflight.limits_verdict(m.name, rec.spec.limits, remote))
            if problems:
                refused[(m.name, target)] = "; ".join(problems)
    free = {t: facts[t].get("mem_available") if t in facts else 0 for t in d.targets}
    by_name = {m.name: m for m in moving}
    for p in place([Need(m.name, m.memory or 0) for m in moving], free, refused):
        e = by_name[p.name]
        e.targets = p.targets
        if p.targets:
            e.target = p.targets[0]
        else:
            e.result, e.reason = "failed", f"no target takes it: {p.reason}; it keeps running here"


def target_facts(target: str, ssh_config: str | None) -> dict:
    """TARGET's facts, as its agent tells them at the start of every move."""
    from .controller import Agent
    from .protocol import PROTOCOL
    from .ssh import SSHSession

    spec = resolve_host(target, ssh_config=ssh_config)
    with SSHSession.connect(spec) as session, session.open_process(spec.remote_argv("agent")) as proc:
        hello = Agent(proc, target).call("hello", protocol=PROTOCOL, timeout=FACTS_TIMEOUT)
    if hello.get("protocol") != PROTOCOL:
        raise RemoteError(f"its migrate speaks protocol {hello.get('protocol')}, this one {PROTOCOL}")
    return hello["facts"]


class Runner(Protocol):
    def run(self, args: list[str]) -> tuple[int, str, str]:
        """`migrate ARGS` to its end: (exit status, stdout, stderr)."""

    def stop(self) -> None:
        """End what runs (each its own way: a move rolls back) and start nothing more."""


def execute(d: Drain, runner: Runner, progress: Callable[[Entry], None] | None = None) -> None:
    """Every planned entry, at most d.parallel at once. One entry's failure is its own."""
    work = sorted((e for e in d.entries if e.result == "planned"), key=lambda e: (-(e.memory or 0), e.name))

    def one(e: Entry) -> None:
        _do(e, runner, d.move_options())
        if progress is not None:
            progress(e)

    with ThreadPoolExecutor(d.parallel) as pool:
        futures = [pool.submit(one, e) for e in work]
        try:
            wait(futures)
        except BaseException:  # an interrupt: what runs ends its way (a move rolls back), nothing new starts
            pool.shutdown(wait=False, cancel_futures=True)
            runner.stop()
            raise
    for f in futures:
        f.result()  # a bug in one() is not swallowed


def _do(e: Entry, runner: Runner, move_options: list[str]) -> None:
    if e.action == "checkpoint":
        rc, out, err = runner.run(["checkpoint", "--json", e.name])
        if rc == 0:
            e.result, e.snapshot = "checkpointed", json.loads(out)["id"]
        else:
            e.result, e.reason = "failed", _error(rc, err)
        return
    if e.action == "stop":
        rc, _out, err = runner.run(["stop", e.name])
        e.result, e.reason = ("stopped", "") if rc == 0 else ("failed", _error(rc, err))
        return
    reasons = []
    for target in e.targets:
        rc, out, err = runner.run(["move", e.name, target, "--json", *move_options])
        if rc == 0:
            e.result, e.target, e.reason = "moved", target, "; ".join(reasons)
            e.downtime_s = json.loads(out).get("downtime_s")
            return
        reasons.append(_error(rc, err))
        if rc not in TRY_NEXT:
            break
    e.result, e.reason = ("in-doubt" if rc == InDoubt.exit_code else "failed"), "; ".join(reasons)
    e.target = None


def _error(rc: int, err: str) -> str:
    """The one error line a `migrate` command ends with, without its prefix."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if ln.startswith("migrate: error: ")), lines[-1] if lines else "")
    return line.removeprefix("migrate: error: ") or f"exit status {rc}"


def _progress(e: Entry) -> None:
    where = f" to {e.target}" if e.target else ""
    took = f" (downtime {e.downtime_s:.3f} s)" if e.downtime_s is not None else ""
    reason = f": {output.printable(e.reason)}" if e.reason else ""
    output.err.print(f"migrate: {e.name}: {e.result}{where}{took}{reason}", markup=False)


class Children:
    """`migrate VERB ...` of this installation, each in a process and session of its own (a
    Ctrl-C at the terminal reaches only the drain): on an interrupt each is sent one SIGTERM (a
    move then rolls back, as on Ctrl-C) and waited for."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopping = False

    def run(self, args: list[str]) -> tuple[int, str, str]:
        with self._lock:
            if self._stopping:
                return 130, "", "migrate: error: the drain was interrupted before this began"
            proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", *args], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            self._procs.add(proc)
        try:
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._procs.discard(proc)
        return proc.returncode, out, err

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def relay(d: Drain) -> dict:
    """Run the drain on HOST over SSH, with the same options, and take its JSON report. Targets
    are named as HOST's ssh config knows them; --ssh-config only says how to reach HOST."""
    from .ssh import SSHSession

    spec = resolve_host(d.host, ssh_config=d.ssh_config)
    args = ["drain", LOCAL_NAMES[0], "--to", ",".join(d.targets), "--parallel", str(d.parallel), "--json",
            *(["--policy", d.policy] if d.policy else []), *(["--dry-run"] if d.dry_run else []),
            *(["--direct"] if d.direct else [])]
    with SSHSession.connect(spec) as session:
        rc, out, err = session.run(spec.remote_argv(*args), timeout=None)
    text = err.decode(errors="replace")
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    if isinstance(report, dict) and "containers" in report:
        for line in text.splitlines():  # its notes
            output.err.print(output.printable(line), markup=False)
        return report
    message = f"`migrate drain` on {d.host}: {_error(rc, text)}"
    raise error_for(rc, message) if 0 < rc < InDoubt.exit_code else RemoteError(message)


def print_report(report: dict, as_json: bool) -> None:
    """The outcome per container, from the report's JSON (so a relayed one prints the same)."""
    if as_json:
        output.print_json(report)
        return
    output.print_table(
        ("NAME", "STATE", "POLICY", "RESULT", "TARGET", "DOWNTIME", "REASON"),
        [(c["name"], c["state"], c["policy"], c["result"], c["target"],
          None if c["downtime_s"] is None else f"{c['downtime_s']:.3f} s",
          c["snapshot"] and f"snapshot {c['snapshot']}" or c["reason"] or None) for c in report["containers"]])
    stay = [c["name"] for c in report["containers"] if c["result"] in ("failed", "in-doubt")]
    if stay:
        output.print_error(f"{len(stay)} container(s) stay on {report['host']}: {', '.join(stay)}")
    elif report["dry_run"]:
        output.out.print(f"dry run: nothing was changed on {output.printable(report['host'])}", markup=False)
