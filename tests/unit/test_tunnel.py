"""ReverseTunnel against an in-process paramiko SSH server (no root, no sshd).

The fake server grants `tcpip-forward` and plays the remote host's part by opening
`forwarded-tcpip` channels itself, which is what sshd does when something connects to the
forwarded port.
"""

import socket
import threading
import time

import paramiko
import pytest

from migrate.tunnel import ReverseTunnel
from runtime.errors import RemoteError

_KEY = None


def _host_key():
    global _KEY
    if _KEY is None:
        _KEY = paramiko.RSAKey.generate(1024)
    return _KEY


class _Server(paramiko.ServerInterface):
    def __init__(self, grant=True):
        self.grant = grant
        self.forwards = []
        self.cancelled = []
        self._next = 40000

    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_port_forward_request(self, address, port):
        if not self.grant:
            return False
        if port == 0:
            self._next += 1
            port = self._next
        self.forwards.append((address, port))
        return port

    def cancel_port_forward_request(self, address, port):
        self.cancelled.append((address, port))


class _Pair:
    """A client transport (ours) connected to a fake server transport (the remote sshd)."""

    def __init__(self, grant=True):
        a, b = socket.socketpair()
        self.server = _Server(grant)
        self.st = paramiko.Transport(b)
        self.st.add_server_key(_host_key())
        self.st.start_server(event=threading.Event(), server=self.server)  # returns at once
        self.ct = paramiko.Transport(a)
        self.ct.start_client(timeout=10)
        self.ct.auth_none("root")

    def connect(self, port):
        """What a process on the remote host connecting to 127.0.0.1:PORT looks like to us."""
        chan = self.st.open_forwarded_tcpip_channel(("127.0.0.1", 51000), ("127.0.0.1", port))
        chan.settimeout(10)
        return chan

    def close(self):
        self.ct.close()
        self.st.close()


@pytest.fixture
def pair():
    p = _Pair()
    yield p
    p.close()


class _LocalServer:
    """A TCP server on 127.0.0.1: echoes (upper-cased) until EOF, then says "bye" and closes."""

    def __init__(self, tag=b""):
        self.tag = tag
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(self.tag + data.upper() if self.tag else data.upper())
                conn.sendall(b"bye")
            except ConnectionResetError:
                pass  # the tunnel resets connections it aborts

    def close(self):
        self.sock.close()


def _recv_exactly(chan, n):
    out = bytearray()
    while len(out) < n:
        data = chan.recv(n - len(out))
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


def _recv_all(chan):
    out = bytearray()
    while data := chan.recv(65536):
        out += data
    return bytes(out)


def test_round_trip_half_close_and_counts(pair):
    server = _LocalServer()
    try:
        with ReverseTunnel(pair.ct, server.port) as tunnel:
            assert tunnel.remote_port == 40001
            assert pair.server.forwards == [("127.0.0.1", 40001)]
            chan = pair.connect(tunnel.remote_port)
            chan.sendall(b"hello")
            assert _recv_exactly(chan, 5) == b"HELLO"
            # EOF from the remote side reaches the local server, whose answer and EOF come back
            chan.shutdown_write()
            assert _recv_all(chan) == b"bye"
            chan.close()
            _wait(lambda: tunnel.stats().active == 0)
            stats = tunnel.stats()
            assert (stats.connections, stats.to_local, stats.to_remote, stats.failed) == (1, 5, 8, 0)
        _wait(lambda: pair.server.cancelled == [("127.0.0.1", 40001)])
    finally:
        server.close()


def test_large_transfer_both_ways_at_once(pair):
    server = _LocalServer()
    blob = bytes(range(256)) * (16 * 4096)  # 16 MiB, more than every window on the way
    try:
        with ReverseTunnel(pair.ct, server.port) as tunnel:
            chan = pair.connect(tunnel.remote_port)
            sender = threading.Thread(target=lambda: (chan.sendall(blob), chan.shutdown_write()))
            sender.start()
            got = _recv_all(chan)
            sender.join(10)
            assert got == blob.upper() + b"bye"
            _wait(lambda: tunnel.stats().active == 0)
            assert tunnel.bytes_to_local == len(blob)
            assert tunnel.bytes_to_remote == len(blob) + 3
    finally:
        server.close()


def test_unreachable_local_server_closes_the_remote_connection(pair):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with ReverseTunnel(pair.ct, dead_port, what="host-b") as tunnel:
        try:
            chan = pair.connect(tunnel.remote_port)
        except paramiko.SSHException:
            pass  # the fake server's open_channel loses the race with our immediate close; sshd does not
        else:
            assert chan.recv(10) == b""
        _wait(lambda: tunnel.stats().failed == 1)
        assert tunnel.stats().connections == 1
        assert f"cannot reach 127.0.0.1:{dead_port}" in tunnel.errors[0]
        assert "host-b" in tunnel.errors[0]


def test_refused_forward_is_a_remote_error():
    pair = _Pair(grant=False)
    try:
        tunnel = ReverseTunnel(pair.ct, 1, what="host-b")
        with pytest.raises(RemoteError, match=r"host-b refused to forward 127.0.0.1:0 .*AllowTcpForwarding"):
            tunnel.open()
        tunnel.close()  # harmless after a failed open
    finally:
        pair.close()


def test_closed_connection_is_a_remote_error(pair):
    pair.ct.close()
    with pytest.raises(RemoteError, match="the connection is closed"):
        ReverseTunnel(pair.ct, 1, what="host-b").open()
    with pytest.raises(RemoteError, match="the connection is closed"):
        ReverseTunnel(None, 1).open()


