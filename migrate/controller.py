"""One live migration, run on the source host: preflight, sync, freeze, transfer, restore, commit.

The container is never in danger: until the target has it running and has acknowledged the
commit, CRIU holds the source frozen inside our post-dump hook. Any failure before that raises
out of the hook, CRIU resumes the source, the agent undoes its side, and the user is told
which step failed. Only after the commit is the source's copy removed.
"""

import base64
import contextlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

from runtime import states
from runtime.container import Runtime
from runtime.criu import Criu
from runtime.errors import MigrateError, MigrationFailed, RemoteError
from runtime.facts import cpuinfo_dump, host_facts
from runtime.snapshots import dump, tree_size

from . import preflight
from .hosts import resolve_host
from .ssh import RemoteProcess, SSHSession
from .stats import MigrationStats
from .transfer import Rsync, missing_layers

AGENT_TIMEOUT = 300.0


class Agent:
    """The controller's handle on `migrate agent` at the other end."""

    def __init__(self, proc: RemoteProcess, host: str):
        self.proc = proc
        self.host = host

    def call(self, op: str, **args) -> dict:
        self.proc.send({"op": op, **args})
        answer = self.proc.recv(timeout=AGENT_TIMEOUT)
        if not isinstance(answer, dict):
            raise RemoteError(f"the agent on {self.host} answered {answer!r}")
        if not answer.get("ok"):
            raise RemoteError(f"{self.host}: {answer.get('error')}")
        return answer


class Migration:
    def __init__(self, runtime: Runtime, name: str, host: str, mode: str = "auto",
                 ssh_config: str | None = None, tool_config: str | None = None):
        self.rt = runtime
        self.name = name
        self.spec = resolve_host(host, ssh_config=ssh_config, tool_config=tool_config)
        self.mode = mode
        self.step = "connect"
        self.stats = MigrationStats(name, socket.gethostname(), self.spec.alias)

    def run(self) -> MigrationStats:
        started = time.monotonic()
        rec = self.rt.catalog.container(self.name)
        states.check("migrate", rec.state, self.name)
        with tempfile.TemporaryDirectory(prefix="migrate-ssh-") as control_dir:
            rsync = Rsync(self.spec, Path(control_dir))
            with self.stats.phase("connect"):
                session = SSHSession.connect(self.spec)
            try:
                agent = Agent(session.open_process(self.spec.remote_argv("agent")), self.spec.alias)
                try:
                    self._migrate(agent, rsync)
                finally:
                    agent.proc.close()
            finally:
                rsync.close()
                session.close()
        with self.stats.phase("cleanup"):
            self._remove_source()
        self.stats.total = time.monotonic() - started
        return self.stats

    def _migrate(self, agent: Agent, rsync: Rsync) -> None:
        self.step = "preflight"
        with self.stats.phase("preflight"):
            remote = agent.call("hello")["facts"]
            self._preflight(agent, remote)
        self.rt.catalog.transition(self.name, "migrate")
        outgoing = self.rt.root.root / "outgoing" / self.name
        try:
            self._transfer(agent, rsync, remote, outgoing)
        except BaseException as e:
            self._roll_back(agent)
            if isinstance(e, MigrateError):
                raise MigrationFailed(f"migration of {self.name} to {self.spec.alias} failed at {self.step}: {e}; "
                                      f"it keeps running here") from None
            raise
        finally:
            shutil.rmtree(outgoing, ignore_errors=True)
            with contextlib.suppress(OSError):  # outgoing/ itself once empty: a migration leaves nothing here
                outgoing.parent.rmdir()

    def _preflight(self, agent: Agent, remote: dict) -> None:
        rec = self.rt.catalog.container(self.name)
        local = host_facts(self.rt.root, self.rt.catalog, [])
        cdir = self.rt.root.container_dir(self.name)
        need = (self.rt.usage(rec) or 0) + tree_size(cdir / "upper") + sum(
            self.rt.layers.size_of(d) for d in missing_layers(rec.spec.layers, remote["layers"]))
        verdict = preflight.judge(local, remote, self.name, need, self.mode, lazy_implemented=False)
        if not verdict.problems:
            cpu = agent.call("cpuinfo_check", image=base64.b64encode(cpuinfo_dump(Criu())).decode())
            if not cpu["compatible"]:
                verdict = preflight.Verdict(verdict.mode, (f"the CPU of {self.spec.alias} cannot run processes "
                                                           f"dumped here: {cpu['message']}",))
        if verdict.problems:
            raise MigrationFailed(f"cannot migrate {self.name} to {self.spec.alias}: " + "; ".join(verdict.problems))
        self.stats.mode = verdict.mode

    def _transfer(self, agent: Agent, rsync: Rsync, remote: dict, outgoing: Path) -> None:
        rec = self.rt.catalog.container(self.name)
        cdir = self.rt.root.container_dir(self.name)
        self.step = "prepare"
        prep = agent.call("prepare", name=self.name, volumes=[v.host_path for v in rec.spec.volumes])
        incoming = prep["incoming"]
        self.step = "layers"
        with self.stats.phase("layers"):
            missing = missing_layers(rec.spec.layers, remote["layers"])
            if missing:
                files = [f for d in missing for f in self.rt.layers.files_of(d)]
                total = sum(self.rt.layers.size_of(d) for d in missing)
                self.stats.bytes["layers"] += rsync.send(files, prep["staging"] + "/", "layers", total)
                agent.call("adopt_layers", name=self.name, digests=missing)
        self.step = "upper dir sync"
        with self.stats.phase("upper sync (running)"):
            self.stats.bytes["upper"] += rsync.send([cdir / "upper"], incoming + "/", "upper dir",
                                                    tree_size(cdir / "upper"), delete=True)
        outgoing.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(outgoing, ignore_errors=True)

        def on_frozen() -> None:
            self.stats.phases["checkpoint"] = time.monotonic() - freeze_started
            self.step = "final sync"
            with self.stats.phase("final sync (frozen)"):
                images = outgoing / "images"
                self.stats.bytes["images"] += rsync.send(
                    [images, outgoing / "spec.json", outgoing / "checkpoint.json"], incoming + "/", "checkpoint",
                    tree_size(images))
                sources = [cdir / "upper"] + ([cdir / "container.log"] if (cdir / "container.log").exists() else [])
                self.stats.bytes["upper"] += rsync.send(sources, incoming + "/", "upper dir", 0, delete=True)
            self.step = "restore"
            with self.stats.phase("restore"):
                agent.call("restore", name=self.name)
            self.step = "commit"
            agent.call("commit", name=self.name)
            self.stats.downtime = time.monotonic() - freeze_started

        self.step = "checkpoint"
        freeze_started = time.monotonic()
        dump(rec, outgoing, leave_running=False, on_frozen=on_frozen)

    def _roll_back(self, agent: Agent) -> None:
        """The source is running again (CRIU resumed it); undo the target's side, best effort."""
        try:
            agent.call("abort")
        except MigrateError:
            pass  # the agent also aborts by itself when the connection ends
        rec = self.rt.catalog.container(self.name)
        if rec.state == states.MIGRATING:
            self.rt.catalog.transition(self.name, "migrate-rolled-back")

    def _remove_source(self) -> None:
        """After the commit: CRIU has ended the tree; wait for the shim, then remove every trace here."""
        if not self.rt.wait_for_exit(self.name, 60):
            raise MigrateError(f"{self.name} runs on {self.spec.alias} now, but its old shim here did not exit")
        self.rt.discard(self.name)
