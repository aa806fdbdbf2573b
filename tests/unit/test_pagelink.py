"""The direct page connection on this machine's loopback: only the connection that brings the
migration's token is kept, whoever else connects first; the agent's side of it; and the byte
count the progress bar reads."""

import socket
import threading
import time

import pytest

from migrate import agent as agent_module
from migrate import pagelink
from runtime.errors import InvalidInput, RemoteError


@pytest.fixture
def from_loopback(monkeypatch):
    """The agent as sshd starts it for a source at 127.0.0.1."""
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.1 50000 127.0.0.1 22")


def agent_connects(kept: list):
    """ask_target as the controller's call does it: the agent connects, sends the token, answers."""
    return lambda port, token: kept.append(agent_module._direct_connection({"port": port, "token": token}))


def test_the_agents_connection_is_the_one_kept_and_carries_bytes_both_ways(from_loopback):
    there = []
    here = pagelink.direct("127.0.0.1", agent_connects(there))
    with here, there[0]:
        assert here.getpeername() == there[0].getsockname()
        for end in (here, there[0]):  # tuned for CRIU's requests and answers (pagelink.tune)
            assert end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert end.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"cubic"
        here.sendall(b"x" * (1 << 20))
        got = 0
        while got < 1 << 20:
            got += len(there[0].recv(1 << 20))
        there[0].sendall(b"ok")
        assert here.recv(2) == b"ok"
        deadline = time.monotonic() + 5
        while pagelink.bytes_sent(here) < 1 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pagelink.bytes_sent(here) == 1 << 20  # the kernel's count of what was acknowledged


def test_intruders_that_connect_first_are_closed_and_none_holds_up_the_agent(from_loopback):
    there, intruders = [], []

    def intrude_then_agent(port, token):
        silent = socket.create_connection(("127.0.0.1", port))
        wrong = socket.create_connection(("127.0.0.1", port))
        wrong.sendall(bytes(pagelink.TOKEN_BYTES))
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(bytes.fromhex(token)[:pagelink.TOKEN_BYTES // 2])  # right so far, then nothing
        intruders.extend((silent, wrong, half))
        agent_connects(there)(port, token)

    started = time.monotonic()
    here = pagelink.direct("127.0.0.1", intrude_then_agent)
    assert time.monotonic() - started < 2  # the silent ones were not waited for
    with here, there[0]:
        assert here.getpeername() == there[0].getsockname()
        for s in intruders:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed by the controller's side
            s.close()


def test_a_flood_of_silent_connections_holds_only_so_many_and_the_agent_still_gets_in(from_loopback, monkeypatch):
    monkeypatch.setattr(pagelink, "MAX_WAITING", 3)
    there, flood = [], []

    def flood_then_agent(port, token):
        flood.extend(socket.create_connection(("127.0.0.1", port)) for _ in range(7))
        agent_connects(there)(port, token)

    here = pagelink.direct("127.0.0.1", flood_then_agent)
    with here, there[0]:
        assert here.getpeername() == there[0].getsockname()
    for s in flood:  # all closed: the oldest to make room, the rest at the end
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()


def test_no_connection_with_the_token_in_time_fails_and_closes_the_others(monkeypatch):
    monkeypatch.setattr(pagelink, "TOKEN_TIMEOUT", 0.5)
    wrong = []

    def guess(port, _token):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"\x01" * pagelink.TOKEN_BYTES)
        wrong.append(s)

    with pytest.raises(RemoteError, match="token"):
        pagelink.direct("127.0.0.1", guess)
    wrong[0].settimeout(5)
    assert wrong[0].recv(1) == b""


@pytest.mark.parametrize("address, words", [
    ("192.0.2.1", "not an address of this host"), ("host-a", "not an IP address"),
    (None, "not started by sshd")])
def test_an_address_this_host_cannot_listen_on_fails_before_asking_the_target(address, words):
    asked = []
    with pytest.raises(RemoteError, match=words):
        pagelink.direct(address, lambda port, token: asked.append(port))
    assert asked == []


@pytest.mark.parametrize("direct", [
    None, "x", {"port": 0, "token": "ab" * 32}, {"port": 70000, "token": "ab" * 32}, {"port": True, "token": "ab" * 32},
    {"port": 5000, "token": "ab"}, {"port": 5000, "token": "AB" * 32}, {"port": 5000}])
def test_the_agent_refuses_a_bad_direct_request(from_loopback, direct):
    with pytest.raises(InvalidInput, match="bad direct page connection"):
        agent_module._direct_connection(direct)


def test_the_agent_connects_only_where_ssh_says_the_source_is(monkeypatch):
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    with pytest.raises(RemoteError, match="SSH_CONNECTION"):
        agent_module._direct_connection({"port": 5000, "token": "ab" * 32})


def test_a_refused_direct_connection_is_a_remote_error_naming_the_address(from_loopback):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match=f"cannot reach 127.0.0.1 port {port} directly"):
        agent_module._direct_connection({"port": port, "token": "ab" * 32})


def test_the_agent_tells_the_source_where_it_sees_it(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "fe80::1 50000 fe80::2 22")
    assert agent_module._ssh_client() == "fe80::1"
    monkeypatch.setenv("SSH_CONNECTION", "junk")
    assert agent_module._ssh_client() is None


def test_bytes_sent_of_a_socket_without_tcp_info_is_unknown():
    a, b = socket.socketpair()
    with a, b:
        assert pagelink.bytes_sent(a) is None


def test_a_slow_agent_is_still_taken_within_the_timeout(from_loopback):
    """The agent's connect may land after the call returned (it does not, but the kernel's accept
    queue must not depend on it): a connection arriving while the controller waits is kept."""
    there = []

    def later(port, token):
        threading.Timer(0.3, agent_connects(there), (port, token)).start()

    here = pagelink.direct("127.0.0.1", later)
    deadline = time.monotonic() + 5
    while not there and time.monotonic() < deadline:
        time.sleep(0.01)
    with here, there[0]:
        assert here.getpeername() == there[0].getsockname()


def _wait_for(sock: socket.socket, nbytes: int) -> float:
    started = time.monotonic()
    sock.settimeout(5)
    assert sock.recv(nbytes, socket.MSG_WAITALL) == b"x" * nbytes
    return time.monotonic() - started


def test_a_direct_connection_corked_as_criu_does_is_uncorked_so_its_last_message_is_not_held(from_loopback):
    there = []
    here = pagelink.direct("127.0.0.1", agent_connects(there))
    with here, there[0]:
        here.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # CRIU's page socket, from its start
        here.send(b"x" * 24)  # its close request: no push after it
        assert _wait_for(there[0], 24) > 0.15  # the kernel's cork timer held it
        with pagelink.Uncorker(here):
            here.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            time.sleep(0.05)
            here.send(b"x" * 24)
            assert _wait_for(there[0], 24) < 0.1
        assert here.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0


def test_no_uncorker_runs_for_a_unix_socket_or_none():
    a, b = socket.socketpair()
    with a, b, pagelink.Uncorker(a) as u, pagelink.Uncorker(None) as none:
        assert u._thread is None and none._thread is None