def test_two_tunnels_on_one_connection_route_by_port(pair):
    """paramiko has one handler per transport: each connection must still reach its own server."""
    one, two = _LocalServer(b"1:"), _LocalServer(b"2:")
    try:
        first = ReverseTunnel(pair.ct, one.port).__enter__()
        second = ReverseTunnel(pair.ct, two.port).__enter__()
        assert first.remote_port != second.remote_port
        for tunnel, tag in ((first, b"1:"), (second, b"2:"), (first, b"1:")):
            chan = pair.connect(tunnel.remote_port)
            chan.sendall(b"x")
            assert _recv_exactly(chan, 3) == tag + b"X"
            chan.close()
        second.close()
        # closing one tunnel leaves the other one working
        chan = pair.connect(first.remote_port)
        chan.sendall(b"y")
        assert _recv_exactly(chan, 3) == b"1:Y"
        chan.close()
        first.close()
        assert (one.accepted, two.accepted) == (3, 1)
        wanted = [("127.0.0.1", first.remote_port), ("127.0.0.1", second.remote_port)]
        assert sorted(pair.server.cancelled) == sorted(wanted)
    finally:
        one.close()
        two.close()


def test_close_during_transfer_ends_every_connection_promptly(pair):
    """A local server that never answers and never reads to the end must not hold close() up."""
    stuck = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(stuck.accept()[0]), daemon=True).start()
    try:
        tunnel = ReverseTunnel(pair.ct, stuck.getsockname()[1]).__enter__()
        chans = [pair.connect(tunnel.remote_port) for _ in range(3)]
        chans[0].sendall(b"z" * 100_000)
        _wait(lambda: tunnel.stats().connections == 3 and tunnel.stats().active + tunnel.stats().failed == 3)
        started = time.monotonic()
        stats = tunnel.close(timeout=5)
        assert time.monotonic() - started < 2
        assert stats.active == 0
        assert not [t for t in tunnel._threads if t.is_alive()]
        # the remote ends see EOF
        for chan in chans:
            chan.settimeout(5)
            assert _recv_all(chan) == b""
        # connections arriving after close (sshd sends none once cancelled) are refused or closed
        try:
            late = pair.connect(tunnel.remote_port)
        except paramiko.SSHException:
            pass
        else:
            assert late.recv(1) == b""
        assert tunnel.close() == tunnel.stats()  # idempotent
    finally:
        stuck.close()
        for conn in held:
            conn.close()


def _wait(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


class _EndWatcher:
    """A local server that reads one connection to its end and records how it ended: fin or rst."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.data = bytearray()
        self.end = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        conn, _ = self.sock.accept()
        with conn:
            try:
                while data := conn.recv(65536):
                    self.data += data
                self.end = "fin"
            except ConnectionResetError:
                self.end = "rst"
        self.done.set()

    def wait(self):
        assert self.done.wait(10), "the local connection never ended"
        return self.end

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("verdict", [True, False, None])
def test_held_eof_waits_for_the_verdict(pair, verdict):
    """A remote end that finishes (or dies) is passed on only once the caller knows which it was."""
    watcher = _EndWatcher()
    try:
        tunnel = ReverseTunnel(pair.ct, watcher.port, hold_remote_eof=True).__enter__()
        chan = pair.connect(tunnel.remote_port)
        chan.sendall(b"PS_IOV_CLOSE")
        chan.close()  # looks the same whether the remote peer exited cleanly or was killed
        _wait(lambda: bytes(watcher.data) == b"PS_IOV_CLOSE")
        assert not watcher.done.wait(0.3), "the EOF must be held"
        if verdict is None:
            tunnel.close()  # no verdict: treated as a failure
        else:
            tunnel.release(verdict)
        assert watcher.wait() == ("fin" if verdict else "rst")
        tunnel.close()
        assert tunnel.stats().active == 0
    finally:
        watcher.close()


def test_verdict_given_early_applies_to_later_eofs(pair):
    watcher = _EndWatcher()
    try:
        with ReverseTunnel(pair.ct, watcher.port, hold_remote_eof=True) as tunnel:
            chan = pair.connect(tunnel.remote_port)
            chan.sendall(b"x")
            _wait(lambda: bytes(watcher.data) == b"x")
            tunnel.release(True)
            chan.close()
            assert watcher.wait() == "fin"
    finally:
        watcher.close()


def test_close_resets_an_active_connection_instead_of_finishing_it(pair):
    """Aborting must never look like a clean end to the local server."""
    watcher = _EndWatcher()
    try:
        tunnel = ReverseTunnel(pair.ct, watcher.port).__enter__()
        chan = pair.connect(tunnel.remote_port)
        chan.sendall(b"partial")
        _wait(lambda: bytes(watcher.data) == b"partial")
        tunnel.close()
        assert watcher.wait() == "rst"
    finally:
        watcher.close()


def _server_sees(conn: socket.socket) -> str:
    conn.settimeout(10)
    try:
        return "fin" if conn.recv(1) == b"" else "data"
    except ConnectionResetError:
        return "rst"


@pytest.mark.parametrize("graceful", [False, True])
def test_a_forwarded_connection_whose_process_dies_ends_in_a_reset(graceful):
    """SIGKILL of the controller must never look like "all pages sent" to CRIU's page server:
    the kernel's close of a dead process's socket is a RST, unless the verdict "done" (a FIN)
    was given before."""
    import os
    import signal

    from migrate.tunnel import _Connection, connect_local

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        child = os.fork()
        if child == 0:  # the controller: connects, maybe gives the verdict, then dies
            try:
                sock = connect_local("127.0.0.1", port, 5)
                if graceful:
                    _Connection(None, sock).pass_eof()
                time.sleep(0.2)
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        conn, _ = listener.accept()
        with conn:
            os.waitpid(child, 0)
            assert _server_sees(conn) == ("fin" if graceful else "rst")
