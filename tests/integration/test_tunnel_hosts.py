"""Reverse tunnel between two test hosts: host-a holds the SSH connection to host-b and a TCP
server on its own loopback; a process on host-b reaches that server via 127.0.0.1:PORT on host-b.

The driver runs ON host-a (through SSH, like the migration controller would on the source), so
the two loopbacks really are different network namespaces.
"""

import json
import sys
from pathlib import Path

import pytest

from migrate.ssh import SSHSession

root = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]

# Runs on host-b: connect through the tunnel, send SEND bytes while reading everything back.
CLIENT = r"""
import json, socket, sys, threading, time
port, mode, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port), timeout=60)
block = bytes(range(256)) * 1024
started = time.monotonic()
if mode == "echo":
    def send():
        left = size
        while left:
            n = s.send(block[: min(left, len(block))])
            left -= n
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
got, good = 0, True
while data := s.recv(1 << 20):
    if mode == "echo" and got < 1 << 20:  # check the start of the stream byte for byte
        want = (block * ((got + len(data)) // len(block) + 2))[got % len(block): got % len(block) + len(data)]
        good = good and data == want
    got += len(data)
seconds = time.monotonic() - started
if mode == "echo":
    t.join()
print(json.dumps({"got": got, "good": good, "seconds": seconds}))
"""

# Runs on host-a: the local servers, the SSH connection to host-b and the tunnel.
DRIVER = r"""
import dataclasses, json, socket, sys, threading, time
from migrate.hosts import resolve_host
from migrate.ssh import SSHSession
from migrate.tunnel import ReverseTunnel

client, size = sys.argv[1], int(sys.argv[2])
python = sys.executable

def serve(handler):
    srv = socket.create_server(("127.0.0.1", 0))
    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return srv

def echo(conn):
    with conn:
        while data := conn.recv(1 << 20):
            conn.sendall(data)

def source(conn):  # like a page server: the bytes flow from here to the remote side
    with conn:
        block = bytes(range(256)) * 4096
        left = size
        while left:
            n = min(left, len(block))
            conn.sendall(block[:n])
            left -= n

out = {}
echo_srv, source_srv = serve(echo), serve(source)
with SSHSession.connect(resolve_host("host-b")) as session:
    with ReverseTunnel(session.transport, echo_srv.getsockname()[1], what="host-b") as tunnel:
        out["remote_port"] = tunnel.remote_port
        # host-b's own loopback and hostname: the echo server is not there, only the tunnel
        rc, so, _ = session.run(["hostname"])
        out["remote_hostname"] = so.decode().strip()
        rc, so, se = session.run([python, "-c", client, str(tunnel.remote_port), "echo", "100000"])
        out["small"] = json.loads(so) if rc == 0 else se.decode()
        rc, so, se = session.run([python, "-c", client, str(tunnel.remote_port), "echo", str(size)], timeout=300)
        out["echo"] = json.loads(so) if rc == 0 else se.decode()
        out["echo_stats"] = dataclasses.asdict(tunnel.close())
    with ReverseTunnel(session.transport, source_srv.getsockname()[1], what="host-b") as tunnel:
        rc, so, se = session.run([python, "-c", client, str(tunnel.remote_port), "pull", str(size)], timeout=300)
        out["pull"] = json.loads(so) if rc == 0 else se.decode()
        out["pull_stats"] = dataclasses.asdict(tunnel.close())
    # after close nothing listens there any more
    probe = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)"
    rc, so, se = session.run([python, "-c", probe, str(out["remote_port"])])
    out["after_close_rc"] = rc
print(json.dumps(out))
"""


@root
def test_remote_process_reaches_local_server_through_the_tunnel(test_hosts):
    hosts = test_hosts(2)
    size = 256 << 20
    with SSHSession.connect(hosts.spec("host-a")) as session:
        rc, out, err = session.run(
            ["env", f"PYTHONPATH={REPO}", sys.executable, "-c", DRIVER, CLIENT, str(size)], timeout=600
        )
    assert rc == 0, err.decode()[-2000:]
    result = json.loads(out)
    assert result["remote_hostname"] == "host-b"
    assert result["small"] == {"got": 100000, "good": True, "seconds": result["small"]["seconds"]}
    assert result["echo"]["got"] == size and result["echo"]["good"]
    assert result["pull"]["got"] == size
    stats = result["echo_stats"]
    assert stats["to_local"] == stats["to_remote"] == size + 100000
    assert stats["connections"] == 2 and stats["failed"] == 0 and stats["active"] == 0
    assert result["pull_stats"]["to_remote"] == size
    assert result["after_close_rc"] != 0
    echo_mb_s = size / result["echo"]["seconds"] / 1e6
    pull_mb_s = size / result["pull"]["seconds"] / 1e6
    print(f"\ntunnel 256 MiB: echo {echo_mb_s:.0f} MB/s each way ({result['echo']['seconds']:.2f} s), "
          f"one way {pull_mb_s:.0f} MB/s ({result['pull']['seconds']:.2f} s)")
