"""The raw wire from host-a to host-b: the same number of bytes as the container's memory,
through OpenSSH (`ssh host-b 'cat >/dev/null'` fed from a file, aes128-gcm, login included,
as the by-hand baseline pays it) and through a plain TCP connection (this module's own
sender and receiver, run in the hosts' network namespaces; timed from connect to the
receiver's acknowledgement, without process start-up). The data is random, so nothing on
the way could compress it."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from migrate.testhosts import TestHosts

from .moves import SOURCE, TARGET, BenchError, run, ssh_argv

CHUNK = 16 << 20


def payload(folder: Path, size_mib: int) -> Path:
    """A file of SIZE_MIB MiB of random bytes in FOLDER (made once, then from the page cache)."""
    path = folder / f"wire-{size_mib}M"
    if not path.exists():
        part = path.with_suffix(".part")
        with open(part, "wb") as f:
            for _ in range(size_mib * (1 << 20) // CHUNK):
                f.write(os.urandom(CHUNK))
            f.write(os.urandom(size_mib * (1 << 20) % CHUNK))
        part.rename(path)
    return path


def through_ssh(hosts: TestHosts, data: Path) -> float:
    with open(data, "rb") as f:
        started = time.monotonic()
        run(hosts, SOURCE, [*ssh_argv(hosts), TARGET, "cat >/dev/null"], stdin=f)
        return time.monotonic() - started


def through_tcp(hosts: TestHosts, data: Path) -> float:
    me = [sys.executable, "-m", "benchkit.wire"]
    path = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    receiver = subprocess.Popen(hosts.local_argv(TARGET, *me, "receive", hosts[TARGET].ip),
                                env={**hosts.local_env(TARGET), **path},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = receiver.stdout.readline().strip()
        if not port.isdigit():
            raise BenchError(f"the TCP receiver did not start: {receiver.stderr.read()[-500:]}")
        p = run(hosts, SOURCE, [*me, "send", hosts[TARGET].ip, port, str(data)], timeout=600, env=path)
        receiver.wait(30)
        return float(p.stdout.strip())
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def _receive(ip: str) -> None:
    """Accept one connection, read it to its end, answer one byte."""
    with socket.create_server((ip, 0)) as server:
        print(server.getsockname()[1], flush=True)
        conn, _ = server.accept()
        with conn:
            buf = bytearray(1 << 20)
            while conn.recv_into(buf):
                pass
            conn.sendall(b"k")


def _send(ip: str, port: int, path: str) -> None:
    """Send the file, then print the seconds from connect to the receiver's answer."""
    with open(path, "rb") as f:
        started = time.monotonic()
        with socket.create_connection((ip, port)) as conn:
            conn.sendfile(f)
            conn.shutdown(socket.SHUT_WR)
            if conn.recv(1) != b"k":
                raise SystemExit("the receiver did not acknowledge")
        print(f"{time.monotonic() - started:.6f}")


if __name__ == "__main__":
    if sys.argv[1] == "receive":
        _receive(sys.argv[2])
    else:
        _send(sys.argv[2], int(sys.argv[3]), sys.argv[4])
