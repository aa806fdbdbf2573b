"""The page connection: one socket between this host's CRIU and the target's, made before either
CRIU is given its end; carried by the SSH connection rsync already holds, or, on a trusted
network when asked for, a direct TCP connection.

Through SSH, both ends are unix sockets only root can reach: here one listening in a fresh 0700
folder, there one that sshd makes (mode 0600) in the migration's 0700 incoming folder, which
the agent connects to and removes at once. So no TCP port is opened on either host: CRIU's own
page server would listen on one, on a loopback every container of the host shares, for whoever
connects first, who could then read the container's memory or end the transfer. The bytes go
from CRIU to ssh to sshd to CRIU: OpenSSH's speed, no copy through Python.

Direct, the bytes go unencrypted at the network's speed. This host listens on the address the
target sees it at, on a port of the kernel's choosing, for a few seconds; the agent connects
there and first sends a one-time token it got through SSH. Only a connection that brings it is
kept, so another process (on either host, or in a container sharing a host's network) cannot
take the controller's place; whoever can read the network can still read the pages.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import selectors
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runtime.errors import RemoteError

from .transfer import Rsync

ACCEPT_TIMEOUT = 30.0
SOCKET_NAME = "pages-{}.sock"  # in the target's incoming folder; the agent checks the name
TOKEN_BYTES = 32  # the direct connection's first bytes
DIRECT_CONNECT_TIMEOUT = 5.0  # the agent's connect: a network that drops it falls back to SSH this soon
TOKEN_TIMEOUT = DIRECT_CONNECT_TIMEOUT + 5.0  # the agent has connected when its answer comes: this is slack
MAX_WAITING = 64  # connections read side by side for the token
_TCP_INFO_BYTES_ACKED = 120  # struct tcp_info: tcpi_bytes_acked (u64, Linux >= 4.1)
UNCORK_EVERY = 0.005  # seconds: at most this long does CRIU's last message on a direct connection wait


def connect(rsync: Rsync, incoming: str, ask_target: Callable[[str], None]) -> socket.socket:
    """The connected socket here. ask_target(path) has the agent connect to PATH there (and do
    what the connection is for: start a page server on it, or keep it for a lazy restore)."""
    here = Path(tempfile.mkdtemp(prefix="migrate-pages-"))  # 0700
    local = here / "s"
    remote = f"{incoming}/{SOCKET_NAME.format(secrets.token_hex(4))}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(local))
        listener.listen(1)
        rsync.forward_socket(remote, local)
        try:
            ask_target(remote)
            # sshd has the agent's connection already; its channel may still be on the way, so
            # the forward is cancelled only once that has arrived
            listener.settimeout(ACCEPT_TIMEOUT)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise RemoteError(f"the page connection to {rsync.spec.alias} did not arrive within "
                                  f"{ACCEPT_TIMEOUT:.0f} s") from None
        finally:
            rsync.cancel_socket_forward(remote, local)
    finally:
        listener.close()
        shutil.rmtree(here, ignore_errors=True)
    conn.settimeout(None)
    return conn


def direct(address: str | None, ask_target: Callable[[int, str], None]) -> socket.socket:
    """The connected TCP socket here, to the agent that ask_target(port, token) has connect to
    ADDRESS:port (this host as the target sees it) and send the token."""
    if address is None:
        raise RemoteError("the target does not know this host's address (its agent was not started by sshd)")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        raise RemoteError(f"the target sees this host at {address!r}, which is not an IP address") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            listener.bind((address, 0))
        except OSError as e:
            raise RemoteError(f"the target sees this host at {address}, which is not an address of this host "
                              f"(NAT or a jump host between them?): {e.strerror or e}") from None
        listener.listen(8)
        token = secrets.token_bytes(TOKEN_BYTES)
        ask_target(listener.getsockname()[1], token.hex())
        conn = _bringing(listener, token, time.monotonic() + TOKEN_TIMEOUT)
    finally:
        listener.close()
    tune(conn)
    return conn


def tune(link: socket.socket) -> None:
    """Both ends of a direct connection: no delay for CRIU's small page requests, and CUBIC's
    congestion control where the system's is another. With BBR (this project's test machines'
    default) half of a lazy restore's 4 MiB answers took 25-86 ms instead of 1: BBR paces each
    burst after the pause a request leaves (CRIU's log; 1 GiB 5.6-9.3 s after the restore, with
    CUBIC 0.9-1.3 s, through SSH 1.5-2.6 s; then uncorked, below, 0.4-0.8 s)."""
    link.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):  # a kernel without it keeps its own
        link.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")


def _bringing(listener: socket.socket, token: bytes, deadline: float) -> socket.socket:
    """The first connection to LISTENER whose first bytes are TOKEN; the others are closed. All
    are read side by side, so one that connects and says nothing holds up no other, and a flood
    of them costs at most MAX_WAITING descriptors (the oldest is dropped)."""
    waiting: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ)

        def drop(s: socket.socket) -> None:
            sel.unregister(s)
            waiting.pop(s, None)
            s.close()

        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteError(f"no direct page connection brought the migration's token within "
                                      f"{TOKEN_TIMEOUT:.0f} s")
                for key, _ in sel.select(left):
                    s = key.fileobj
                    if s is listener:
                        try:
                            conn, _ = listener.accept()
                        except OSError:  # out of descriptors, or it went already
                            continue
                        if len(waiting) >= MAX_WAITING:
                            drop(next(iter(waiting)))
                        conn.setblocking(False)
                        waiting[conn] = b""
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        data = s.recv(TOKEN_BYTES - len(waiting[s]))
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    got = waiting[s] + data
                    if data and len(got) < TOKEN_BYTES:
                        waiting[s] = got  # judged whole only: a prefix's answer would help guess it
                    elif data and secrets.compare_digest(got, token):
                        sel.unregister(s)
                        del waiting[s]
                        s.setblocking(True)
                        return s
                    else:
                        drop(s)
        finally:
            for s in list(waiting):
                drop(s)


def bytes_sent(link: socket.socket) -> int | None:
    """What this end of a direct connection has sent and had acknowledged (the kernel's count,
    which CRIU's writes on the same socket add to); None where the kernel does not say."""
    try:
        info = link.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES_ACKED + 8:
        return None
    return struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)[0]


class Uncorker:
    """Keeps a direct connection uncorked while CRIU uses it, from a thread holding the same socket.

    CRIU corks its page socket (TCP_CORK) and pushes its page data with TCP_NODELAY, but not the
    close handshake at the end: each side's last message waits for the kernel's 200 ms cork
    timer. Measured: a lazy restore's daemon was done 0.4 s before it exited, and copy mode's
    dump waited 0.2 s for its page server's answer inside the freeze. CRIU corks once per
    process, at a moment no notification marks, so the cork is looked for every UNCORK_EVERY.
    A unix socket (the SSH connection's) has no cork: nothing runs for it. Stop it before the
    socket is closed."""

    def __init__(self, link: socket.socket | None):
        self._link = link
        self._stopped = threading.Event()
        self._thread = None
        if link is not None and link.family != socket.AF_UNIX:
            self._thread = threading.Thread(target=self._run, name="uncork", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def __enter__(self) -> "Uncorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopped.wait(UNCORK_EVERY):
            try:
                if self._link.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK):
                    self._link.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            except OSError:  # closed
                return
