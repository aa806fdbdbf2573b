"""The target side of a migration without SSH, CRIU or root: what an abort leaves, what the record
keeps, and how a failed CRIU step on the target is reported with its kept log."""

import contextlib
import io
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from migrate import agent as agent_module
from migrate.agent import Agent
from migrate.controller import Agent as AgentHandle
from runtime import criulogs, journal
from runtime.container import Runtime
from runtime.errors import Conflict, CriuError, ImageError, InvalidInput, PeerLost, RemoteError
from runtime.imagebuild import digest_of, make_layer
from runtime.paths import StateRoot
from runtime.spec import ContainerSpec
from runtime.store import ImageRecord

BLOBS = {digest_of(b): b for b in (make_layer({"file": c.encode()}, "gzip") for c in "abc")}
L0, L1, L2 = BLOBS
MID = "0123456789abcdef"


@pytest.fixture
def rt(tmp_path):
    r = Runtime(StateRoot(tmp_path / "root"))
    yield r
    r.close()


class FakeShim:
    cancelled = False
    committed = False

    def cancel(self) -> None:
        self.cancelled = True

    def commit(self) -> None:
        self.committed = True


@pytest.fixture
def agent(rt, monkeypatch):
    shims = []

    def launch(*_args, **_kw):
        shims.append(FakeShim())
        return shims[-1]

    monkeypatch.setattr(rt, "launch_shim", launch)
    a = Agent(rt)
    a.shims = shims
    yield a
    a.abort()


def put_layer(folder: Path, digest: str) -> None:
    """A layer's blob as blob_of() names it (as rsync leaves it in staging)."""
    (folder / digest.split(":")[1]).write_bytes(BLOBS[digest])


def prepare_with_layers(agent: Agent, digests) -> dict:
    prep = agent.handle({"op": "prepare", "name": "c1", "migration": MID, "volumes": []})
    for d in digests:
        put_layer(Path(prep["staging"]), d)
    return prep


def spec(layers=(L1,)) -> str:
    return ContainerSpec("c1", "img:latest", "sha256:" + "9" * 64, tuple(layers), ("sh",)).to_json()


def test_an_abort_removes_the_layers_it_brought_that_nothing_uses(rt, agent):
    rt.layers.add_from_stream(L0, io.BytesIO(BLOBS[L0]), None)  # here before, used by nothing: not ours to remove
    prep = prepare_with_layers(agent, (L0, L1, L2))
    assert agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L0, L1, L2]}) == {"adopted": 2}
    assert rt.layers.digests() == sorted([L0, L1, L2])
    # meanwhile an image arrives here that has L2
    rt.catalog.add_image(ImageRecord("other:latest", "sha256:" + "8" * 64, (L2,), {}, 4, 0.0))
    agent.handle({"op": "abort"})
    assert rt.layers.digests() == sorted([L0, L2])
    assert (rt.layers.path_of(L2) / "file").read_text() == "c"
    assert not Path(prep["staging"]).exists() and not Path(prep["incoming"]).exists()


def test_a_blob_sent_under_a_wrong_digest_is_refused_and_the_rollback_leaves_nothing(rt, agent):
    prep = prepare_with_layers(agent, (L1,))
    (Path(prep["staging"]) / L2.split(":")[1]).write_bytes(BLOBS[L0])  # another layer's blob under L2
    with pytest.raises(ImageError, match=f"^layer {L2}: digest mismatch, the blob hashes to {L0}$"):
        agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1, L2]})
    assert [(e.step, e.event) for e in rt.catalog.journal.entries(MID, journal.TARGET)][-1] == ("layers", "failed")
    assert not rt.layers.has(L2) and os.listdir(prep["staging"]) == []
    agent.handle({"op": "abort"})  # the controller's rollback: the layer adopted before goes too
    assert rt.layers.digests() == [] and not Path(prep["staging"]).exists()
    assert not any((rt.layers.path / "blobs" / "sha256").iterdir())


def test_an_abort_keeps_layers_a_container_here_uses(rt, agent):
    prepare_with_layers(agent, (L1, L2))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1, L2]})
    agent.handle({"op": "preload", "name": "c1", "spec": spec((L1,))})
    rt.catalog.add_container(ContainerSpec.from_json(spec((L2,))).renamed("other"))
    agent.abort()
    assert agent.shims[0].cancelled and rt.catalog.find_container("c1") is None
    assert rt.layers.digests() == [L2]


