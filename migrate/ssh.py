"""One paramiko connection to a resolved host: strict host keys, argv-only commands, clear errors.

Host keys are checked against the spec's known_hosts files only and an unknown key is refused,
never added: migrating a container to an impostor would hand it the container's memory.
Every paramiko and socket exception is translated here into a one-line RemoteError, so callers
never see a paramiko traceback.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import shlex
import socket
import threading
import time
from collections.abc import Callable
from errno import ECONNREFUSED

import paramiko

from migrate.hosts import HostSpec
from migrate.protocol import HEARTBEAT, HEARTBEAT_SILENCE, MAX_LINE, Heartbeat
from runtime.errors import InvalidInput, PeerLost, RemoteError

__all__ = ["RemoteProcess", "SSHSession", "rsync_ssh_command", "rsync_target"]

_CHUNK = 65536
_TAIL_LINE = 1000  # bytes kept of each line of the peer's stderr tail
_TOO_LONG = object()  # queued in place of a line past MAX_LINE
KEEPALIVE_INTERVAL = 5  # seconds; after KEEPALIVE_COUNT missed answers the connection is dead
KEEPALIVE_COUNT = 3


class _UnknownHostKey(paramiko.SSHException):
    """Raised by the policy so an unknown key can be told apart from other SSH failures."""


class _RejectUnknown(paramiko.RejectPolicy):
    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(hostname)


class SSHSession:
    """An authenticated connection; commands run on it as separate exec channels."""

    def __init__(self, spec: HostSpec, client: paramiko.SSHClient):
        self.spec = spec
        self._client = client

    @classmethod
    def connect(cls, spec: HostSpec, *, timeout: float = 10.0, allow_agent: bool = False) -> SSHSession:
        """Log in to SPEC's host. The agent is off by default so the keys used are the spec's."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_RejectUnknown())
        for path in spec.known_hosts_files:
            if os.path.isfile(path):
                try:
                    client.load_host_keys(path)
                except (OSError, paramiko.SSHException) as e:
                    client.close()
                    raise InvalidInput(f"cannot read known_hosts file {path}: {e}") from None
        identities = [p for p in spec.identity_files if os.path.isfile(p)]
        try:
            client.connect(
                spec.hostname,
                port=spec.port,
                username=spec.user,
                key_filename=identities or None,
                look_for_keys=not spec.identity_files,
                allow_agent=allow_agent,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except Exception as e:
            client.close()
            error = _connect_error(spec, e, timeout)
            if error is None:
                raise
            raise error from None
        # paramiko only sends keepalives: its reader notices a dead peer when the socket does
        client.get_transport().set_keepalive(KEEPALIVE_INTERVAL)
        client.get_transport().sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return cls(spec, client)

    @property
    def transport(self) -> paramiko.Transport | None:
        """The underlying transport, for port forwarding."""
        return self._client.get_transport()

    def run(
        self, argv: list[str], input: bytes | None = None, timeout: float | None = 120.0
    ) -> tuple[int, bytes, bytes]:
        """Run ARGV to completion; return (exit status, stdout, stderr).

        Exit status is -1 when the command died without one (killed by a signal). On timeout the
        channel is closed, which does not kill the remote command: it only loses its pipes.
        """
        chan = self._open(argv)
        out, err = bytearray(), bytearray()
        readers = [_thread(_drain, chan.recv, out.extend), _thread(_drain, chan.recv_stderr, err.extend)]
        _thread(_feed, chan, input or b"")
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = chan.status_event.wait(timeout)
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            finished = finished and not reader.is_alive()
        if not finished:
            chan.close()
            raise RemoteError(f"`{_show(argv)}` on {self.spec.alias} did not finish within {timeout} s")
        status = chan.recv_exit_status()
        chan.close()
        if status == -1 and not self._connected():
            raise RemoteError(f"lost the connection to {self.spec.alias} while running `{_show(argv)}`")
        return status, bytes(out), bytes(err)

    def open_process(self, argv: list[str]) -> RemoteProcess:
        """Start ARGV as a long-lived peer speaking one JSON document per line on stdin/stdout."""
        return RemoteProcess(self._open(argv), f"`{_show(argv)}` on {self.spec.alias}")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connected(self) -> bool:
        transport = self.transport
        return transport is not None and transport.is_active()

    def _open(self, argv: list[str]) -> paramiko.Channel:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("remote command must be a non-empty list of strings")
        if not self._connected():
            raise RemoteError(f"the connection to {self.spec.alias} is closed")
        try:
            chan = self.transport.open_session(timeout=30)
            chan.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(f"cannot start `{_show(argv)}` on {self.spec.alias}: {_reason(e)}") from None
        return chan


class RemoteProcess:
    """The local end of a remote line-delimited JSON peer (e.g. `migrate agent`).

    Both output streams are drained by threads: stdout into a queue of lines (so recv can time
    out without touching the channel's shared timeout), stderr into a short tail that explains an
    unexpected exit and keeps a chatty peer from stalling on a full window.
    """

    def __init__(self, chan: paramiko.Channel, what: str):
        self._chan = chan
        self._what = what
        self._send_lock = threading.Lock()  # the heartbeat's thread writes too: whole lines only
        self._heard = time.monotonic()  # when the peer last sent anything, a heartbeat included
        self._heartbeat: Heartbeat | None = None
        self._ended = threading.Event()  # the peer's output reached its end
        self._lines: queue.Queue[bytes | object | None] = queue.Queue()
        self._stdout = _LineSplitter(self._line, too_long=lambda: self._lines.put(_TOO_LONG))
        self._stderr_tail: collections.deque[bytes] = collections.deque(maxlen=20)
        self._stderr = _LineSplitter(lambda line: self._stderr_tail.append(line[:_TAIL_LINE]))
        self._stdout_thread = _thread(self._pump_stdout)
        self._stderr_thread = _thread(_drain, chan.recv_stderr, self._stderr.feed)

    def start_heartbeat(self) -> None:
        """From now on (both ends speak the protocol's heartbeat) send one every interval, and
        take HEARTBEAT_SILENCE seconds without a word from the peer for its loss."""
        if self._heartbeat is None:
            self._heard = time.monotonic()
            self._heartbeat = Heartbeat(self._send_line)

    def send(self, obj: object) -> None:
        self._send_line(json.dumps(obj, separators=(",", ":")).encode())

    def recv(self, timeout: float | None = None) -> object:
        """Next message; PeerLost on timeout, on silence past the heartbeat's limit, on exit of
        the peer, or on a line that is not JSON or longer than MAX_LINE."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            try:
                line = self._lines.get(timeout=max(0.0, wait))
                break
            except queue.Empty:
                self._check_silence()
                if deadline is not None and time.monotonic() >= deadline:
                    raise PeerLost(f"no message from {self._what} within {timeout} s") from None
        if line is None:
            self._lines.put(None)
            raise PeerLost(self._exit_message())
        if line is _TOO_LONG:
            raise PeerLost(f"{self._what} sent a line longer than {MAX_LINE} bytes: not a message of the protocol")
        try:
            return json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise PeerLost(f"{self._what} sent a line that is not JSON: {line[:120]!r}") from None

    def check(self) -> None:
        """PeerLost if the peer is known gone already: its output ended, or it has been silent
        past the heartbeat's limit. Costs no round trip."""
        if self._ended.is_set():
            raise PeerLost(self._exit_message())
        self._check_silence()

    def _check_silence(self) -> None:
        if self._heartbeat is not None and time.monotonic() - self._heard > HEARTBEAT_SILENCE:
            raise PeerLost(f"no word from {self._what} for {HEARTBEAT_SILENCE:.0f} s")

    def _send_line(self, line: bytes) -> None:
        try:
            with self._send_lock:
                self._chan.sendall(line + b"\n")
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise PeerLost(f"cannot send to {self._what}: {_reason(e)}") from None

    def _line(self, line: bytes) -> None:
        self._heard = time.monotonic()
        if line != HEARTBEAT:
            self._lines.put(line)

    def close(self, timeout: float = 5.0) -> int:
        """Send EOF (the peer's cue to exit), wait up to TIMEOUT, close. Exit status or -1."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if not self._chan.closed:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._chan.shutdown_write()
            self._chan.status_event.wait(timeout)
        status = self._chan.exit_status if self._chan.exit_status_ready() else -1
        self._chan.close()
        self._stdout_thread.join(1.0)
        self._stderr_thread.join(1.0)
        return status

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pump_stdout(self) -> None:
        _drain(self._chan.recv, self._stdout.feed)
        self._ended.set()
        self._lines.put(None)

    def _exit_message(self) -> str:
        self._chan.status_event.wait(2.0)
        self._stderr_thread.join(1.0)
        self._stderr.flush()
        last = next((ln for ln in reversed(self._stderr_tail) if ln.strip()), b"")
        status = self._chan.exit_status if self._chan.exit_status_ready() else -1
        detail = last.decode(errors="replace").strip()
        return f"{self._what} exited (status {status})" + (f": {detail}" if detail else "")


class _LineSplitter:
    """Turns a byte stream into complete lines for EMIT; a partial last line waits for more.
    A line longer than MAX_LINE is dropped up to its end, so a peer cannot fill our memory, and
    TOO_LONG is called; without it, the line's start is emitted instead (a stderr tail)."""

    def __init__(self, emit: Callable[[bytes], None], too_long: Callable[[], None] | None = None):
        self._emit = emit
        self._too_long = too_long or (lambda: emit(bytes(self._partial[:200]) + b"... (a line longer than the limit)"))
        self._partial = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        start = len(self._partial)
        self._partial += data
        while (end := self._partial.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            elif end > MAX_LINE:
                self._too_long()
            else:
                self._emit(bytes(self._partial[:end]))
            del self._partial[: end + 1]
            start = 0
        if len(self._partial) > MAX_LINE:
            if not self._skipping:
                self._too_long()
            self._skipping = True
            self._partial.clear()

    def flush(self) -> None:
        if self._partial and not self._skipping:
            self._emit(bytes(self._partial))
        self._partial.clear()


def rsync_ssh_command(spec: HostSpec, *, connect_timeout: int = 10) -> list[str]:
    """OpenSSH argv for rsync's -e (pass it as `shlex.join(...)`), with the spec's identity.

    Everything paramiko uses is set explicitly, so rsync reaches the same host with the same
    user, port, keys and known_hosts, refuses unknown keys and never prompts or edits known_hosts.
    Use `rsync_target(spec, path)` for the remote side so the ssh config's Host block matches too.
    """
    known = " ".join(_ssh_quote(p) for p in spec.known_hosts_files) or "/dev/null"
    argv = [
        "ssh",
        "-F", spec.ssh_config or "/dev/null",
        "-o", f"HostName={spec.hostname}",
        "-p", str(spec.port),
        "-l", spec.user,
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "CheckHostIP=no",
        "-o", "UpdateHostKeys=no",
        "-o", "IdentitiesOnly=yes",
        "-o", f"ConnectTimeout={connect_timeout}",
        # a peer that went silent (cut cable, frozen host) is noticed within 15 s
        "-o", f"ServerAliveInterval={KEEPALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}",
    ]
    for path in spec.identity_files:
        argv += ["-i", path]
    return argv


def rsync_target(spec: HostSpec, path: str) -> str:
    """rsync's HOST:PATH for the spec (an IPv6-like alias needs brackets)."""
    host = f"[{spec.alias}]" if ":" in spec.alias else spec.alias
    return f"{host}:{path}"


def _connect_error(spec: HostSpec, e: BaseException, timeout: float) -> RemoteError | None:
    where = spec.alias if spec.alias == spec.hostname else f"{spec.alias} ({spec.hostname})"
    address = f"{spec.hostname}:{spec.port}"
    key_name = spec.hostname if spec.port == 22 else f"[{spec.hostname}]:{spec.port}"
    files = ", ".join(spec.known_hosts_files) or "no file configured"
    if isinstance(e, _UnknownHostKey):
        return RemoteError(
            f"host key for {where} ({key_name}) is not in known_hosts ({files}); "
            "add it with ssh-keyscan or ssh once"
        )
    if isinstance(e, paramiko.BadHostKeyException):
        return RemoteError(f"host key for {where} ({key_name}) does not match known_hosts ({files}): refusing")
    if isinstance(e, paramiko.PasswordRequiredException):
        return RemoteError(f"identity file for {spec.user}@{where} needs a passphrase; load it into an agent")
    if isinstance(e, paramiko.AuthenticationException):
        tried = ", ".join(spec.identity_files) or "default ~/.ssh/id_* keys"
        return RemoteError(f"authentication as {spec.user}@{where} failed (keys: {tried})")
    if isinstance(e, paramiko.SSHException) and "No authentication methods" in str(e):
        wanted = ", ".join(spec.identity_files) or "~/.ssh/id_*"
        return RemoteError(f"no usable identity file to log in as {spec.user}@{where} ({wanted})")
    if isinstance(e, socket.gaierror):
        return RemoteError(f"cannot resolve host name {spec.hostname}: {e.strerror}")
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        if all(err.errno == ECONNREFUSED for err in e.errors.values()):
            return RemoteError(f"connection to {where} at {address} refused")
        return RemoteError(f"cannot connect to {where} at {address}: host unreachable")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return RemoteError(f"connection to {where} at {address} timed out after {timeout} s")
    if isinstance(e, paramiko.SSHException) and ("protocol banner" in str(e) or "No existing session" in str(e)):
        # paramiko reports a stalled handshake either way, depending on which timer fires first
        return RemoteError(f"{where} at {address} did not complete the SSH handshake within {timeout} s")
    if isinstance(e, (OSError, paramiko.SSHException, EOFError)):
        return RemoteError(f"ssh to {where} at {address} failed: {_reason(e)}")
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _show(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 80 else text[:77] + "..."


def _ssh_quote(path: str) -> str:
    """ssh splits option values on whitespace but honours double quotes."""
    return f'"{path}"' if any(c.isspace() for c in path) else path


def _thread(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _drain(read: Callable[[int], bytes], sink: Callable[[bytes], None]) -> None:
    """Copy a channel stream into SINK until EOF or close."""
    while True:
        try:
            data = read(_CHUNK)
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not data:
            return
        sink(data)


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    """Write stdin then EOF, in its own thread so a peer that writes before it reads cannot deadlock us."""
    try:
        if data:
            chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass
