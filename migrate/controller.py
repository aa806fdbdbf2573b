"""One live migration, run on the source host: preflight, sync, freeze, transfer, restore, commit.

The container is never in danger: until the target has it running and has acknowledged the
commit, CRIU holds the source frozen inside our post-dump hook. Any failure before that raises
out of the hook, CRIU resumes the source, the agent undoes its side, and the user is told
which step failed. Only after the commit is the source's copy removed.
"""

import base64
import contextlib
import dataclasses
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from runtime import criulogs, faults, journal, linux, procfs, states
from runtime.cgroups import Cgroups
from runtime.container import Runtime
from runtime.criu import Criu, pages_written
from runtime.errors import CriuError, InDoubt, MigrateError, MigrationFailed, PeerLost, RemoteError
from runtime.facts import LAZY_PIPE_SIZE, PIPE_MAX_SIZE, cpuinfo_dump, host_facts
from runtime.reconcile import secure_dump
from runtime.snapshots import dump, dump_blocker, dump_held, pre_dump, tree_size

from . import pagelink, precopy, preflight, steps, treesync
from .hosts import resolve_host
from .protocol import PROTOCOL
from .ssh import RemoteProcess, SSHSession
from .stats import MigrationStats
from .transfer import DelayedProgress, Rsync, missing_layers

AGENT_TIMEOUT = 150.0  # an agent step that moves no data: starting a shim (SHIM_TIMEOUT) or undoing, at most
DUMP_JOIN_TIMEOUT = 60.0
PAGES_TIMEOUT = 3600.0  # a lazy page transfer longer than this is treated as failed
FREEZE_TIMEOUT = 120.0  # default bound on the source's frozen window (copy mode: until the commit)
COMMIT_WINDOW = 30.0  # after the restore (copy) or the last page (lazy), the commit must arrive within this
COMMIT_ANSWER_TIMEOUT = 10.0  # the target answers a commit at once: a silence this long means it is lost
RESOLVE_TIMEOUT = 30.0  # how long a lost answer is asked for again before the source is held in doubt
# the frozen final sync goes over the agent's connection up to this many bytes; more goes by rsync
INLINE_MAX = 2 << 20


def resolve_on(spec, migration: str, timeout: float = 30.0) -> str:
    """A migration's outcome as the target's journal has it, asked on a new connection (the
    target decides `aborted` if it was undecided, and ends its copy)."""
    session = SSHSession.connect(spec, timeout=min(10.0, timeout))
    try:
        with session.open_process(spec.remote_argv("agent")) as proc:
            return Agent(proc, spec.alias).call("resolve", migration=migration, timeout=timeout)["outcome"]
    finally:
        session.close()


def bytes_to_send(rt: Runtime, rec, remote_layers: list[str]) -> int:
    """About what a move of REC sends to a host holding REMOTE_LAYERS: its memory, its own
    files, the image layers the host lacks (preflight's disk check, drain's placement)."""
    return (rt.usage(rec) or 0) + tree_size(rt.root.container_dir(rec.name) / "upper") + sum(
        rt.layers.size_of(d) for d in missing_layers(rec.spec.layers, remote_layers))