def test_a_spec_whose_volume_climbs_out_with_dotdot_is_refused_before_any_record(rt, agent):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    spec = json.loads(ContainerSpec("c1", "img:latest", "sha256:" + "9" * 64, (L1,), ("sh",)).to_json())
    spec["volumes"] = [{"host_path": "/srv", "container_path": "/data/../../etc", "read_only": False}]
    with pytest.raises(InvalidInput, match="'..' is not allowed"):
        agent.handle({"op": "preload", "name": "c1", "spec": json.dumps(spec)})
    assert rt.catalog.find_container("c1") is None and agent.shims == []


def restored_running(rt, agent, pid: int) -> None:
    """What a restore leaves: the record running with its init's PID (here: a stand-in)."""
    agent.handle({"op": "preload", "name": "c1", "spec": spec()})
    rt.catalog.set_fields("c1", state="running", pid=pid)


def test_a_commit_keeps_the_layers_and_tells_the_fenced_shim(rt, agent):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    restored_running(rt, agent, os.getpid())
    agent.handle({"op": "commit", "name": "c1"})
    assert agent.shims[0].committed
    agent.abort()  # nothing pending any more: a no-op
    assert rt.layers.digests() == [L1] and not agent.shims[0].cancelled


@pytest.mark.parametrize("fields, message", [
    ({"pid": 2 ** 22 + 1}, "restored here but no longer runs: running"),  # no such process
    ({"state": "exited", "exit_code": 132, "pid": None}, r"no longer runs: exited \(exit code 132\)"),
])
def test_a_copy_that_died_after_its_restore_is_not_committed(rt, agent, fields, message):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    restored_running(rt, agent, os.getpid())
    rt.catalog.set_fields("c1", **fields)
    with pytest.raises(Conflict, match=message):
        agent.handle({"op": "commit", "name": "c1", "migration": MID})
    assert not agent.shims[0].committed
    # decided: no later commit can make it the container
    assert rt.catalog.journal.get(MID, journal.TARGET).outcome == journal.ABORTED
    with pytest.raises(Conflict, match="aborted here"):
        agent.handle({"op": "commit", "name": "c1", "migration": MID})
    rt.catalog.set_fields("c1", state="exited", pid=None)  # as its fenced shim would leave it


def test_a_commit_is_the_journals_decision_and_a_later_resolve_reads_it(rt, agent):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    restored_running(rt, agent, os.getpid())
    assert rt.catalog.container("c1").migration == MID  # an uncommitted copy of that migration
    agent.handle({"op": "commit", "name": "c1", "migration": MID})
    row = rt.catalog.journal.get(MID, journal.TARGET)
    assert row.outcome == journal.COMMITTED and row.finished is not None
    assert rt.catalog.container("c1").migration is None
    steps = [(e.step, e.event) for e in rt.catalog.journal.entries(MID, journal.TARGET)]
    assert steps[0] == ("prepare", "done") and steps[-2:] == [("commit", "begin"), ("commit", "done")]
    assert Agent(rt).handle({"op": "resolve", "migration": MID}) == {"outcome": "committed", "known": True}


def test_a_resolve_before_the_commit_aborts_and_the_commit_is_then_refused(rt, agent):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    restored_running(rt, agent, os.getpid())
    other = Agent(rt)  # the source asks on a new connection while the first agent still lives
    answer = other.handle({"op": "resolve", "migration": MID})
    assert answer == {"outcome": "aborted", "known": True}
    with pytest.raises(Conflict, match="aborted here"):
        agent.handle({"op": "commit", "name": "c1", "migration": MID})
    assert not agent.shims[0].committed


def test_a_migration_this_host_never_heard_of_resolves_as_aborted(agent):
    assert agent.handle({"op": "resolve", "migration": "feedfacefeedface"}) == {"outcome": "aborted",
                                                                                "known": False}
    with pytest.raises(InvalidInput):
        agent.handle({"op": "resolve", "migration": "../x"})


def test_no_commit_within_the_deadline_aborts_the_copy_by_itself(rt, agent):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    restored_running(rt, agent, os.getpid())
    agent._commit_within(agent.pending, {"commit_within": 0.05})
    agent.pending.deadline.join(5)
    assert rt.catalog.journal.get(MID, journal.TARGET).outcome == journal.ABORTED
    with pytest.raises(Conflict, match="aborted here"):
        agent.handle({"op": "commit", "name": "c1", "migration": MID})


