"""One OpenSSH connection to a resolved host: strict host keys, argv-only commands, clear errors.

The connection is an OpenSSH ControlMaster started with the user's own ssh config (`-F` as
resolved, and the alias), so ProxyJump, HostKeyAlias, certificates and `@revoked` or
`@cert-authority` known_hosts lines work exactly as for `ssh HOST`. Commands, the agent and
rsync all ride on it as multiplexed sessions: one login. Host keys are checked strictly
(StrictHostKeyChecking=yes whatever the config says) and known_hosts is never edited:
migrating a container to an impostor would hand it the container's memory. OpenSSH's failures
are translated here into one-line RemoteErrors.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import queue
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from migrate.hosts import HostSpec
from migrate.protocol import HEARTBEAT, HEARTBEAT_SILENCE, MAX_LINE, Heartbeat
from runtime import linux
from runtime.errors import InvalidInput, PeerLost, RemoteError

__all__ = ["RemoteProcess", "SSHSession", "rsync_target"]

_CHUNK = 65536
_TAIL_LINE = 1000  # bytes kept of each line of the peer's stderr tail
_TOO_LONG = object()  # queued in place of a line past MAX_LINE
KEEPALIVE_INTERVAL = 5  # seconds; after KEEPALIVE_COUNT missed answers the connection is dead
KEEPALIVE_COUNT = 3
_CONTROL_TIMEOUT = 30  # for `ssh -O` requests to the master, which answers at once
_PROXY_FAILED = "Connection closed by UNKNOWN port"  # what ssh says when its jump (ProxyCommand) ends


class SSHSession:
    """An authenticated connection (an OpenSSH master); commands run on it as separate sessions."""

    def __init__(self, spec: HostSpec, control_dir: Path):
        self.spec = spec
        self.control_dir = control_dir
        self._closed = False
        self._master: subprocess.Popen | None = None

    @classmethod
    def connect(cls, spec: HostSpec, *, timeout: float = 10.0) -> SSHSession:
        """Log in to SPEC's host, within TIMEOUT seconds (or the config's ConnectTimeout) a hop."""
        session = cls(spec, Path(tempfile.mkdtemp(prefix="migrate-ssh-")))
        try:
            session._start_master(timeout)
        except BaseException:
            shutil.rmtree(session.control_dir, ignore_errors=True)
            raise
        return session

    @property
    def master_pid(self) -> int | None:
        """The PID of the connection's ssh, which every session and forward goes through."""
        return self._master.pid if self._master is not None else None

    def ssh_argv(self) -> list[str]:
        """OpenSSH argv (the host alias goes after it) for a client that rides on this connection:
        rsync's -e, `-O forward`. Its ProxyCommand fails at once, so a client can never fall back
        to a login of its own (slow, or to a master that is gone without anyone noticing)."""
        return [*self._base(), "-o", "ControlMaster=no", "-o", "ProxyCommand=false"]

    def run(
        self, argv: list[str], input: bytes | None = None, timeout: float | None = 120.0
    ) -> tuple[int, bytes, bytes]:
        """Run ARGV to completion; return (exit status, stdout, stderr).

        Exit status is 255 when the command died without one (killed by a signal), as with ssh.
        On timeout the session is closed, which does not kill the remote command: it only loses
        its pipes.
        """
        proc = self._open(argv)
        try:
            out, err = proc.communicate(input or b"", timeout=timeout)
        except BaseException as e:
            _stop(proc)
            if isinstance(e, subprocess.TimeoutExpired):
                raise RemoteError(f"`{_show(argv)}` on {self.spec.alias} did not finish within {timeout} s") from None
            raise
        if proc.returncode == 255 and not self._alive():
            raise RemoteError(f"lost the connection to {self.spec.alias} while running `{_show(argv)}`")
        return proc.returncode, out, err

    def open_process(self, argv: list[str]) -> RemoteProcess:
        """Start ARGV as a long-lived peer speaking one JSON document per line on stdin/stdout."""
        return RemoteProcess(self._open(argv), f"`{_show(argv)}` on {self.spec.alias}")

    def close(self) -> None:
        """End the connection and every session on it."""
        if self._closed:
            return
        self._closed = True
        self._control("exit")
        if self._master is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._master.wait(_CONTROL_TIMEOUT)
            _stop(self._master)
        shutil.rmtree(self.control_dir, ignore_errors=True)

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _base(self, control_path: str | None = None) -> list[str]:
        """The user's config, and what this tool insists on whatever it says: strict host keys,
        never a prompt, never an edit of known_hosts, our commands (not a RemoteCommand), one master
        of our own."""
        config = ["-F", self.spec.ssh_config] if self.spec.ssh_config is not None else []
        return ["ssh", *config, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no", "-o", "RemoteCommand=none",
                "-o", f"ControlPath={control_path or self.control_dir / 'master'}"]

    def _start_master(self, timeout: float) -> None:
        """The connection: an OpenSSH master, our child, that ends when its sessions and this
        process do (a master left to idle out would outlive a killed tool by minutes)."""
        connect_timeout = self.spec.connect_timeout or max(1, math.ceil(timeout))
        argv = [
            *self._base(), "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
            "-o", f"ConnectTimeout={connect_timeout}",
            # a peer that went silent (cut cable, frozen host) is noticed within 15 s
            "-o", f"ServerAliveInterval={KEEPALIVE_INTERVAL}", "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}",
            "-o", "Ciphers=^aes128-gcm@openssh.com",  # the fastest on hosts with AES instructions
            # the target gets nothing of this host's but the connection
            "-o", "ClearAllForwardings=yes", "-o", "ForwardAgent=no", "-o", "ForwardX11=no",
            "-N", "--", self.spec.alias,
        ]
        # each jump host may take its own ConnectTimeout, then the login
        hops = 1 + (self.spec.proxy_jump or "").count(",") + bool(self.spec.proxy_jump)
        limit = connect_timeout * hops + 2 * timeout
        errors = self.control_dir / "master.err"  # a file: a pipe nobody reads would stall the master
        try:
            with open(errors, "wb") as err:
                # a session of its own, as every client's: a signal to the terminal's group is the CLI's
                self._master = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=err, start_new_session=True,
                                                preexec_fn=linux.die_with_parent)
        except FileNotFoundError:
            raise RemoteError("ssh (the OpenSSH client) is not installed") from None
        deadline = time.monotonic() + limit
        # its control socket appears once it has logged in
        while not (self.control_dir / "master").exists():
            if self._master.poll() is not None:
                stderr = errors.read_text(errors="replace")
                if (self.spec.proxy_jump or self.spec.proxy_command) and _PROXY_FAILED in stderr:
                    stderr = self._diagnose(connect_timeout, limit) or stderr
                raise _login_error(self.spec, stderr)
            if time.monotonic() > deadline:
                _stop(self._master)
                raise RemoteError(f"ssh to {self.spec.where} did not log in within {limit:.0f} s")
            time.sleep(0.01)

    def _diagnose(self, connect_timeout: int, limit: float) -> str | None:
        """Why a login through a jump host failed, from a plain `ssh HOST true`: a master sends
        its jump's (or ProxyCommand's) stderr to /dev/null, leaving only "connection closed"."""
        argv = [*self._base("none"), "-o", f"ConnectTimeout={connect_timeout}", "-T", "--", self.spec.alias, "true"]
        with contextlib.suppress(subprocess.TimeoutExpired):
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=limit)
            if p.returncode == 255:
                return p.stderr.decode(errors="replace")
        return None

    def _control(self, command: str) -> bool:
        """An `ssh -O COMMAND` request to the master; whether it was granted."""
        try:
            p = subprocess.run([*self.ssh_argv(), "-O", command, "--", self.spec.alias], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=_CONTROL_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False
        return p.returncode == 0

    def _alive(self) -> bool:
        return not self._closed and self._control("check")

    def _open(self, argv: list[str]) -> subprocess.Popen:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidInput("remote command must be a non-empty list of strings")
        if self._closed:
            raise RemoteError(f"the connection to {self.spec.alias} is closed")
        # a session of its own: Ctrl-C or a dropped login (SIGINT, SIGHUP to the terminal's process
        # group) reaches only the CLI, which unwinds and tells the agent
        return subprocess.Popen([*self.ssh_argv(), "-T", "--", self.spec.alias, shlex.join(argv)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)


class RemoteProcess:
    """The local end of a remote line-delimited JSON peer (e.g. `migrate agent`).

    Both output streams are drained by threads: stdout into a queue of lines (so recv can time
    out), stderr into a short tail that explains an unexpected exit and keeps a chatty peer from
    stalling on a full pipe.
    """

    def __init__(self, proc: subprocess.Popen, what: str):
        self._proc = proc
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
        self._stderr_thread = _thread(_drain, proc.stderr, self._stderr.feed)

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
                self._proc.stdin.write(line + b"\n")
                self._proc.stdin.flush()
        except (OSError, ValueError) as e:  # ValueError: stdin already closed here
            raise PeerLost(f"cannot send to {self._what}: {_reason(e)}") from None

    def _line(self, line: bytes) -> None:
        self._heard = time.monotonic()
        if line != HEARTBEAT:
            self._lines.put(line)

    def close(self, timeout: float = 5.0) -> int:
        """Send EOF (the peer's cue to exit), wait up to TIMEOUT, close. Exit status or -1."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            self._proc.stdin.close()
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(self._proc)
            status = -1
        self._stdout_thread.join(1.0)
        self._stderr_thread.join(1.0)
        return status

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pump_stdout(self) -> None:
        _drain(self._proc.stdout, self._stdout.feed)
        self._ended.set()
        self._lines.put(None)

    def _exit_message(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(2.0)
        self._stderr_thread.join(1.0)
        self._stderr.flush()
        last = next((ln for ln in reversed(self._stderr_tail) if ln.strip()), b"")
        status = self._proc.returncode if self._proc.returncode is not None else -1
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


def rsync_target(spec: HostSpec, path: str) -> str:
    """rsync's HOST:PATH for the spec (an IPv6-like alias needs brackets)."""
    host = f"[{spec.alias}]" if ":" in spec.alias else spec.alias
    return f"{host}:{path}"


def _login_error(spec: HostSpec, stderr: str) -> RemoteError:
    """The one line to tell the user why OpenSSH could not log in, from what it printed."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("@", "Pseudo-terminal", "Warning: Permanently"))]
    first = lines[0] if lines else "ssh failed without a message"
    files = ", ".join(spec.known_hosts_files) or "no file configured"
    key = f"host key for {spec.where}" + (f" (HostKeyAlias {spec.host_key_alias})" if spec.host_key_alias else "")
    if spec.proxy_jump or spec.proxy_command:
        # the jump's own ssh (or the command) failed: the outer ssh only saw its connection close
        if _PROXY_FAILED in stderr:
            via = f"jump host {spec.proxy_jump}" if spec.proxy_jump else f"ProxyCommand `{spec.proxy_command}`"
            return RemoteError(f"cannot reach {spec.where} through {via}: {first}")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return RemoteError(f"{key} does not match known_hosts ({files}): refusing")
    if "REVOKED HOST KEY" in stderr or "marked as revoked" in stderr:
        return RemoteError(f"{key} is marked @revoked in known_hosts ({files}): refusing")
    if "host key is known for" in stderr or "Host key verification failed" in stderr:
        return RemoteError(f"{key} is not in known_hosts ({files}); add it with ssh-keyscan or ssh once")
    denied = next((ln for ln in lines if "Permission denied" in ln), None)
    if denied is not None:
        keys = ", ".join(spec.identity_files) or "none"
        reason = re.sub(r"^\S+@\S+: ", "", denied)  # ssh names user@hostname: we did already
        return RemoteError(f"authentication as {spec.user}@{spec.where} failed: {reason} (identity files: {keys})")
    if first.startswith("ssh: "):
        first = first[len("ssh: "):]
    return RemoteError(f"ssh to {spec.where} failed: {first}")


def _stop(proc: subprocess.Popen) -> None:
    """End a session's local client. Its pipes are closed, not read to their end: the master holds
    their other ends (the client passed them over) until the remote command finishes."""
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _show(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 80 else text[:77] + "..."


def _thread(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _drain(stream: IO[bytes], sink: Callable[[bytes], None]) -> None:
    """Copy a pipe into SINK until EOF."""
    while True:
        try:
            data = stream.read1(_CHUNK)
        except (OSError, ValueError):
            return
        if not data:
            return
        sink(data)