class Agent:
    """The controller's handle on `migrate agent` at the other end."""

    def __init__(self, proc: RemoteProcess, host: str):
        self.proc = proc
        self.host = host
        self.last_id = 0

    def call(self, op: str, timeout: float = AGENT_TIMEOUT, **args) -> dict:
        """One request and its answer."""
        return self.answer(self.ask(op, **args), timeout)

    def ask(self, op: str, **args) -> int:
        """Send a request; its answer is read by `answer` (before any other request is asked)."""
        self.last_id += 1
        self.proc.send({"id": self.last_id, "op": op, **args})
        faults.point(f"sent-{op}")  # asked, the answer not read: only the other host knows what happened
        return self.last_id

    def answer(self, request: int, timeout: float = AGENT_TIMEOUT) -> dict:
        """The answer to REQUEST, matched by id: a late answer to an earlier request whose wait
        timed out is skipped, never taken for this one's."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.proc.recv(timeout=max(0.01, deadline - time.monotonic()))
            if not isinstance(answer, dict):
                raise PeerLost(f"the agent on {self.host} answered {str(answer)[:200]!r}")
            got = answer.get("id")
            if isinstance(got, int) and not isinstance(got, bool) and got < request:
                continue  # the answer to a request we gave up on
            if got != request:
                raise PeerLost(f"the agent on {self.host} answered request {got!r}, not {request}")
            break
        if not answer.get("ok"):
            where = f" (CRIU log on {self.host}: {answer['criu_log']})" if answer.get("criu_log") else ""
            raise RemoteError(f"{self.host}: {answer.get('error')}{where}")
        return answer


class Migration:
    def __init__(self, runtime: Runtime, name: str, host: str, mode: str = "auto",
                 ssh_config: str | None = None, tool_config: str | None = None,
                 tcp_close: bool = False, allow_new_inodes: bool = False,
                 freeze_timeout: float = FREEZE_TIMEOUT, direct: bool = False):
        self.rt = runtime
        self.journal = runtime.catalog.journal
        self.name = name
        self.spec = resolve_host(host, ssh_config=ssh_config, tool_config=tool_config)
        self.mode = mode
        self.tcp_close = tcp_close  # connections to the outside are restored closed on the target
        self.allow_new_inodes = allow_new_inodes  # move even with SQLite databases open in the upper dir
        self.freeze_timeout = freeze_timeout
        self.direct = direct or self.spec.direct  # pages by plain TCP (migrate/pagelink.py), until that fails once
        self.peer: str | None = None  # this host's address as the target sees it
        self.id = secrets.token_hex(8)
        self.step = "connect"
        self.memory = 0  # the container's memory use, measured at preflight
        self.stream = False  # copy and pre-copy: the final dump writes memory to a page server there
        self.frozen_until = 0.0  # monotonic: past it, the migration rolls back
        self.restore_asked = False  # from then on the target may run a (fenced) copy
        self.copy_deadline: float | None = None  # past it, an uncommitted copy on the target has ended itself
        self.upper_copied: treesync.Walk | None = None  # the upper dir as it was when its running copy began
        self.upper_frozen: Future | None = None  # its changes since, read from the instant CRIU holds the tree
        self.stats = MigrationStats(name, socket.gethostname(), self.spec.alias)

    @contextlib.contextmanager
    def _step(self, name: str):
        """One step of the table in migrate/steps.py, journaled before it starts and after it ends."""
        self._begin(name)
        try:
            yield
        except BaseException as e:
            self.journal.note(self.id, journal.SOURCE, name, "failed", str(e) or type(e).__name__)
            raise
        self.journal.note(self.id, journal.SOURCE, name, "done")

    def _begin(self, name: str) -> None:
        """A step starts: journaled, then its fault point (the checkpoint's ends in CRIU's hook)."""
        assert name in steps.NAMES, name
        self.step = name
        self.journal.note(self.id, journal.SOURCE, name, "begin")
        faults.point("source-" + name.replace(" ", "-"))

    def run(self) -> MigrationStats:
        started = time.monotonic()
        rec = self.rt.catalog.container(self.name)
        if not self.rt.snapshot_under_way(rec):  # one under way is waited out after the preflight
            states.check("migrate", rec.state, self.name)
        self.journal.begin(self.id, journal.SOURCE, self.name, self.spec.alias)
        try:
            with self.stats.phase("connect"):
                session = SSHSession.connect(self.spec)
            try:
                agent = Agent(session.open_process(self.spec.remote_argv("agent")), self.spec.alias)
                try:
                    self._migrate(agent, Rsync(session))
                finally:
                    agent.proc.close()
            finally:
                session.close()
        except InDoubt:
            raise  # the journal stays open: `migrate recover` finishes it
        except BaseException:
            self.journal.decide(self.id, journal.SOURCE, journal.ABORTED)
            self.journal.finish(self.id, journal.SOURCE)
            raise
        with self._step("cleanup"), self.stats.phase("cleanup"):
            self._remove_source()
        self.journal.finish(self.id, journal.SOURCE)
        self.stats.total = time.monotonic() - started
        return self.stats

    def _migrate(self, agent: Agent, rsync: Rsync) -> None:
        with self._step("preflight"), self.stats.phase("preflight"), ThreadPoolExecutor(2) as pool:
            # this host's facts are gathered while the other host gathers its own
            local = pool.submit(host_facts, self.rt.root, [], [])
            cpu = pool.submit(cpuinfo_dump, Criu())
            pool.submit(Criu().can_skip_network_lock)  # CRIU's version, asked now rather than inside the freeze
            hello = agent.call("hello", protocol=PROTOCOL)
            if hello.get("protocol") != PROTOCOL:
                raise MigrationFailed(f"cannot migrate to {self.spec.alias}: its migrate speaks protocol "
                                      f"{hello.get('protocol')}, this one {PROTOCOL}; install the same version on both")
            agent.proc.start_heartbeat()
            self.peer = hello.get("peer")
            remote = hello["facts"]
            self._preflight(agent, local.result(), remote, cpu.result())
        self.rt.take(self.name, "migrate")
        outgoing = self.rt.root.outgoing / self.name
        in_doubt = False
        try:
            self._transfer(agent, rsync, remote, outgoing)
        except InDoubt as e:
            in_doubt = True  # the processes stay frozen here, and outgoing keeps a complete dump of them
            rec = self.rt.catalog.transition(self.name, "migrate-in-doubt", owner=None)
            try:
                dump_held(rec, self.rt.root.container_dir(self.name), outgoing)
                secure_dump(outgoing)
            except MigrateError as why:
                raise InDoubt(f"{e} (and no copy of its memory could be kept here in case this host restarts "
                              f"first: {why})") from None
            raise
        except BaseException as e:
            if isinstance(e, CriuError):  # CRIU's log is in outgoing, which goes now: keep a copy
                e = criulogs.keep_failed(self.rt.root, self.name, e)
            self._roll_back(agent)
            if isinstance(e, MigrateError):
                raise MigrationFailed(f"migration of {self.name} to {self.spec.alias} failed at {self.step}: {e}; "
                                      f"it keeps running here") from None
            raise
        finally:
            if not in_doubt:
                shutil.rmtree(outgoing, ignore_errors=True)
                with contextlib.suppress(OSError):  # outgoing/ itself once empty: a migration leaves nothing here
                    outgoing.parent.rmdir()

    def _preflight(self, agent: Agent, local: dict, remote: dict, cpuinfo: bytes) -> None:
        rec = self.rt.catalog.container(self.name)
        self.memory = self.rt.usage(rec) or 0
        verdict = preflight.judge(local, remote, self.name, bytes_to_send(self.rt, rec, remote["layers"]), self.mode)
        pids = Cgroups(rec.cgroups).pids()
        ports = procfs.ports_of(pids)
        taken = agent.call("ports_taken", ports=[p.to_json() for p in ports])["taken"] if ports else []
        problems, notes = preflight.holdings_verdict(
            self.name, self.spec.alias, dump_blocker(rec), procfs.connections_to_outside(pids),
            procfs.open_databases(pids), self.tcp_close, self.allow_new_inodes, taken)
        problems += preflight.limits_verdict(self.name, rec.spec.limits, remote)
        problems += preflight.blobs_verdict(rec.spec.image, [
            d for d in missing_layers(rec.spec.layers, remote["layers"]) if not self.rt.layers.has_blob(d)])
        verdict = dataclasses.replace(verdict, problems=verdict.problems + tuple(problems))
        self.stats.notes.extend(notes)
        if not verdict.problems:
            cpu = agent.call("cpuinfo_check", image=base64.b64encode(cpuinfo).decode())
            if not cpu["compatible"]:
                problem = f"the CPU of {self.spec.alias} cannot run processes dumped here: {cpu['message']}"
                verdict = dataclasses.replace(verdict, problems=(problem,))
        if verdict.problems:
            raise MigrationFailed(f"cannot migrate {self.name} to {self.spec.alias}: " + "; ".join(verdict.problems))
        self.stats.mode = verdict.mode
        self.stream = verdict.stream
        if verdict.why:
            self.stats.notes.append(f"mode {verdict.why}")
        if verdict.mode == "lazy" and preflight.needs_pipe_size(local):
            PIPE_MAX_SIZE.write_text(str(LAZY_PIPE_SIZE))
            self.stats.notes.append(f"raised fs.pipe-max-size to {LAZY_PIPE_SIZE} on this host "
                                    "(lazy dumps need pipes that large)")

    def _transfer(self, agent: Agent, rsync: Rsync, remote: dict, outgoing: Path) -> None:
        rec = self.rt.catalog.container(self.name)
        cdir = self.rt.root.container_dir(self.name)
        with self._step("prepare"):
            prep = agent.call("prepare", name=self.name, migration=self.id, source=socket.gethostname(),
                              volumes=[v.host_path for v in rec.spec.volumes])
        incoming = prep["incoming"]
        with self._step("layers"), self.stats.phase("layers"):
            missing = missing_layers(rec.spec.layers, remote["layers"])
            if missing:  # the blobs: the target verifies each against its digest and extracts it itself
                blobs = [self.rt.layers.blob_of(d) for d in missing]
                total = sum(self.rt.layers.size_of(d) for d in missing)
                self.stats.bytes["layers"] += rsync.send(blobs, prep["staging"] + "/", "layers", total)
                agent.call("adopt_layers", name=self.name, digests=missing)
        with self._step("upper sync"), self.stats.phase("upper sync (running)"):
            self.upper_copied = treesync.walk(cdir / "upper")  # the target has at least this after the copy
            self.stats.bytes["upper"] += rsync.send([cdir / "upper"], incoming + "/", "upper dir",
                                                    self.upper_copied.data_bytes(), delete=True, running=True)
        with self._step("preload"):
            agent.call("preload", name=self.name, spec=rec.spec.to_json(), lazy=self.stats.mode == "lazy",
                       memory=self.memory, tcp_close=self.tcp_close, started=rec.started)
        outgoing.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(outgoing, ignore_errors=True)
        parent = self._precopy(agent, rsync, rec, outgoing, incoming) if self.stats.mode == "precopy" else None
        pages = None
        if self.stats.mode == "lazy":  # the target's lazy-pages daemon will fetch the memory through it
            with self._step("page connection"):
                pages = self._connect_pages(agent, rsync, incoming, "page_link")
        elif self.stream:  # CRIU writes the memory there while it dumps (after pre-copy: what is dirty since)
            with self._step("page connection"):
                pages = self._connect_pages(agent, rsync, incoming, "page_server", folder="images")
        try:
            # a lazy dump's page server has its last word after the restore: uncorked from then on
            with pagelink.Uncorker(pages if self.stats.mode != "lazy" else None):
                self._checkpoint(agent, rsync, rec, cdir, outgoing, incoming, pages, parent)
        finally:
            if pages is not None:
                pages.close()

    def _checkpoint(self, agent: Agent, rsync: Rsync, rec, cdir: Path, outgoing: Path, incoming: str,
                    pages: socket.socket | None, parent: str | None) -> None:
        """From the freeze to the commit."""
        self._begin("checkpoint")
        agent.proc.check()  # an agent known gone already is found before anything freezes
        self.freeze_started = time.monotonic()
        self.frozen_until = self.freeze_started + self.freeze_timeout
        with ThreadPoolExecutor(1, thread_name_prefix="frozen-walk") as walker:
            def seized() -> None:  # the upper dir is walked beside CRIU's dump, not after it
                self.upper_frozen = walker.submit(self._upper_changes, rec, cdir)

            self._freeze(agent, rsync, rec, cdir, outgoing, incoming, pages, parent, seized)

    def _freeze(self, agent: Agent, rsync: Rsync, rec, cdir: Path, outgoing: Path, incoming: str,
                pages: socket.socket | None, parent: str | None, seized: Callable[[], None]) -> None:
        """The dump, and inside it the move: lazy mode's (memory after the restore), or the others'
        (the final sync, restore and commit in CRIU's post-dump, so a failure resumes the source)."""
        if self.stats.mode == "lazy":
            self._freeze_lazy(agent, rsync, rec, outgoing, pages, seized,
                              lambda: self._ship(agent, rsync, rec, cdir, outgoing, incoming))
        else:
            def on_frozen() -> None:
                try:
                    if pages is not None:  # CRIU flushed the pages before this hook: the page server ends
                        agent.call("page_server_done", name=self.name, timeout=self._left(), timeout_s=self._left())
                    self._ship(agent, rsync, rec, cdir, outgoing, incoming)()
                    with self._step("restore"), self.stats.phase("restore"):
                        # past this instant plus the window, an uncommitted copy there is gone
                        self.restore_asked = True
                        left = self._left()
                        self.copy_deadline = time.monotonic() + left + COMMIT_WINDOW
                        agent.call("restore", name=self.name, timeout=left, commit_within=left + COMMIT_WINDOW)
                    self._commit(agent, rec)
                    self.stats.downtime = time.monotonic() - self.freeze_started
                except InDoubt:
                    raise
                except BaseException:
                    self._end_target_copy(agent, rec)  # before CRIU resumes the source
                    raise

            dump(rec, cdir, outgoing, leave_running=False, on_frozen=on_frozen, on_seized=seized,
                 page_socket=pages.fileno() if pages is not None else None, parent_images=parent)
            if pages is not None:
                with contextlib.suppress(OSError, CriuError):  # a figure: the move is done whether known or not
                    self.stats.bytes["pages"] += pages_written(outgoing / "images" / "stats-dump") * precopy.PAGE_SIZE

    def _connect_pages(self, agent: Agent, rsync: Rsync, incoming: str, op: str, **args) -> socket.socket:
        """The page connection to the target (migrate/pagelink.py), where the agent's OP takes it:
        `page_server` starts a page server on it, `page_link` keeps it for the lazy restore.
        Direct when asked for, unless that fails: then, for the rest of the migration, by SSH."""
        if self.direct:
            try:
                link = pagelink.direct(self.peer, lambda port, token: agent.call(
                    op, name=self.name, direct={"port": port, "token": token}, **args))
            except PeerLost:
                raise
            except RemoteError as e:
                self.direct = False
                self.stats.notes.append(f"no direct page connection ({e}): memory goes through SSH")
            else:
                self.stats.page_link = "direct"
                return link
        self.stats.page_link = "ssh"
        return pagelink.connect(rsync, incoming, lambda path: agent.call(op, name=self.name, socket=path, **args))

    def _pages_sent(self, rsync: Rsync, pages: socket.socket) -> Callable[[], int]:
        """Bytes sent on the page connection from now on: a direct one's own count, else what the
        SSH connection's ssh process has read (the pages are all it carries meanwhile)."""
        if pages.family != socket.AF_UNIX:  # a direct connection
            def count() -> int | None:
                return pagelink.bytes_sent(pages)
        else:
            master = rsync.session.master_pid

            def count() -> int | None:
                return procfs.bytes_read(master)
        start = count()

        def since() -> int:
            now = count()
            return now - start if now is not None and start is not None else 0
        return since

    def _precopy(self, agent: Agent, rsync: Rsync, rec, outgoing: Path, incoming: str) -> str:
        """Pre-dump rounds while the container runs, each sending what was dirtied since the one
        before, until a stop rule (migrate/precopy.py) says to freeze. Returns the last round's
        folder, relative to the final dump's images, which sends only what is dirty since."""
        rounds: list[precopy.Round] = []
        parent = None
        with self._step("pre-copy"), self.stats.phase("pre-copy (running)"):
            outgoing.mkdir(mode=0o700)
            while True:
                folder = f"pre-{len(rounds) + 1}"
                started = time.monotonic()
                with self._connect_pages(agent, rsync, incoming, "page_server", folder=folder) as pages, \
                        pagelink.Uncorker(pages):
                    written = pre_dump(rec, outgoing / folder, pages.fileno(), parent)
                agent.call("page_server_done", name=self.name, timeout=90, timeout_s=60)
                rounds.append(precopy.Round(written, time.monotonic() - started))
                self.stats.bytes["pre-copy"] += written * precopy.PAGE_SIZE
                parent = f"../{folder}"
                reason = precopy.stop_reason(rounds)
                if reason is not None:
                    sizes = ", ".join(str(r.pages_written) for r in rounds)
                    self.stats.notes.append(f"pre-copy: {len(rounds)} round(s) of {sizes} pages, then the freeze: "
                                            f"{reason}")
                    return parent

    def _left(self) -> float:
        """Seconds left of the frozen window; past it the migration fails (and rolls back)."""
        left = self.frozen_until - time.monotonic()
        if left <= 0:
            raise MigrateError(f"the source was frozen for {self.freeze_timeout:.0f} s (--freeze-timeout) "
                               "without the move completing")
        return left

    def _ship(self, agent: Agent, rsync: Rsync, rec, cdir: Path, outgoing: Path,
              incoming: str) -> Callable[[], None]:
        """While frozen: CRIU's images, what changed in the upper dir since its running copy began,
        and the log, to the target. Small (the rule: CRIU's images without memory are a few hundred
        KB), they go in one message on the agent's connection: no SSH channel to open, no rsync
        processes to start, no file list of the whole upper dir on both hosts. Beyond INLINE_MAX,
        one rsync run. Returns what waits for the target's receipt: lazy mode waits for it only
        before the restore, so that the target unpacks while CRIU starts serving pages."""
        self.stats.phases["checkpoint"] = time.monotonic() - self.freeze_started
        self.journal.note(self.id, journal.SOURCE, "checkpoint", "done")
        self._begin("final sync")
        started = time.monotonic()
        try:
            request = self._send_checkpoint(agent, rsync, rec, cdir, outgoing, incoming)
        except BaseException as e:
            self.journal.note(self.id, journal.SOURCE, "final sync", "failed", str(e) or type(e).__name__)
            raise

        def received() -> None:
            try:
                agent.answer(request, timeout=self._left())
            except BaseException as e:
                self.journal.note(self.id, journal.SOURCE, "final sync", "failed", str(e) or type(e).__name__)
                raise
            self.journal.note(self.id, journal.SOURCE, "final sync", "done")
            self.stats.phases["final sync (frozen)"] = time.monotonic() - started

        return received

    def _send_checkpoint(self, agent: Agent, rsync: Rsync, rec, cdir: Path, outgoing: Path, incoming: str) -> int:
        """The final sync's files sent (inline or by rsync), and the target asked to `receive`
        them: the request's id."""
        upper, log = cdir / "upper", cdir / "container.log"
        changed = self.upper_frozen.result() if self.upper_frozen is not None else self._upper_changes(rec, cdir)
        images = treesync.walk(outgoing / "images").entries
        checkpoint = ["spec.json", "checkpoint.json", "images", *(f"images/{path}" for path in images)]
        image_bytes = sum(e.size for e in images.values()) + sum((outgoing / f).stat().st_size for f in checkpoint[:2])
        log_bytes = log.stat().st_size if log.exists() else 0
        if image_bytes + changed.data_bytes + log_bytes <= INLINE_MAX:
            self.stats.bytes["images"] += image_bytes
            self.stats.bytes["upper"] += changed.data_bytes + log_bytes
            return agent.ask("receive", name=self.name, checkpoint=treesync.pack(outgoing, checkpoint),
                             upper=treesync.pack(upper, changed.changed, changed.removed),
                             log=treesync.pack(cdir, [log.name] if log.exists() else []))
        self.stats.notes.append(f"final sync by rsync: {(image_bytes + changed.data_bytes + log_bytes) / 2**20:.1f} "
                                f"MiB to send while frozen (more than {INLINE_MAX >> 20} MiB)")
        sources = [*(outgoing / path for path in checkpoint[:3]), upper]
        if log.exists():
            sources.append(log)
        # the target's page server wrote the memory there (but in lazy mode): --delete must leave it
        keep = ("/images/pages-*.img", "/images/pagemap-*.img", "/images/page-server.log") if self.stream else ()
        sent = rsync.send(sources, incoming + "/", "checkpoint", image_bytes, delete=True, timeout=self._left(),
                          keep=keep)
        self.stats.bytes["images"] += min(sent, image_bytes)
        self.stats.bytes["upper"] += max(0, sent - image_bytes)
        return agent.ask("receive", name=self.name)

    def _upper_changes(self, rec, cdir: Path) -> treesync.Changes:
        """What changed in the upper dir since its running copy began, read while the tree is
        frozen; files its processes map shared and writable count as changed whatever their
        metadata says: writes through such a mapping need not touch it."""
        rootfs = f"{cdir / 'rootfs'}/"  # how /proc shows the container's files to us (or as it sees them)
        mapped = {path.removeprefix(rootfs).lstrip("/")
                  for path in procfs.mapped_for_writing(Cgroups(rec.cgroups).pids())}
        return treesync.changes(self.upper_copied, cdir / "upper", always=mapped)

    def _wait_pages(self, agent: Agent, moved: Callable[[], int]) -> None:
        """The target fetches memory while it runs; show how far it got (MOVED) while we wait."""
        done = threading.Event()
        with DelayedProgress("memory pages", self.memory) as progress:
            def watch() -> None:
                while not done.wait(0.2):
                    progress.update(moved())

            watcher = threading.Thread(target=watch, name="pages-progress", daemon=True)
            watcher.start()
            try:
                # the agent gives up after PAGES_TIMEOUT; we wait a little longer for its answer. If
                # the answer is lost, the agent may have armed its commit deadline just now.
                agent.call("wait_pages", timeout=PAGES_TIMEOUT + 60, name=self.name, timeout_s=PAGES_TIMEOUT,
                           commit_within=COMMIT_WINDOW)
            finally:
                self.copy_deadline = time.monotonic() + COMMIT_WINDOW
                done.set()
                watcher.join(1.0)
        self.stats.bytes["pages"] += moved()

    def _commit(self, agent: Agent, rec) -> None:
        """The target owns the container from its decision on; only then may the source go.

        The source is first frozen by its cgroup as well: CRIU lets a tree go when this process
        dies, and if that happens after the target decided, the source must not run on. So
        whatever happens from here, the source resumes only when the target is known not to
        have committed: from its answer, or from asking again on a new connection. When it
        cannot be asked, the source stays frozen (in doubt) until `migrate recover`."""
        cgroups = Cgroups(rec.cgroups)
        try:
            cgroups.freeze(wait=False)  # CRIU holds the tree: it freezes when CRIU lets it go
            with self._step("commit"):
                try:
                    agent.call("commit", name=self.name, migration=self.id, timeout=COMMIT_ANSWER_TIMEOUT)
                    outcome = journal.COMMITTED
                except PeerLost as e:
                    outcome = self._ask_target(e)
                # a refusal (RemoteError) means the target decided `aborted` before it answered
                self.journal.decide(self.id, journal.SOURCE, outcome)
                if outcome != journal.COMMITTED:
                    raise RemoteError(f"{self.spec.alias} lost the answer to the commit and, asked again, says "
                                      "it aborted the migration")
        except InDoubt:
            raise
        except BaseException:
            cgroups.thaw()  # known not committed: the source may run again
            raise

    def _ask_target(self, why: MigrateError) -> str:
        """Ask the target, on a new connection, how the migration ended (deciding `aborted`
        there if it is undecided). Raises InDoubt when it cannot be asked."""
        deadline = time.monotonic() + RESOLVE_TIMEOUT
        last: MigrateError = why
        while time.monotonic() < deadline:
            try:
                return resolve_on(self.spec, self.id, timeout=max(1.0, deadline - time.monotonic()))
            except MigrateError as e:
                last = e
                time.sleep(1.0)
        raise InDoubt(f"the answer of {self.spec.alias} to the commit of {self.name} was lost ({why}) and "
                      f"{self.spec.alias} cannot be asked again ({last}): {self.name} is held frozen here; "
                      f"run `migrate recover {self.name}` once {self.spec.alias} is reachable")

    def _end_target_copy(self, agent: Agent, rec) -> None:
        """After a failure while the source is frozen: the copy the target may run must be gone
        before CRIU resumes the source. The agent answers an abort once it is; else the target
        is asked again; else the source waits until the target's copy has ended by itself."""
        if not self.restore_asked:
            return  # the target has no copy
        try:
            agent.call("abort", timeout=10.0)
            return
        except MigrateError:
            pass
        try:
            if resolve_on(self.spec, self.id, timeout=10.0) == journal.ABORTED:
                return
            raise InDoubt(f"{self.spec.alias} committed {self.name} after its migration failed here")
        except InDoubt:
            Cgroups(rec.cgroups).freeze(wait=False)
            raise
        except MigrateError:
            pass
        if self.copy_deadline is not None:  # lazy mode before the last page: the reset that follows ends it
            time.sleep(max(0.0, self.copy_deadline - time.monotonic()) + 1.0)

    def _freeze_lazy(self, agent: Agent, rsync: Rsync, rec, outgoing: Path, pages: socket.socket,
                     seized: Callable[[], None], ship: Callable[[], Callable[[], None]]) -> None:
        """Post-copy: CRIU dumps all but memory (shipped by `ship` in post-dump, frozen), then serves
        it on the page connection to the target's lazy-pages daemon, and returns once that has
        every page (or the connection ends); so the dump runs in a thread.

        From post-dump on the cgroup freezer holds the tree too, and CRIU leaves it running when
        it is done, whether the transfer worked or not: what becomes of the source is decided
        here alone, after the target's answer. It is killed once the target has committed, and
        thawed once the target's copy is known to be gone (docs/lazy-migration.md).
        """
        cgroups = Cgroups(rec.cgroups)
        outcome: dict = {}
        ready = threading.Event()

        def frozen() -> None:
            outcome["received"] = ship()
            cgroups.freeze(wait=False)  # CRIU holds the tree: it freezes as CRIU lets it go

        def run_dump() -> None:
            try:
                dump(rec, self.rt.root.container_dir(self.name), outgoing, leave_running=True, on_frozen=frozen,
                     lazy=True, page_socket=pages.fileno(), on_seized=seized,
                     on_notify=lambda script: ready.set() if script == "status-ready" else None,
                     on_criu=lambda pid: outcome.__setitem__("criu", pid))
            except BaseException as e:  # noqa: BLE001 - handed to the controller's thread
                outcome["error"] = e
            finally:
                ready.set()

        thread = threading.Thread(target=run_dump, name="criu-lazy-dump", daemon=True)
        thread.start()
        try:
            ready.wait()
            if "error" in outcome:
                raise outcome["error"]
            faults.point("page-server-ready")  # CRIU serves pages, the target has not asked for any
            outcome["received"]()
            moved = self._pages_sent(rsync, pages)
            with self._step("restore"), self.stats.phase("restore"):
                self.restore_asked = True
                agent.call("restore", name=self.name, lazy=True, timeout=self._left())
            self.stats.downtime = time.monotonic() - self.freeze_started
            with self._step("memory pages"), self.stats.phase("pages (running)"), pagelink.Uncorker(pages):
                self._wait_pages(agent, moved)
            self._commit(agent, rec)
        except BaseException as e:
            doubt = e if isinstance(e, InDoubt) else None
            if doubt is None:
                try:
                    self._end_target_copy(agent, rec)
                except InDoubt as found:
                    doubt = found
            self._end_lazy_dump(pages, thread, outcome)
            if doubt is None:
                cgroups.thaw()  # the target's copy is gone: the source runs on
                raise
            if doubt is not e:
                raise doubt from e
            raise
        self._end_lazy_dump(pages, thread, outcome)
        cgroups.kill()  # the target has committed: the source's tree ends (frozen, it dies of SIGKILL too)

    @staticmethod
    def _end_lazy_dump(pages: socket.socket, thread: threading.Thread, outcome: dict) -> None:
        """CRIU's page server sees the page connection end (if it still serves: after the last
        page it has ended already) and lets the tree go, which the freezer holds."""
        with contextlib.suppress(OSError):
            pages.shutdown(socket.SHUT_RDWR)
        thread.join(DUMP_JOIN_TIMEOUT)
        if thread.is_alive():  # last resort: CRIU's cleanup is skipped, the freezer still holds the tree
            linux.send_signal(outcome.get("criu"), signal.SIGKILL)
            thread.join(DUMP_JOIN_TIMEOUT)

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