def test_preload_keeps_the_first_start_time(rt, agent):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    agent.handle({"op": "preload", "name": "c1", "spec": spec(), "started": 1700000000.25})
    assert rt.catalog.container("c1").started == 1700000000.25


class FakeWarm:
    """migrate.warmmemory.WarmMemory without touching memory: what was held, what given back when."""

    made: list["FakeWarm"] = []

    def __init__(self, nbytes: int, parts: int):
        self.nbytes, self.held = nbytes, parts
        self.made.append(self)

    def release(self, parts: int | None = None) -> None:
        self.held -= self.held if parts is None else min(parts, self.held)


@pytest.fixture
def warm(monkeypatch):
    monkeypatch.setattr(agent_module, "WarmMemory", FakeWarm)
    FakeWarm.made = []
    return FakeWarm.made


@pytest.mark.parametrize("asked,free,lazy,held", [
    (300 << 20, 8 << 30, True, (300 << 20, 1)), (300 << 20, 8 << 30, False, (600 << 20, 2)),
    (300 << 20, 400 << 20, True, (200 << 20, 1)), (300 << 20, 400 << 20, False, (200 << 20, 2)),
    (None, 8 << 30, True, None), ("lots", 8 << 30, True, None), (True, 8 << 30, True, None)])
def test_preload_holds_the_memory_the_restore_will_fill_but_never_more_than_half_of_what_is_free(
        rt, agent, monkeypatch, warm, asked, free, lazy, held):
    monkeypatch.setattr(agent_module, "meminfo", lambda key: free if key == "MemFree" else None)
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    agent.handle({"op": "preload", "name": "c1", "spec": spec(), "memory": asked, "lazy": lazy})
    assert [(w.nbytes, w.held) for w in warm] == ([held] if held else [])


class FakeCriu:
    """The page server a round starts, as far as the agent sees it."""

    def page_server(self, *_args):
        return SimpleNamespace(kill=lambda: None)


def test_held_memory_goes_back_half_when_the_first_page_server_starts_and_the_rest_at_the_restore(
        rt, agent, monkeypatch, warm):
    monkeypatch.setattr(agent_module, "meminfo", lambda key: 8 << 30)
    monkeypatch.setattr(agent_module, "Criu", FakeCriu)
    link = SimpleNamespace(fileno=lambda: -1)
    monkeypatch.setattr(agent_module, "_page_connection", lambda _p, _msg: contextlib.nullcontext(link))
    restored = []
    monkeypatch.setattr(agent_module.Snapshots, "restore_dir",
                        lambda _self, *args, **kw: restored.append(warm[0].held) or rt.catalog.container("c1"))
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    agent.handle({"op": "preload", "name": "c1", "spec": spec(), "memory": 600 << 20})
    assert warm[0].held == 2
    agent.handle({"op": "page_server", "name": "c1", "folder": "images"})
    assert warm[0].held == 1
    agent.handle({"op": "receive", "name": "c1"})
    agent.handle({"op": "restore", "name": "c1"})
    assert restored == [0]  # all given back before CRIU restores


def test_an_abort_gives_held_memory_back(rt, agent, monkeypatch, warm):
    monkeypatch.setattr(agent_module, "meminfo", lambda key: 8 << 30)
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    agent.handle({"op": "preload", "name": "c1", "spec": spec(), "memory": 600 << 20, "lazy": True})
    agent.abort()
    assert warm[0].held == 0


@pytest.mark.parametrize("started", [None, "yesterday", True])
def test_preload_without_a_start_time_leaves_it_to_the_restore(rt, agent, started):
    prepare_with_layers(agent, (L1,))
    agent.handle({"op": "adopt_layers", "name": "c1", "digests": [L1]})
    agent.handle({"op": "preload", "name": "c1", "spec": spec(), "started": started})
    assert rt.catalog.container("c1").started is None


class FailedPages:
    """A `criu lazy-pages` that ended with an error, its log in the incoming folder."""

    def __init__(self, log: Path):
        self.log = log

    def wait(self, _timeout: float, _stall: float) -> int:
        return 1

    def failure(self) -> str:
        return "Error (criu/uffd.c:1): page-read failed"

    def kill(self) -> None:
        pass


