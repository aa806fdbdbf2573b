"""Reverse port forward through an existing SSH connection (`ssh -R 127.0.0.1:0:127.0.0.1:LPORT`).

A process on the REMOTE host connects to 127.0.0.1:remote_port there and reaches a TCP server
on the LOCAL host at local_host:local_port, through the SSH connection we already hold: no
extra port is opened to the network. This is how the target's `criu lazy-pages` daemon reaches
the source's page server during a post-copy migration.

sshd listens on the remote loopback (we ask for 127.0.0.1; with sshd's default
`GatewayPorts no` it would bind loopback anyway) and opens a `forwarded-tcpip` channel to us
for every connection; paramiko hands each channel to our handler in its transport thread,
which must not block, so each connection gets a thread that connects the local socket and two
pump threads that copy bytes both ways (half-closes are passed on: EOF on one side becomes
shutdown(SHUT_WR) on the other). Bytes moved are counted for statistics.

Note: everything here is plain bytes copying; throughput is bounded by paramiko's crypto in the
single transport thread (a few hundred MB/s here), not by these threads.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass

import paramiko

from runtime.errors import RemoteError

__all__ = ["ReverseTunnel", "TunnelStats"]

# paramiko keeps ONE forwarded-connection handler per transport (request_port_forward replaces
# it, cancel_port_forward clears it), so every tunnel of a transport registers here and one
# dispatcher routes each channel by the remote port it arrived on.
_registry: weakref.WeakKeyDictionary[paramiko.Transport, dict[int, "ReverseTunnel"]] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _dispatch(transport: paramiko.Transport):
    def handler(chan: paramiko.Channel, origin: tuple, server: tuple) -> None:
        with _registry_lock:
            tunnel = _registry.get(transport, {}).get(server[1])
        if tunnel is None:
            chan.close()
        else:
            tunnel._on_channel(chan, origin, server)

    return handler

_CHUNK = 256 * 1024
# Receive window of forwarded channels. paramiko's 2 MiB default caps a single stream at about
# window / round trip; 8 MiB measured faster here. The channel is opened by sshd, so paramiko
# takes our window from the transport's defaults at that moment (set in open()).
_WINDOW = 8 << 20
_MAX_PACKET = 32768  # paramiko's own maximum; larger values are clamped anyway


@dataclass(frozen=True)
class TunnelStats:
    connections: int  # connections accepted on the remote side
    to_local: int  # bytes moved remote -> local server
    to_remote: int  # bytes moved local server -> remote
    failed: int  # connections whose local connect failed
    active: int  # connections still open


class ReverseTunnel:
    """REMOTE 127.0.0.1:remote_port -> LOCAL local_host:local_port through TRANSPORT.

    Use as a context manager, or call open() and close(). `remote_port` is known after open().
    `what` names the remote host in error messages.

    An SSH channel cannot tell a remote peer that finished cleanly from one that died, or from a
    lost connection: all look like EOF. By default the EOF is passed on as a FIN. With
    HOLD_REMOTE_EOF the local socket stays open until the caller, who learns the outcome another
    way (e.g. the exit status of the remote `criu lazy-pages`), calls release(ok): ok passes the
    FIN on, not ok (or close() without release) resets the connection instead. A CRIU page
    server serving lazy pages takes a FIN as "all pages transferred" and kills the source tree;
    a reset makes the dump fail and the source resume.
    """

    def __init__(
        self,
        transport: paramiko.Transport | None,
        local_port: int,
        *,
        local_host: str = "127.0.0.1",
        remote_host: str = "127.0.0.1",
        remote_port: int = 0,
        connect_timeout: float = 10.0,
        what: str = "the remote host",
        hold_remote_eof: bool = False,
    ):
        self._transport = transport
        self.local_host = local_host
        self.local_port = local_port
        self.remote_host = remote_host
        self.remote_port = remote_port
        self._requested_port = remote_port
        self._connect_timeout = connect_timeout
        self._what = what
        self._lock = threading.Lock()
        self._open = False
        self._closed = False
        self._conns: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._failed = 0
        self._to_local = 0
        self._to_remote = 0
        self.errors: list[str] = []  # one line per connection that failed, newest last
        self._hold = hold_remote_eof
        self._held: list[_Connection] = []
        self._verdict = threading.Event()
        self._verdict_ok = False

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> int:
        """Ask the remote sshd to listen; return the remote port (picked by sshd if 0)."""
        if self._open or self._closed:
            raise RuntimeError("a ReverseTunnel can be opened only once")
        transport = self._transport
        if transport is None or not transport.is_active():
            raise RemoteError(f"cannot forward a port from {self._what}: the connection is closed")
        transport.default_window_size = max(transport.default_window_size, _WINDOW)
        transport.default_max_packet_size = _MAX_PACKET
        try:
            # the lock is not held while waiting: the transport thread may need it meanwhile
            # (a connection for another tunnel). Nobody can connect to the new port before we
            # learn it, short of guessing it; such a connection would be closed.
            port = transport.request_port_forward(self.remote_host, self._requested_port, handler=_dispatch(transport))
        except (paramiko.SSHException, OSError, EOFError) as e:
            # sshd answers "request failed" for AllowTcpForwarding no/local, DisableForwarding,
            # PermitListen, or a port already in use: it does not say which.
            reason = str(e) or type(e).__name__
            raise RemoteError(
                f"{self._what} refused to forward {self.remote_host}:{self._requested_port} back to us ({reason}); "
                "check AllowTcpForwarding / PermitListen in its sshd_config"
            ) from None
        with _registry_lock:
            _registry.setdefault(transport, {})[port] = self
        self.remote_port = port
        self._open = True
        return port

    def close(self, timeout: float = 5.0) -> TunnelStats:
        """Stop listening remotely, close every connection, join the threads (at most TIMEOUT in all)."""
        with self._lock:
            already = self._closed
            self._closed = True
            was_open = self._open
            conns = list(self._conns)
        if already:
            return self.stats()
        transport = self._transport
        if was_open and transport is not None:
            with _registry_lock:
                tunnels = _registry.get(transport, {})
                if tunnels.get(self.remote_port) is self:
                    del tunnels[self.remote_port]
            if transport.is_active():
                # not cancel_port_forward(): that also drops the handler other tunnels rely on
                with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                    transport.global_request("cancel-tcpip-forward", (self.remote_host, self.remote_port), wait=True)
        self.release(False)  # no-op if release() was called before
        for conn in conns:
            if conn.eof_passed:
                conn.finish()
            else:
                conn.reset()
        deadline = _Deadline(timeout)
        for thread in list(self._threads):
            thread.join(deadline.left())
        return self.stats()

    def release(self, ok: bool) -> None:
        """With hold_remote_eof: settle every connection whose remote end has ended, now and later.

        ok=True passes each remote EOF on to the local server as a FIN; ok=False resets them.
        Only the first call counts.
        """
        with self._lock:
            if self._verdict.is_set():
                return
            self._verdict_ok = ok
            self._verdict.set()
            held, self._held = self._held, []
        for conn in held:
            if ok:
                conn.pass_eof()
            else:
                conn.reset()

    def __enter__(self) -> ReverseTunnel:
        if not self._open:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- statistics --------------------------------------------------------------------------

    def stats(self) -> TunnelStats:
        with self._lock:
            return TunnelStats(self._connections, self._to_local, self._to_remote, self._failed, len(self._conns))

    @property
    def bytes_to_local(self) -> int:
        return self.stats().to_local

    @property
    def bytes_to_remote(self) -> int:
        return self.stats().to_remote

    # -- internals ----------------------------------------------------------------------------

    def _on_channel(self, chan: paramiko.Channel, origin: tuple, server: tuple) -> None:
        """paramiko calls this in its transport thread: hand off at once, never block."""
        with self._lock:
            if self._closed:
                refuse = True
            else:
                refuse = False
                self._connections += 1
                thread = threading.Thread(
                    target=self._serve, args=(chan, origin), name=f"tunnel-{self.remote_port}", daemon=True
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
        if refuse:
            chan.close()
            return
        thread.start()

    def _serve(self, chan: paramiko.Channel, origin: tuple) -> None:
        try:
            sock = connect_local(self.local_host, self.local_port, self._connect_timeout)
        except OSError as e:
            with self._lock:
                self._failed += 1
                self.errors.append(
                    f"connection from {self._what} {origin[0]}:{origin[1]}: "
                    f"cannot reach {self.local_host}:{self.local_port}: {e.strerror or e}"
                )
            chan.close()
            return
        conn = _Connection(chan, sock)
        with self._lock:
            if self._closed:
                conn.reset()
                return
            self._conns.add(conn)
        up = threading.Thread(target=self._pump_to_local, args=(conn,), daemon=True)
        with self._lock:
            self._threads.append(up)
        up.start()
        try:
            self._pump_to_remote(conn)
            up.join()
            if conn.held:
                self._verdict.wait()  # release() or close() decides; this thread only waits
        finally:
            with self._lock:
                self._conns.discard(conn)
            if conn.eof_passed:
                conn.finish()
            else:
                conn.reset()

    def _pump_to_local(self, conn: _Connection) -> None:
        """Remote (channel) -> local socket. The remote end's EOF (or loss) becomes a FIN to the
        local server, or, with hold_remote_eof, waits for release()."""
        chan, sock = conn.chan, conn.sock
        while True:
            try:
                data = chan.recv(_CHUNK)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""  # the remote end is gone: for the local server that is an end of stream
            if not data:
                break
            try:
                sock.sendall(data)
            except OSError:
                conn.reset()  # the local server is gone: drop the remote end too
                return
            self._count(to_local=len(data))
        with self._lock:
            if self._hold and not self._verdict.is_set():
                conn.held = True
                self._held.append(conn)
                return
            ok = not self._hold or self._verdict_ok
        if ok:
            conn.pass_eof()
        else:
            conn.reset()

    def _pump_to_remote(self, conn: _Connection) -> None:
        """Local socket -> remote (channel); the local server's EOF becomes EOF on the channel."""
        chan, sock = conn.chan, conn.sock
        while True:
            try:
                data = sock.recv(_CHUNK)
            except OSError:
                data = None  # reset by the local server, or by us
            if not data:
                break
            try:
                chan.sendall(data)
            except (OSError, EOFError, paramiko.SSHException):
                return  # the remote end is gone; _pump_to_local sees that too and decides
            self._count(to_remote=len(data))
        if data is None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                chan.close()
            return
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            chan.shutdown_write()

    def _count(self, to_local: int = 0, to_remote: int = 0) -> None:
        with self._lock:
            self._to_local += to_local
            self._to_remote += to_remote


