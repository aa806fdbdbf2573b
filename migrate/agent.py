"""`migrate agent`: the target side of a migration, spoken to over the SSH connection.

One JSON request per line on stdin, one JSON answer per line on stdout. The agent remembers
what the current migration has made on this host, so when the connection drops before the
controller says `commit`, everything is undone here: the source still has the container
(CRIU resumes it when the controller's post-dump hook fails), and it must not run twice.
"""

import base64
import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from runtime import criulogs, faults, journal, linux, procfs, states
from runtime.cgroups import Cgroups
from runtime.container import LaunchedShim, Runtime
from runtime.criu import PAGES_STALL, Criu, LazyPagesDaemon, PageServer
from runtime.errors import Conflict, CriuError, InvalidInput, MigrateError, NotFound, RemoteError
from runtime.facts import cpuinfo_check, host_facts, meminfo
from runtime.reconcile import owner_file, write_transfer_owner
from runtime.snapshots import Snapshots
from runtime.spec import ContainerSpec, validate_name

from . import pagelink, treesync
from .protocol import HEARTBEAT, HEARTBEAT_SILENCE, MAX_LINE, PROTOCOL, Heartbeat
from .warmmemory import WarmMemory

COMMIT_GRACE = 0.3  # a restored copy must still run this long after the commit arrives
# requests that are steps of the migration: journaled before and after
_STEPS = {"adopt_layers": "layers", "preload": "preload", "page_server": "pre-copy", "page_link": "page connection",
          "receive": "final sync", "restore": "restore",
          "wait_pages": "memory pages", "commit": "commit"}
_ROUND_FOLDER = re.compile(r"pre-[1-9][0-9]{0,2}|images")  # pre-copy's rounds, then the final dump's
_MIGRATION_ID = re.compile(r"[0-9a-f]{8,64}")
_PAGE_SOCKET = re.compile(r"pages-[0-9a-f]{8}\.sock")
_TOKEN = re.compile(f"[0-9a-f]{{{2 * pagelink.TOKEN_BYTES}}}")
PAGE_CONNECT_TIMEOUT = 10.0


@dataclass
class _Pending:
    """What the current migration has created on this host so far."""

    name: str
    migration: str
    incoming: Path
    staging: Path
    adopted: list[str] = field(default_factory=list)
    page_link: socket.socket | None = None  # lazy mode: the page connection, until every page is here
    uncorker: pagelink.Uncorker | None = None  # lazy mode, from the restore on
    pages: LazyPagesDaemon | None = None  # lazy mode: fetching memory from the source
    page_server: PageServer | None = None  # pre-copy: receiving a round's pages
    rounds: list[str] = field(default_factory=list)  # pre-copy: the folders of the rounds received
    received: bool = False  # the final sync is done: the checkpoint is complete here
    shim: LaunchedShim | None = None  # started before the freeze, told to go at restore
    deadline: threading.Timer | None = None  # aborts the restored copy if no commit comes in time
    warm: WarmMemory | None = None  # memory touched before the freeze, given back as it is needed


