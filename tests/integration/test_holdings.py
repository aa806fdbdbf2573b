"""What a container holds decides how it can be checkpointed or moved: connections to the
outside, SQLite databases in its own filesystem, processes of another user. Each is refused in
one line before anything is frozen, or carried over, through the real CLI, CRIU and test hosts."""

import os
import subprocess
import time

import pytest
from clihost import IMAGE, proc_gone, proc_identity, wait_until
from test_checkpoint import checkpoint, restore

from runtime import procfs

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PORT = 9000
SQLITE_HEADER = r"SQLite format 3\000"


def _inode(host, name: str, path: str) -> int:
    r = host.ok("exec", name, "stat", "-c", "%i", path)
    return int(r.out.strip())


def test_files_keep_their_inode_numbers_through_checkpoint_and_restore(bb):
    """SQLite and others compare a file's inode number with the one they opened."""
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", "echo data > /data.db; exec 3<>/data.db; sleep 1000")
    wait_until(lambda: bb.run("exec", "c1", "test", "-s", "/data.db").rc == 0, 10, "the file")
    ino = _inode(bb, "c1", "/data.db")
    checkpoint(bb, "c1")
    restore(bb, "c1")
    assert _inode(bb, "c1", "/data.db") == ino
    # the restored process still holds the very file the path names
    pid = bb.container("c1")["pid"]
    assert os.stat(f"/proc/{pid}/fd/3").st_ino == os.stat(f"/proc/{pid}/root/data.db").st_ino


def test_other_users_processes_checkpoint_only_with_cap_sys_resource(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c",
          'echo "u:x:1000:1000::/:/bin/sh" >> /etc/passwd; exec su -s /bin/sh u -c "exec sleep 1000"')
    pid = wait_until(lambda: procfs.foreign_ids([bb.container("c1")["pid"]]) and bb.container("c1")["pid"], 10,
                     "the process to run as uid 1000")
    if procfs.can_dump_other_users():  # the VM guests: root has it
        checkpoint(bb, "c1")
        pid = restore(bb, "c1")
        assert procfs.foreign_ids([pid]) == {1000}
        return
    before = bb.snapshot_of_state()
    r = bb.fails(6, "checkpoint", "c1")
    assert "CAP_SYS_RESOURCE" in r.err and "1000" in r.err and len(r.err.strip().splitlines()) == 1, str(r)
    # refused before the freeze: nothing written, still running, same process
    assert bb.snapshot_of_state() == before
    assert (bb.container("c1")["state"], bb.container("c1")["pid"]) == ("running", pid)
    assert bb.json("snapshots", "c1") == []


def criu_tables(c, host: str) -> set[str]:
    """CRIU's network lock tables in a host's network namespace."""
    out = subprocess.run([*_netns_of(c, host), "nft", "list", "tables", "inet"], capture_output=True,
                         text=True, timeout=30).stdout
    return {line.split()[-1] for line in out.splitlines() if line.startswith("table inet CRIU-")}


def _netns_of(c, host: str) -> list[str]:
    return ["nsenter", f"--target={c.hosts[host].sshd_pid}", "--net", "--"]


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_move_refused_with_a_connection_to_outside_then_done_with_tcp_close(two, mode):
    a = two["host-a"]
    # a server in the container, a client on host-a outside it
    a.ok("run", "--name", "c1", IMAGE, "sh", "-c", f"sleep 100000 | nc -l -p {PORT}")
    wait_until(lambda: subprocess.run([*_netns_of(two, "host-a"), "sh", "-c", f"grep -qi ':{PORT:04X} ' /proc/net/tcp*"]
                                      ).returncode == 0, 10, "the server to listen")
    client = subprocess.Popen([*_netns_of(two, "host-a"), "busybox", "nc", "127.0.0.1", str(PORT)],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client.stdin.write(b"hello\n")
        client.stdin.flush()
        wait_until(lambda: "hello" in a.logs("c1"), 10, "the server to read from its client")
        pid = a.container("c1")["pid"]
        before = a.snapshot_of_state()
        tables = {h: criu_tables(two, h) for h in ("host-a", "host-b")}
        r = two.move("host-a", "c1", "host-b", mode=mode)
        assert r.rc == 8, str(r)
        assert len(r.err.strip().splitlines()) == 1 and f"127.0.0.1:{PORT} -> 127.0.0.1:" in r.err, str(r)
        assert "--tcp-close" in r.err, str(r)
        assert a.snapshot_of_state() == before
        assert (a.container("c1")["state"], a.container("c1")["pid"]) == ("running", pid)
        assert two["host-b"].ps() == {}

        r = two.move("host-a", "c1", "host-b", "--tcp-close", mode=mode)
        assert r.rc == 0, str(r)
        assert "closed on host-b" in r.err and f"127.0.0.1:{PORT}" in r.err, str(r)
        moved = two["host-b"].container("c1")
        assert moved["state"] == "running" and not proc_gone(proc_identity(moved["pid"]))
        assert "c1" not in a.ps()
        # the client's peer is gone for good: it is told so (a reset), not left waiting
        for _ in range(3):
            try:
                client.stdin.write(b"more\n")
                client.stdin.flush()
            except BrokenPipeError:
                break
            time.sleep(0.2)
        client.wait(timeout=10)
        # CRIU's lock of those connections is gone too: it would drop a later connection's packets
        assert {h: criu_tables(two, h) for h in ("host-a", "host-b")} == tables
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_move_refused_with_an_open_sqlite_database_unless_allowed(two):
    a = two["host-a"]
    a.ok("run", "--name", "c1", IMAGE, "sh", "-c",
         f"printf '{SQLITE_HEADER}' > /data.db; exec 3<>/data.db; while true; do sleep 0.1; done")
    wait_until(lambda: a.run("exec", "c1", "test", "-s", "/data.db").rc == 0, 10, "the database file")
    before = a.snapshot_of_state()
    r = two.move("host-a", "c1", "host-b")
    assert r.rc == 8 and "/data.db" in r.err and "--allow-new-inodes" in r.err, str(r)
    assert a.snapshot_of_state() == before
    r = two.move("host-a", "c1", "host-b", "--allow-new-inodes")
    assert r.rc == 0 and "/data.db" in r.err, str(r)
    assert two["host-b"].container("c1")["state"] == "running"


def test_move_refused_while_the_target_holds_the_containers_port(two):
    a = two["host-a"]
    port = PORT + 1
    a.ok("run", "--name", "c1", IMAGE, "sh", "-c", f"sleep 100000 | nc -l -p {port}")
    listening = f"grep -qi ':{port:04X} ' /proc/net/tcp*"
    wait_until(lambda: subprocess.run([*_netns_of(two, "host-a"), "sh", "-c", listening]).returncode == 0, 10,
               "the server to listen")
    # something else on host-b already listens on that port
    blocker = subprocess.Popen([*_netns_of(two, "host-b"), "busybox", "nc", "-l", "-p", str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run([*_netns_of(two, "host-b"), "sh", "-c", listening]).returncode == 0, 10,
                   "the blocker to listen")
        before = a.snapshot_of_state()
        r = two.move("host-a", "c1", "host-b")
        assert r.rc == 8 and f":{port}" in r.err and "taken on host-b" in r.err, str(r)
        assert a.snapshot_of_state() == before and two["host-b"].ps() == {}
    finally:
        blocker.kill()
        blocker.wait()
    r = two.move("host-a", "c1", "host-b")
    assert r.rc == 0, str(r)