def test_a_failed_criu_step_here_names_a_kept_log(rt, agent):
    prep = prepare_with_layers(agent, ())
    log = Path(prep["incoming"]) / "images" / "lazy-pages.log"
    log.parent.mkdir()
    log.write_text("(00.1) Error (criu/uffd.c:1): page-read failed\n")
    agent.pending.pages = FailedPages(log)
    with pytest.raises(CriuError) as failed:
        agent.handle({"op": "wait_pages", "name": "c1"})
    kept = criulogs.newest(rt.root, "c1")
    assert kept is not None and kept.name.startswith("c1-lazy-pages-") and failed.value.log == kept
    assert str(failed.value) == f"the lazy page transfer failed: Error (criu/uffd.c:1): page-read failed " \
                                f"(CRIU log: {kept})"
    agent.abort()
    assert not log.exists() and kept.read_text() == "(00.1) Error (criu/uffd.c:1): page-read failed\n"


@pytest.mark.parametrize("status", [0, 1])
def test_the_lazy_page_link_is_held_and_uncorked_until_the_daemon_is_done_then_closed(rt, agent, monkeypatch, status):
    """The agent's end of a direct page connection stays open from the restore to the end of
    wait_pages (so CRIU's cork can be lifted: pagelink.Uncorker), and is closed then, whatever
    the daemon's outcome: the source's page server must see the connection end."""
    held = []

    class Daemon(FailedPages):
        def wait(self, _timeout: float, _stall: float) -> int:
            held.append((agent.pending.page_link.fileno() >= 0, agent.pending.uncorker is not None))
            return status

    monkeypatch.setattr(agent_module, "Criu", lambda: SimpleNamespace(lazy_pages=lambda _images, _fd: Daemon(log)))
    monkeypatch.setattr(agent_module.Snapshots, "restore_dir", lambda _self, *args, **kw: SimpleNamespace(pid=1))
    prep = prepare_with_layers(agent, ())
    log = Path(prep["incoming"]) / "images" / "lazy-pages.log"
    here, there = socket.socketpair()
    agent.pending.page_link, agent.pending.received = there, True
    agent.handle({"op": "restore", "name": "c1", "lazy": True})
    assert agent.pending.page_link is there and agent.pending.uncorker is not None
    if status == 0:
        agent.handle({"op": "wait_pages", "name": "c1"})
    else:
        with pytest.raises(CriuError):
            agent.handle({"op": "wait_pages", "name": "c1"})
    assert held == [(True, True)]
    assert there.fileno() == -1 and agent.pending.page_link is None and agent.pending.uncorker is None
    here.settimeout(5)
    assert here.recv(1) == b""  # the other end sees it closed
    here.close()


class FakeProcess:
    """An agent connection that answers each request with `answer` (its id added), after
    any `stale` answers queued first."""

    def __init__(self, answer, stale=()):
        self.answer = answer
        self.queue = list(stale)
        self.sent = []

    def send(self, msg) -> None:
        self.sent.append(msg)
        self.queue.append({**self.answer, "id": msg["id"]} if "id" not in self.answer else self.answer)

    def recv(self, timeout=None):
        return self.queue.pop(0)


def test_answers_are_matched_to_their_request_by_id():
    handle = AgentHandle(FakeProcess({"ok": True, "n": 1}), "host-b")
    handle.call("hello")
    # a late answer to a request given up on is skipped, not taken for the next one's
    handle.proc.queue.append({"ok": False, "error": "late", "id": 1})
    assert handle.call("hello")["n"] == 1 and [m["id"] for m in handle.proc.sent] == [1, 2]
    odd = AgentHandle(FakeProcess({"ok": True, "id": 7}), "host-b")
    with pytest.raises(PeerLost, match="answered request 7, not 1"):
        odd.call("hello")


def test_the_agent_echoes_ids_and_refuses_what_is_not_a_request(rt, monkeypatch):
    import io


    monkeypatch.setattr(agent_module, "Runtime", lambda: rt)
    monkeypatch.setattr(rt, "close", lambda: None)
    out = io.StringIO()
    lines = '{"id": 3, "op": "nope"}\nnot json\n[1]\n'
    assert agent_module.serve(io.StringIO(lines), out) == 0
    answers = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(a["ok"], a.get("id")) for a in answers] == [(False, 3), (False, None), (False, None)]
    assert "unknown agent request 'nope'" in answers[0]["error"]
    monkeypatch.setattr(agent_module, "MAX_LINE", 100)
    out = io.StringIO()
    assert agent_module.serve(io.StringIO('{"op": "' + "x" * 200 + '"}\n{"id": 1, "op": "hello"}\n'), out) == 2
    assert out.getvalue().count("\n") == 1 and "longer than 100 bytes" in out.getvalue()