class Agent:
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.pending: _Pending | None = None
        self.heartbeat_agreed = False  # hello came from a controller of our protocol: both send heartbeats

    def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            raise InvalidInput(f"unknown agent request {op!r}")
        # the final dump's page server is a step of its own (every round before it, pre-copy's)
        step = "page connection" if op == "page_server" and msg.get("folder") == "images" else _STEPS.get(op)
        if step is not None or op == "prepare":
            faults.point("target-" + (step or op).replace(" ", "-"))
        p = self.pending if step else None
        if p is not None:
            if self.rt.catalog.journal.get(p.migration, journal.TARGET).outcome == journal.ABORTED:
                # decided by the agent a source asked on a new connection (this one hung meanwhile)
                raise Conflict(f"the migration of {p.name} was aborted here")
            self.rt.catalog.journal.note(p.migration, journal.TARGET, step, "begin")
        try:
            answer = method(msg)
        except MigrateError as e:
            if p is not None:
                self.rt.catalog.journal.note(p.migration, journal.TARGET, step, "failed", str(e))
            if isinstance(e, CriuError) and self.pending is not None:
                # its CRIU log is in the incoming folder, which an abort removes
                raise criulogs.keep_failed(self.rt.root, self.pending.name, e) from None
            raise
        if p is not None:
            self.rt.catalog.journal.note(p.migration, journal.TARGET, step, "done")
        return answer

    def op_hello(self, msg: dict) -> dict:
        self.heartbeat_agreed = msg.get("protocol") == PROTOCOL
        return {"protocol": PROTOCOL, "peer": _ssh_client(),
                "facts": host_facts(self.rt.root, [c.name for c in self.rt.catalog.containers()],
                                    self.rt.layers.digests())}

    def op_cpuinfo_check(self, msg: dict) -> dict:
        ok, message = cpuinfo_check(Criu(), base64.b64decode(msg["image"]))
        return {"compatible": ok, "message": message}

    def op_ports_taken(self, msg: dict) -> dict:
        """Which of the container's ports something on this host holds already."""
        try:
            wanted = [procfs.Port.from_json(p) for p in msg.get("ports", [])]
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"bad port list: {e}") from None
        return {"taken": [str(p) for p in procfs.ports_taken(wanted)]}

    def op_prepare(self, msg: dict) -> dict:
        name = validate_name(msg["name"])
        migration = _migration_id(msg)
        if self.rt.catalog.find_container(name) is not None:
            raise Conflict(f"a container named {name} already exists on this host")
        missing = [v for v in msg.get("volumes", []) if not Path(v).exists()]
        if missing:
            raise NotFound(f"volume source(s) missing on this host: {', '.join(missing)}")
        self.abort()
        # a short random name: CRIU's lazy-pages socket lives in it, and socket paths are short
        incoming = self.rt.root.incoming / secrets.token_hex(4)
        incoming.mkdir(parents=True, mode=0o700)
        self.rt.catalog.journal.begin(migration, journal.TARGET, name, str(msg.get("source", "?")))
        self.rt.catalog.journal.note(migration, journal.TARGET, "prepare", "done", str(incoming))
        self.pending = _Pending(name, migration, incoming, self.rt.layers.staging_dir())
        # whose they are: if this agent dies (SIGKILL), the next command here removes them
        write_transfer_owner(incoming, self.pending.staging)
        return {"incoming": str(incoming), "staging": str(self.pending.staging)}

    def op_adopt_layers(self, msg: dict) -> dict:
        """The layers' blobs, rsynced into staging: each verified against its digest before it is
        extracted (one import budget for them all); one that does not match fails the step."""
        p = self._pending(msg)
        budget = self.rt.layers.import_budget()
        for digest in msg["digests"]:
            if self.rt.layers.adopt(digest, p.staging, budget):
                p.adopted.append(digest)
        return {"adopted": len(p.adopted)}

    def op_preload(self, msg: dict) -> dict:
        """Before the freeze: the container's record and folders, and its shim's interpreter
        already started, so the restore inside the downtime does only the restore."""
        p = self._pending(msg)
        spec = ContainerSpec.from_json(msg["spec"]).renamed(p.name)
        self.rt.require_layers(spec)
        self.rt.create_record(spec)
        self.rt.catalog.set_fields(p.name, migration=p.migration)  # an uncommitted copy of this migration
        started = msg.get("started")
        if isinstance(started, (int, float)) and not isinstance(started, bool):
            self.rt.catalog.set_fields(p.name, started=float(started))  # STARTED moves with it
        # fenced: until the commit, the restored copy lives only as long as this agent does
        p.shim = self.rt.launch_shim(p.name, "restore", p.incoming, bool(msg.get("lazy")),
                                     tcp_close=bool(msg.get("tcp_close")), migration=p.migration)
        # the memory the freeze will fill touched now, while the source runs, and held until it is
        # needed (migrate/warmmemory.py): the restored memory, and where pages go to files first,
        # as much again, freed when the first page server starts. At most half of what is free,
        # so nothing is reclaimed for it.
        memory = msg.get("memory")
        if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
            parts = 1 if msg.get("lazy") else 2
            p.warm = WarmMemory(min(memory * parts, (meminfo("MemFree") or 0) // 2), parts)
        return {}

    def op_page_server(self, msg: dict) -> dict:
        """A page server for the next round (a pre-dump's, or the final dump's into `images`), in
        its own folder linked to the round before, on a page connection (migrate/pagelink.py)."""
        p = self._pending(msg)
        folder = msg.get("folder")
        if not isinstance(folder, str) or not _ROUND_FOLDER.fullmatch(folder) or folder in p.rounds:
            raise InvalidInput(f"bad pre-copy folder {folder!r}")
        if p.page_server is not None:
            raise Conflict(f"the page server of round {p.rounds[-1]} is still running")
        with _page_connection(p, msg) as link:  # first: a direct one that fails is asked for again by SSH
            (p.incoming / folder).mkdir(mode=0o700)
            if p.warm is not None and not p.rounds:
                p.warm.release(1)  # for the page files this server writes
            p.page_server = Criu().page_server(p.incoming / folder, link.fileno(),
                                               f"../{p.rounds[-1]}" if p.rounds else None)
        p.rounds.append(folder)
        return {}

    def op_page_link(self, msg: dict) -> dict:
        """Lazy mode: the page connection, kept for the lazy-pages daemon the restore starts."""
        p = self._pending(msg)
        if p.page_link is not None:
            raise Conflict(f"the migration of {p.name} has its page connection already")
        p.page_link = _page_connection(p, msg)
        return {}

    def op_page_server_done(self, msg: dict) -> dict:
        """The round's pages are all here (the page server ended well), or the round failed."""
        p = self._pending(msg)
        if p.page_server is None:
            raise Conflict(f"no page server runs for {p.name}")
        server, p.page_server = p.page_server, None
        server.wait(float(msg.get("timeout_s", 60)))
        return {}

    def op_receive(self, msg: dict) -> dict:
        """The frozen final sync is here: what did not come by rsync comes in this message (CRIU's
        images, the upper dir's last changes, the log: migrate/treesync.py packets)."""
        p = self._pending(msg)
        if p.received:
            raise Conflict(f"the checkpoint of {p.name} was received already")
        for key, folder in (("checkpoint", p.incoming), ("upper", p.incoming / "upper"), ("log", p.incoming)):
            packet = msg.get(key)
            if packet is not None:
                treesync.unpack(folder, packet)
        p.received = True
        return {}

    def op_restore(self, msg: dict) -> dict:
        """Restore from the incoming folder; when lazy, memory comes from the source's CRIU
        through the page connection. (The lazy-pages daemon starts here, not earlier: killed
        with this agent before the restore, it would wait for a restore forever.)"""
        p = self._pending(msg)
        if not p.received:
            raise Conflict(f"the checkpoint of {p.name} has not been received")
        if p.warm is not None:
            p.warm.release()  # for the memory restored now (lazily: as its pages come)
        if msg.get("lazy"):
            if p.page_link is None:
                raise Conflict(f"the migration of {p.name} has no page connection")
            p.pages = Criu().lazy_pages(p.incoming / "images", p.page_link.fileno())
            p.uncorker = pagelink.Uncorker(p.page_link)
        rec = Snapshots(self.rt).restore_dir(p.incoming, p.name, move=True, lazy=p.pages is not None, shim=p.shim)
        if p.pages is None:
            _remove_incoming(p.incoming)
            self._commit_within(p, msg)
        return {"pid": rec.pid}

    def op_wait_pages(self, msg: dict) -> dict:
        """Lazy mode: wait until every page has arrived. If the transfer fails, the container
        here would read zeroes where pages are missing: it is killed at once."""
        p = self._pending(msg)
        if p.pages is None:
            raise Conflict(f"{p.name} is not being restored lazily")
        faults.point("pages")
        stall = PAGES_STALL
        if faults.active("pages-stall"):  # a page connection that goes silent, in 2 s
            os.kill(p.pages.proc.pid, signal.SIGSTOP)
            stall = 2.0
        try:
            status = p.pages.wait(float(msg.get("timeout_s", 3600)), stall)
        except CriuError:
            self.rt.release(p.name)
            raise
        finally:
            _end_page_link(p)
        if status != 0:
            self.rt.release(p.name)
            raise CriuError(f"the lazy page transfer failed: {p.pages.failure()}", log=p.pages.log, op="lazy-pages")
        _remove_incoming(p.incoming)
        self._commit_within(p, msg)
        return {}

    def _commit_within(self, p: _Pending, msg: dict) -> None:
        """The copy runs now, fenced; if no commit arrives within the controller's deadline
        (it hangs, the network is cut without an EOF), it is aborted here by itself: so the
        source knows that, past that deadline, the copy here is gone unless it sent a commit."""
        seconds = msg.get("commit_within")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
            return
        p.deadline = threading.Timer(float(seconds), _abort_copy, (self.rt.root, p.name, p.migration))
        p.deadline.daemon = True
        p.deadline.start()

    def op_commit(self, msg: dict) -> dict:
        """The copy here becomes the container, if it still runs: a tree that died after its
        restore (a CPU feature, the OOM killer) must not be committed, or the source would end
        its only living copy. The decision is the journal's, durable before anyone acts on it."""
        p = self._pending(msg)
        faults.point("commit")
        time.sleep(COMMIT_GRACE)
        aborted = Conflict(f"the migration of {p.name} was aborted here (no commit within its deadline, "
                           "or the source asked after a lost answer)")
        if self.rt.catalog.journal.get(p.migration, journal.TARGET).outcome == journal.ABORTED:
            raise aborted
        rec = self.rt.catalog.find_container(p.name)
        if rec is None or rec.state != states.RUNNING or not linux.pid_running(rec.pid):
            self.rt.catalog.journal.decide(p.migration, journal.TARGET, journal.ABORTED)
            code = f" (exit code {rec.exit_code})" if rec is not None and rec.exit_code is not None else ""
            raise Conflict(f"{p.name} was restored here but no longer runs: {rec.state if rec else 'gone'}{code}")
        if self.rt.catalog.journal.decide(p.migration, journal.TARGET, journal.COMMITTED) != journal.COMMITTED:
            raise aborted
        if p.deadline is not None:
            p.deadline.cancel()
        faults.point("commit-decided")  # decided, the shim not told yet: it must not kill the copy
        self.rt.catalog.set_fields(p.name, migration=None)
        if p.shim is not None:
            with contextlib.suppress(MigrateError):  # a shim that died leaves the tree running unsupervised
                p.shim.commit()  # from here on the copy here runs on whatever happens to this agent
        _end_transfer(p)
        self.rt.catalog.journal.finish(p.migration, journal.TARGET)
        self.pending = None
        faults.point("committed")  # the answer is not sent yet: the source must ask again
        return {}

    def op_resolve(self, msg: dict) -> dict:
        """Asked by a source that lost the answer to a request (on a new connection, so possibly
        while the first agent still lives): the migration's outcome, deciding `aborted` if it is
        undecided, in which case its copy here is ended. An unknown migration never reached this
        host, which is as good as aborted."""
        migration = _migration_id(msg)
        row = self.rt.catalog.journal.get(migration, journal.TARGET)
        if row is None:
            return {"outcome": journal.ABORTED, "known": False}
        outcome = self.rt.catalog.journal.decide(migration, journal.TARGET, journal.ABORTED)
        if outcome == journal.ABORTED:
            _abort_copy(self.rt.root, row.container, migration)
            self.rt.catalog.journal.finish(migration, journal.TARGET)
        return {"outcome": outcome, "known": True}

    def op_abort(self, _msg: dict) -> dict:
        self.abort()
        return {}

    def abort(self) -> None:
        """Undo an uncommitted migration: the container (if restored), its files, staged layers."""
        p, self.pending = self.pending, None
        if p is None:
            return
        if p.deadline is not None:
            p.deadline.cancel()
        self.rt.catalog.journal.decide(p.migration, journal.TARGET, journal.ABORTED)
        if p.shim is not None:
            p.shim.cancel()  # a restored copy is fenced: its shim kills it and drops its record
        rec = self.rt.catalog.find_container(p.name)
        if rec is not None:
            if rec.state == states.RUNNING:
                self.rt.stop(p.name, timeout=0)
            self.rt.discard(p.name)
        if p.pages is not None:  # only now: the tree must never run without its pages
            p.pages.kill()
        _end_page_link(p)
        if p.page_server is not None:
            p.page_server.kill()
        _end_transfer(p)
        if p.adopted:
            self._remove_layers(p.adopted)
        self.rt.catalog.journal.finish(p.migration, journal.TARGET)

    def _remove_layers(self, digests: list[str]) -> None:
        """The layers this migration brought, unless an image, container or snapshot here uses
        them: holding the catalog's write lock, so no record can start to use one meanwhile."""
        with self.rt.catalog.transaction():
            used = self.rt.catalog.layers_in_use()
            for digest in digests:
                self.rt.layers.remove_unused(digest, used)

    def _pending(self, msg: dict) -> _Pending:
        if self.pending is None or self.pending.name != msg.get("name"):
            raise Conflict(f"no migration of {msg.get('name')!r} is being prepared here")
        return self.pending


def _migration_id(msg: dict) -> str:
    migration = msg.get("migration")
    if not isinstance(migration, str) or not _MIGRATION_ID.fullmatch(migration):
        raise InvalidInput(f"bad migration id {migration!r}")
    return migration


def _abort_copy(root, name: str, migration: str) -> None:
    """End the uncommitted copy of `migration`, if it is still undecided or aborted: decided
    `aborted` first, so that no commit can follow; the fenced shim then removes the record."""
    rt = Runtime(root)
    try:
        if rt.catalog.journal.decide(migration, journal.TARGET, journal.ABORTED) != journal.ABORTED:
            return
        rec = rt.catalog.find_container(name)
        if rec is None or rec.migration != migration:
            return
        if rec.state == states.CREATED:  # preloaded, never restored: its shim idles until its agent goes
            rt.discard(name)  # (and a restore still to come fails on the missing record)
            return
        Cgroups(rec.cgroups).kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its fenced shim sees it die and removes the record
            rec = rt.catalog.find_container(name)
            if rec is None or rec.migration != migration:
                return
            if not (rec.shim_pid and linux.pid_running(rec.shim_pid)):
                break
            time.sleep(0.05)
        rt.discard(name)  # its shim is gone (or hangs): nothing else will
    finally:
        rt.close()


def _page_connection(p: _Pending, msg: dict) -> socket.socket:
    """The page connection (migrate/pagelink.py): direct when the message says so, else the
    socket sshd made in the incoming folder for the source's end, removed once connected to:
    nobody else can connect to it any more."""
    if "direct" in msg:
        return _direct_connection(msg["direct"])
    path = msg.get("socket")
    if not isinstance(path, str) or Path(path).parent != p.incoming or not _PAGE_SOCKET.fullmatch(Path(path).name):
        raise InvalidInput(f"bad page connection socket {path!r}")
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link.settimeout(PAGE_CONNECT_TIMEOUT)
        link.connect(path)
        link.settimeout(None)
    except OSError as e:
        link.close()
        raise RemoteError(f"cannot reach the page connection at {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return link


def _end_page_link(p: _Pending) -> None:
    """Lazy mode: this end of the page connection, once the daemon is done with it."""
    if p.uncorker is not None:
        p.uncorker.stop()
        p.uncorker = None
    if p.page_link is not None:
        p.page_link.close()
        p.page_link = None


def _direct_connection(direct: object) -> socket.socket:
    """Connect to the source where SSH says it is (not where the message says: the agent reaches
    no other address for anyone) and send it the migration's token."""
    port, token = (direct.get("port"), direct.get("token")) if isinstance(direct, dict) else (None, None)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536 \
            or not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise InvalidInput(f"bad direct page connection {direct!r}")
    address = _ssh_client()
    if address is None:
        raise RemoteError("no direct page connection: this agent was not started by sshd (no SSH_CONNECTION)")
    try:
        link = socket.create_connection((address, port), timeout=pagelink.DIRECT_CONNECT_TIMEOUT)
    except OSError as e:
        raise RemoteError(f"cannot reach {address} port {port} directly: {e.strerror or e}") from None
    try:
        link.sendall(bytes.fromhex(token))
        pagelink.tune(link)
        link.settimeout(None)
    except OSError as e:
        link.close()
        raise RemoteError(f"the direct page connection to {address} port {port} failed: {e.strerror or e}") from None
    return link


def _ssh_client() -> str | None:
    """The address the source connected to this host from, as sshd saw it (SSH_CONNECTION)."""
    words = os.environ.get("SSH_CONNECTION", "").split()
    try:
        return str(ipaddress.ip_address(words[0])) if words else None
    except ValueError:
        return None


def _remove_incoming(incoming: Path) -> None:
    """A migration's incoming folder, once restored from (its owner file stays to the end)."""
    shutil.rmtree(incoming, ignore_errors=True)


def _end_transfer(p: _Pending) -> None:
    """At the commit or the abort: the incoming and staging folders, the owner file, and
    incoming/ itself once empty: nothing of the migration stays."""
    if p.warm is not None:
        p.warm.release()
    _remove_incoming(p.incoming)
    shutil.rmtree(p.staging, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(owner_file(p.incoming))
    with contextlib.suppress(OSError):
        p.incoming.parent.rmdir()


def serve(inp=sys.stdin, out=sys.stdout) -> int:
    """Answer requests until EOF, until an answer cannot be written (the controller is gone), or
    until the controller has been silent past the heartbeat's limit (once hello agreed on one);
    an uncommitted migration is undone on the way out. Each answer carries its request's id; a
    request longer than MAX_LINE ends the session."""
    rt = Runtime()
    agent = Agent(rt)
    requests = _Requests(inp)
    send = _Sender(out)
    heartbeat: Heartbeat | None = None
    try:
        while True:
            try:
                line = requests.next(HEARTBEAT_SILENCE if heartbeat else None)
            except TimeoutError:
                print(f"migrate agent: no word from the controller for {HEARTBEAT_SILENCE:.0f} s: "
                      "undoing what it left uncommitted", file=sys.stderr)
                return 3
            if line is None:
                return 0
            if len(line) > MAX_LINE:
                send.answer({"ok": False, "exit_code": 2, "error": f"a request longer than {MAX_LINE} bytes: refused"})
                return 2
            try:
                send.answer(_answer(agent, line))
            except OSError as e:  # EPIPE, ECONNRESET: the controller, or its connection, is gone
                linux.detach(out)
                print(f"migrate agent: the controller's connection is gone ({e.strerror or e}): "
                      "undoing what it left uncommitted", file=sys.stderr)
                return 3
            if heartbeat is None and agent.heartbeat_agreed:
                heartbeat = Heartbeat(send.line)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        agent.abort()
        rt.close()


class _Requests:
    """The controller's lines, heartbeats skipped; with a real file descriptor, reading can
    give up on silence. (A stream without one, as in unit tests, is read line by line.)"""

    def __init__(self, inp):
        try:
            self._fd: int | None = inp.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        self._inp = inp
        self._buf = bytearray()
        self._eof = False

    def next(self, silence: float | None) -> str | None:
        """The next request line, None at EOF; TimeoutError after SILENCE seconds without a byte."""
        while True:
            line = self._line(silence)
            if line is None or line.rstrip("\r\n").encode() != HEARTBEAT:
                return line

    def _line(self, silence: float | None) -> str | None:
        if self._fd is None:
            return self._inp.readline(MAX_LINE + 1) or None
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_LINE or (self._eof and self._buf):
                line, self._buf = bytes(self._buf), bytearray()
                return line.decode(errors="replace")
            if self._eof:
                return None
            if silence is not None and not select.select([self._fd], [], [], silence)[0]:
                raise TimeoutError
            data = os.read(self._fd, 65536)
            self._eof = not data
            self._buf += data
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line.decode(errors="replace")


class _Sender:
    """Whole lines to the controller, from the main thread and the heartbeat's alike."""

    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()

    def answer(self, obj: dict) -> None:
        self.line(json.dumps(obj).encode())

    def line(self, data: bytes) -> None:
        with self._lock:
            self._out.write(data.decode() + "\n")
            self._out.flush()


def _answer(agent: Agent, line: str) -> dict:
    try:
        msg = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "a request that is not JSON", "exit_code": 2}
    request = msg.get("id") if isinstance(msg, dict) else None
    try:
        if not isinstance(msg, dict):
            raise InvalidInput("a request that is not a JSON object")
        answer = {"ok": True, **agent.handle(msg)}
    except MigrateError as e:
        answer = {"ok": False, "error": str(e), "exit_code": e.exit_code}
        if isinstance(e, CriuError) and e.log is not None:  # the controller names it with our host
            answer.update(error=e.detail, criu_log=str(e.log))
    except Exception as e:  # noqa: BLE001 - reported to the controller, logged here
        traceback.print_exc(file=sys.stderr)
        answer = {"ok": False, "error": f"{type(e).__name__}: {e}", "exit_code": 1}
    return {**answer, "id": request}