_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
_CLOSE_GRACEFULLY = struct.pack("ii", 0, 0)


def connect_local(host: str, port: int, timeout: float) -> socket.socket:
    """A connection to the local server that ends in a RST if this process dies with it open
    (SIGKILL, the OOM killer): the kernel would otherwise close it with a FIN, which a CRIU page
    server takes for "every page sent" and so ends the only complete copy of the tree. Only
    `_Connection.pass_eof` (the verdict "done") turns the FIN back on."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    return sock


class _Connection:
    """One forwarded connection: the channel from sshd and our socket to the local server."""

    def __init__(self, chan: paramiko.Channel, sock: socket.socket):
        self.chan = chan
        self.sock = sock
        self.held = False  # the remote end has ended; the FIN to the local server awaits release()
        self.eof_passed = False  # the local server got a clean FIN
        self._closed = False
        self._lock = threading.Lock()

    def pass_eof(self) -> None:
        """Tell the local server, with a FIN, that the remote end finished cleanly."""
        with self._lock:
            if self._closed or self.eof_passed:
                return
            self.eof_passed = True
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _CLOSE_GRACEFULLY)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.eof_passed = False

    def finish(self) -> None:
        """Ordinary close, after both directions ended."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)  # wakes a pump still in recv(); sends nothing
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.chan.close()

    def reset(self) -> None:
        """Abort: the local server gets a RST, never a FIN (to a CRIU page server a FIN means
        "transfer complete"), and the remote end's channel is closed. Idempotent; pump threads
        blocked in recv() return at once (SHUT_RD wakes them without sending anything)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            eof_passed = self.eof_passed
        if not eof_passed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.chan.close()


class _Deadline:
    def __init__(self, seconds: float):
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())