def test_an_answer_the_controller_can_no_longer_take_ends_the_session_and_undoes(rt, monkeypatch, capfd):
    """A cut connection shows first as an answer that cannot be written (EPIPE): the agent
    says so, undoes what is uncommitted and ends; nothing is left to fail again at exit."""
    monkeypatch.setattr(agent_module, "Runtime", lambda: rt)
    monkeypatch.setattr(rt, "close", lambda: None)
    undone = []
    monkeypatch.setattr(Agent, "abort", lambda self: undone.append(True))
    read_end, write_end = os.pipe()
    os.close(read_end)
    out = os.fdopen(write_end, "w")
    try:
        assert agent_module.serve(io.StringIO('{"id": 1, "op": "hello"}\n{"id": 2, "op": "hello"}\n'), out) == 3
        out.write("still buffered\n")
        out.flush()  # now to /dev/null
    finally:
        out.close()
    assert undone == [True]
    assert "the controller's connection is gone (Broken pipe)" in capfd.readouterr().err


def test_a_line_beyond_the_limit_is_cut_not_kept(monkeypatch):
    from migrate import ssh

    monkeypatch.setattr(ssh, "MAX_LINE", 1000)
    lines = []
    split = ssh._LineSplitter(lines.append)
    split.feed(b'{"a": 1}\n' + b"x" * 600)
    split.feed(b"y" * 600)  # past the limit: cut
    split.feed(b"z" * 5000 + b'\n{"b": 2}\n')
    assert lines[0] == b'{"a": 1}' and lines[1].endswith(b"(a line longer than the limit)")
    assert lines[2:] == [b'{"b": 2}'] and len(lines[1]) < 300


def test_the_controller_names_the_targets_criu_log_with_the_host():
    log = "/var/lib/migrate/criu-logs/c1-restore-20261201T101530.123456Z.log"
    handle = AgentHandle(FakeProcess({"ok": False, "error": "CRIU restore failed: x", "criu_log": log,
                                      "exit_code": 6}), "host-b")
    with pytest.raises(RemoteError) as failed:
        handle.call("restore", name="c1")
    assert str(failed.value) == f"host-b: CRIU restore failed: x (CRIU log on host-b: {log})"
    plain = AgentHandle(FakeProcess({"ok": False, "error": "injected fault at restore", "exit_code": 1}), "host-b")
    with pytest.raises(RemoteError, match=r"^host-b: injected fault at restore$"):
        plain.call("restore", name="c1")


def test_after_hello_the_agent_beats_and_gives_up_on_a_silent_controller(rt, monkeypatch):
    """Once hello agreed on the protocol, heartbeats flow to the controller while the agent
    waits, the controller's own are skipped, and silence past the limit ends the session."""
    import io
    import threading

    from migrate import agent as agent_module
    from migrate import protocol

    monkeypatch.setattr(agent_module, "Runtime", lambda: rt)
    monkeypatch.setattr(rt, "close", lambda: None)
    monkeypatch.setattr(protocol, "HEARTBEAT_INTERVAL", 0.1)
    monkeypatch.setattr(agent_module, "HEARTBEAT_SILENCE", 1.0)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "r") as inp:
        os.write(write_end, b'{"id": 1, "op": "hello", "protocol": %d}\n' % protocol.PROTOCOL)
        beats = threading.Timer(0.5, os.write, (write_end, protocol.HEARTBEAT + b"\n"))
        beats.start()
        out = io.StringIO()
        started = time.monotonic()
        assert agent_module.serve(inp, out) == 3  # 0.5 s, a heartbeat, then 1 s of nothing
        assert 1.4 < time.monotonic() - started < 5
    os.close(write_end)
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0])["protocol"] == protocol.PROTOCOL
    assert lines.count(protocol.HEARTBEAT.decode()) >= 5 and len(set(lines[1:])) == 1


def test_only_a_controller_of_our_protocol_gets_heartbeats(rt):
    """An older controller would misread a heartbeat as an answer: hello without our protocol
    number is answered (the controller refuses the mismatch), and no heartbeat is agreed."""
    from migrate.protocol import PROTOCOL

    agent = Agent(rt)
    assert agent.op_hello({"protocol": PROTOCOL - 1})["protocol"] == PROTOCOL and not agent.heartbeat_agreed
    agent.op_hello({})
    assert not agent.heartbeat_agreed
    agent.op_hello({"protocol": PROTOCOL})
    assert agent.heartbeat_agreed
