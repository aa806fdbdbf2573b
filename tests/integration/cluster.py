"""Test hosts driven through the CLI: a HostCLI per host (clihost.MigrateHost run inside the
host's network and UTS namespaces, with its MIGRATE_ROOT), a Cluster of them, and what the
migration tests check on them. The fixtures `cluster` and `two` (conftest.py) make them."""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from clihost import (
    CLI_TIMEOUT,
    COUNTER,
    IMAGE,
    MigrateHost,
    Result,
    _cli,
    assert_consecutive,
    counter_numbers,
    kill_leftover,
    proc_gone,
    proc_identity,
    wait_until,
)

REMOTE_COMMAND = [sys.executable, "-m", "migrate.cli"]


class HostCLI(MigrateHost):
    """MigrateHost for a test host: the CLI runs inside that host's network and UTS namespaces.

    As on a real machine, the CLI, the agent (started by its sshd) and the containers of one host
    share its network namespace: a container restored there by the agent is in host-b's
    namespace, and only a CLI in that namespace sees it as "the host's" network when dumping it.
    """

    def __init__(self, host, work: Path, env: dict[str, str]):
        super().__init__(host.root, work)
        self.env.update(env)
        self.prefix = ["nsenter", f"--target={host.sshd_pid}", "--net", "--uts", "--"]

    def run(self, *args: str, env: dict | None = None, timeout: float = CLI_TIMEOUT) -> Result:
        argv = [str(a) for a in args]
        t0 = time.monotonic()
        proc = subprocess.run([*self.prefix, *_cli(), *argv], env={**self.env, **(env or {})}, cwd=self.work,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        return Result(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


class Cluster:
    """N test hosts, each with a HostCLI driving its state root through the CLI."""

    def __init__(self, hosts, work: Path):
        self.hosts = hosts
        self.nodes: dict[str, HostCLI] = {}
        self.cgroups_seen: set[str] = set()
        for h in hosts:
            (work / h.name).mkdir(parents=True)
            self.nodes[h.name] = HostCLI(h, work / h.name, hosts.env())

    def __getitem__(self, name: str) -> HostCLI:
        return self.nodes[name]

    def record(self, host: str, name: str) -> dict:
        """The catalog row of a container; its cgroups are remembered for the cleanup."""
        rec = self.nodes[host].record(name)
        self.cgroups_seen.update(rec["cgroups"].values())
        return rec

    def move(self, src: str, name: str, dst: str, *args: str, mode: str = "copy") -> Result:
        """`migrate NAME DST --mode MODE` run on SRC (the CLI always runs on the source)."""
        return self.nodes[src].run(name, dst, "--mode", mode, *args)

    def move_json(self, src: str, name: str, dst: str, *args: str, mode: str = "copy") -> dict:
        self.record(src, name)
        r = self.move(src, name, dst, "--json", *args, mode=mode)
        assert r.rc == 0, str(r)
        stats = json.loads(r.out)
        assert stats["container"] == name and stats["target"] == dst and stats["mode"] == mode, stats
        return stats

    def teardown(self) -> list[str]:
        leaks: list[str] = []
        for node in self.nodes.values():
            for rec in node.catalog().values():
                self.cgroups_seen.update(rec["cgroups"].values())
        for node in self.nodes.values():
            leaks += node.teardown()
        leaks += kill_in_cgroups(self.cgroups_seen)
        return leaks


def kill_in_cgroups(paths: set[str]) -> list[str]:
    """SIGKILL (by PID) whatever is still in these cgroup folders, then remove the folders."""
    leaks = []
    for path in sorted(paths, key=len, reverse=True):
        if not os.path.isdir(path):
            continue
        leaks.append(f"cgroup left behind: {path}")
        try:
            pids = [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            leaks.append(f"process left behind in {path}: {pid}")
            kill_leftover(pid, leaks)

        def gone(p=path) -> bool:
            try:
                os.rmdir(p)
            except FileNotFoundError:
                pass
            except OSError:
                return False
            return True

        try:
            wait_until(gone, 10, f"{path} to be removable")
        except AssertionError as e:
            leaks.append(str(e))
    return leaks


def print_logs(c: Cluster) -> None:
    for name, node in c.nodes.items():
        print(node.failure_logs(f"{name}: "))


def start_counter(c: Cluster, host: str = "host-a", name: str = "c1", at_least: int = 5) -> list[int]:
    c[host].ok("run", "--name", name, IMAGE, "sh", "-c", COUNTER)
    c.record(host, name)
    return c[host].wait_count(name, at_least)


def assert_counts_on(c: Cluster, host: str, name: str, before: list[int], more: int = 10) -> list[int]:
    """NAME runs on HOST, its log holds 1..N without gap or restart, continues `before` and grows."""
    node = c[host]
    ct = node.container(name)
    assert ct["state"] == "running" and not proc_gone(proc_identity(ct["pid"])), ct
    c.record(host, name)
    at_arrival = counter_numbers(node.logs(name))
    nums = node.wait_count(name, max(len(at_arrival), len(before)) + more)
    assert_consecutive(nums)
    assert nums[:len(before)] == before
    return nums


def assert_no_migration_leftovers(*nodes: HostCLI) -> None:
    for node in nodes:
        for sub in ("outgoing", "incoming"):
            assert not (node.root / sub).exists(), f"{node.root / sub} left behind: {os.listdir(node.root / sub)}"
        tmp = node.state.layers / "tmp"
        if tmp.is_dir():
            assert [p for p in os.listdir(tmp) if p.startswith("incoming-")] == [], os.listdir(tmp)


def set_host_env(hosts, name: str, env: dict[str, str]) -> None:
    """Add env entries to [hosts.NAME] of the hosts' tool config, keeping what is there."""
    table = _update_host(hosts, name, lambda t: t.setdefault("env", {}).update(env))
    assert dict(hosts.spec(name).remote_env) == table["env"]


def set_host_command(hosts, name: str, argv: list[str]) -> None:
    """[hosts.NAME] command = ARGV: what the other hosts run there over SSH."""
    _update_host(hosts, name, lambda t: t.update(command=list(argv)))
    assert list(hosts.spec(name).remote_command) == list(argv)


def set_host_direct(hosts, name: str) -> None:
    """[hosts.NAME] direct = true: memory goes to NAME by a direct TCP connection."""
    _update_host(hosts, name, lambda t: t.update(direct=True))
    assert hosts.spec(name).direct


def _update_host(hosts, name: str, change) -> dict:
    config = tomllib.loads(hosts.tool_config.read_text())
    table = config.setdefault("hosts", {}).setdefault(name, {})
    change(table)
    hosts.tool_config.write_text(_toml(config))
    return table


def _toml(config: dict) -> str:
    """TOML for the shape of the tool config: [hosts."NAME"] tables of strings, lists, env tables."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML here")

    assert set(config) <= {"hosts"}, config
    out = []
    for host, table in config.get("hosts", {}).items():
        out.append(f"[hosts.{json.dumps(host)}]")
        out += [f"{k} = {value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def assert_refused_and_unchanged(c: Cluster, r: Result, rc: int, before: dict, pid: int, nums: list[int]) -> None:
    """Refused with exit status rc (README: 8 refused by preflight, 7 host unreachable or refusing
    us), in one line, and nothing changed on the source: same process, still counting."""
    a = c["host-a"]
    assert r.rc == rc, str(r)
    assert "Traceback" not in r.err + r.out, str(r)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("migrate: error: "), str(r)
    assert a.snapshot_of_state() == before
    ct = a.container("c1")
    assert (ct["state"], ct["pid"]) == ("running", pid)
    assert_counts_on(c, "host-a", "c1", nums, more=3)
