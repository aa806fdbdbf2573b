"""`migrate agent`: the target side of a migration, spoken to over the SSH connection.

One JSON request per line on stdin, one JSON answer per line on stdout. The agent remembers
what the current migration has made on this host, so when the connection drops before the
controller says `commit`, everything is undone here: the source still has the container
(CRIU resumes it when the controller's post-dump hook fails), and it must not run twice.
"""

import base64
import contextlib
import json
import os
import secrets
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from runtime import criulogs, faults, linux, procfs, states
from runtime.container import LaunchedShim, Runtime
from runtime.criu import Criu, LazyPagesDaemon
from runtime.errors import Conflict, CriuError, InvalidInput, MigrateError, NotFound
from runtime.facts import cpuinfo_check, host_facts
from runtime.reconcile import owner_file, write_transfer_owner
from runtime.snapshots import Snapshots
from runtime.spec import ContainerSpec, validate_name

PROTOCOL = 1


@dataclass
class _Pending:
    """What the current migration has created on this host so far."""

    name: str
    incoming: Path
    staging: Path
    adopted: list[str] = field(default_factory=list)
    pages: LazyPagesDaemon | None = None  # lazy mode: fetching memory from the source
    shim: LaunchedShim | None = None  # started before the freeze, told to go at restore


class Agent:
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.pending: _Pending | None = None

    def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            raise InvalidInput(f"unknown agent request {op!r}")
        try:
            return method(msg)
        except CriuError as e:  # its CRIU log is in the incoming folder, which an abort removes
            if self.pending is None:
                raise
            raise criulogs.keep_failed(self.rt.root, self.pending.name, e) from None

    def op_hello(self, _msg: dict) -> dict:
        return {"protocol": PROTOCOL,
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
        if self.rt.catalog.find_container(name) is not None:
            raise Conflict(f"a container named {name} already exists on this host")
        missing = [v for v in msg.get("volumes", []) if not Path(v).exists()]
        if missing:
            raise NotFound(f"volume source(s) missing on this host: {', '.join(missing)}")
        self.abort()
        # a short random name: CRIU's lazy-pages socket lives in it, and socket paths are short
        incoming = self.rt.root.incoming / secrets.token_hex(4)
        incoming.mkdir(parents=True, mode=0o700)
        self.pending = _Pending(name, incoming, self.rt.layers.staging_dir())
        # whose they are: if this agent dies (SIGKILL), the next command here removes them
        write_transfer_owner(incoming, self.pending.staging)
        return {"incoming": str(incoming), "staging": str(self.pending.staging)}

    def op_adopt_layers(self, msg: dict) -> dict:
        p = self._pending(msg)
        for digest in msg["digests"]:
            if self.rt.layers.adopt(digest, p.staging):
                p.adopted.append(digest)
        return {"adopted": len(p.adopted)}

    def op_preload(self, msg: dict) -> dict:
        """Before the freeze: the container's record and folders, and its shim's interpreter
        already started, so the restore inside the downtime does only the restore."""
        p = self._pending(msg)
        spec = ContainerSpec.from_json(msg["spec"]).renamed(p.name)
        self.rt.require_layers(spec)
        self.rt.create_record(spec)
        started = msg.get("started")
        if isinstance(started, (int, float)) and not isinstance(started, bool):
            self.rt.catalog.set_fields(p.name, started=float(started))  # STARTED moves with it
        # fenced: until the commit, the restored copy lives only as long as this agent does
        p.shim = self.rt.launch_shim(p.name, "restore", p.incoming, bool(msg.get("lazy")),
                                     tcp_close=bool(msg.get("tcp_close")), fenced=True)
        return {}

    def op_restore(self, msg: dict) -> dict:
        """Restore from the incoming folder; with lazy_port, memory comes from the source's page
        server, reached at 127.0.0.1:lazy_port (a tunnel in the SSH connection)."""
        p = self._pending(msg)
        lazy_port = msg.get("lazy_port")
        if lazy_port is not None:
            p.pages = Criu().lazy_pages(p.incoming / "images", int(lazy_port))
        rec = Snapshots(self.rt).restore_dir(p.incoming, p.name, move=True, lazy=p.pages is not None, shim=p.shim)
        if p.pages is None:
            _remove_incoming(p.incoming)
        return {"pid": rec.pid}

    def op_wait_pages(self, msg: dict) -> dict:
        """Lazy mode: wait until every page has arrived. If the transfer fails, the container
        here would read zeroes where pages are missing: it is killed at once."""
        p = self._pending(msg)
        if p.pages is None:
            raise Conflict(f"{p.name} is not being restored lazily")
        faults.point("pages")
        if p.pages.wait(float(msg.get("timeout_s", 3600))) != 0:
            self.rt.release(p.name)
            raise CriuError(f"the lazy page transfer failed: {p.pages.failure()}", log=p.pages.log, op="lazy-pages")
        _remove_incoming(p.incoming)
        return {}

    def op_commit(self, msg: dict) -> dict:
        """The copy here becomes the container, if it still runs: a tree that died after its
        restore (a CPU feature, the OOM killer) must not be committed, or the source would end
        its only living copy."""
        p = self._pending(msg)
        faults.point("commit")
        rec = self.rt.catalog.container(p.name)
        if rec.state != states.RUNNING or not linux.pid_running(rec.pid):
            code = f" (exit code {rec.exit_code})" if rec.exit_code is not None else ""
            raise Conflict(f"{p.name} was restored here but no longer runs: {rec.state}{code}")
        if p.shim is not None:
            p.shim.commit()  # from here on the copy here runs on whatever happens to this agent
        _end_transfer(p)
        self.pending = None
        return {}

    def op_abort(self, _msg: dict) -> dict:
        self.abort()
        return {}

    def abort(self) -> None:
        """Undo an uncommitted migration: the container (if restored), its files, staged layers."""
        p, self.pending = self.pending, None
        if p is None:
            return
        if p.shim is not None:
            p.shim.cancel()  # a restored copy is fenced: its shim kills it and drops its record
        rec = self.rt.catalog.find_container(p.name)
        if rec is not None:
            if rec.state == states.RUNNING:
                self.rt.stop(p.name, timeout=0)
            self.rt.discard(p.name)
        if p.pages is not None:  # only now: the tree must never run without its pages
            p.pages.kill()
        _end_transfer(p)
        if p.adopted:
            self._remove_layers(p.adopted)

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


def _remove_incoming(incoming: Path) -> None:
    """A migration's incoming folder, once restored from (its owner file stays to the end)."""
    shutil.rmtree(incoming, ignore_errors=True)


def _end_transfer(p: _Pending) -> None:
    """At the commit or the abort: the incoming and staging folders, the owner file, and
    incoming/ itself once empty: nothing of the migration stays."""
    _remove_incoming(p.incoming)
    shutil.rmtree(p.staging, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(owner_file(p.incoming))
    with contextlib.suppress(OSError):
        p.incoming.parent.rmdir()


def serve(inp=sys.stdin, out=sys.stdout) -> int:
    """Answer requests until EOF; an uncommitted migration is undone on the way out."""
    rt = Runtime()
    agent = Agent(rt)
    try:
        for line in inp:
            try:
                answer = {"ok": True, **agent.handle(json.loads(line))}
            except MigrateError as e:
                answer = {"ok": False, "error": str(e), "exit_code": e.exit_code}
                if isinstance(e, CriuError) and e.log is not None:  # the controller names it with our host
                    answer.update(error=e.detail, criu_log=str(e.log))
            except Exception as e:  # noqa: BLE001 - reported to the controller, logged here
                traceback.print_exc(file=sys.stderr)
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}", "exit_code": 1}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        agent.abort()
        rt.close()
    return 0
