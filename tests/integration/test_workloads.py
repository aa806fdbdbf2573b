"""Real workloads from a Debian 12 image (tests/images/build-debian-services: python3, redis-server,
sqlite3, procps), each carried through the three ways a container goes on elsewhere:

- `restore`: `migrate checkpoint` + `migrate restore` on one host (this machine's own state root
  and network namespace),
- `lazy`: `migrate NAME host-b --mode lazy` between two test hosts,
- `copy`: `migrate NAME host-b --mode copy` between two test hosts,

and each checked by the workload's own evidence: the same content served, the same redis
process (run_id) with its keys, a counter that goes on, an intact database, a new inotify event.

Containers share their host's network namespace: the single-host tests' ports are on this
machine's 127.0.0.1, the moves' on the test hosts' (a port free on both). Clients run on that
host (MigrateHost.host_python) and close their connections before anything is dumped, since a
container with a connection to the outside is not dumpable by design.

The image is imported once per module on each side (a 120 MiB layer); every test removes its
containers and snapshots afterwards and fails on anything the tool left behind.
"""

import json
import os
import re
import shlex
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from clihost import DEBIAN_IMAGE, MigrateHost, assert_consecutive, free_port, proc_gone, proc_identity, wait_until
from cluster import REMOTE_COMMAND, Cluster, assert_no_migration_leftovers, kill_in_cgroups, print_logs
from test_checkpoint import checkpoint, restore

from migrate.testhosts import TestHosts
from runtime import linux

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

STAGES = ["restore", "lazy", "copy"]
START_TIMEOUT = 30  # s, a workload to be up (python and redis start in well under a second)
AFTER_TIMEOUT = 60  # s, the evidence after a restore or move (lazy pages may still be arriving)


# ---------------------------------------------------------------------------------------------
# where the workloads run, and how they get elsewhere


@pytest.fixture(scope="module")
def services_host(module_host, debian_image) -> MigrateHost:
    """This machine's module-wide state root with the Debian image imported."""
    module_host.ok("image", "import", debian_image)
    return module_host


@pytest.fixture(scope="module")
def services_pair(request, tmp_path_factory, debian_image) -> Cluster:
    """host-a and host-b for the whole module; the Debian image imported on host-a (host-b gets
    its layer with the first move and keeps it)."""
    failures = request.session.testsfailed
    hosts = TestHosts(2, remote_command=REMOTE_COMMAND)
    c = Cluster(hosts, tmp_path_factory.mktemp("workload-hosts"))
    try:
        c["host-a"].ok("image", "import", debian_image)
        yield c
    finally:
        if request.session.testsfailed > failures:
            print_logs(c)
        leaks = c.teardown()
        try:
            hosts.teardown()
        except RuntimeError as e:
            leaks.append(str(e))
        if leaks:
            pytest.fail("the tool left things behind (cleaned up now):\n  " + "\n  ".join(leaks))


@dataclass
class Stage:
    """A workload starts on `src`; `carry` brings it to `dst` (the same host for `restore`)."""

    kind: str
    src: MigrateHost
    dst: MigrateHost
    cluster: Cluster | None = None

    @property
    def hosts(self) -> list[MigrateHost]:
        return [self.src] if self.src is self.dst else [self.src, self.dst]

    def port(self) -> int:
        """A TCP port free on 127.0.0.1 wherever the workload will run."""
        return free_port(*self.hosts)

    def start(self, name: str, *command: str) -> None:
        self.src.ok("run", "--name", name, DEBIAN_IMAGE, *command)
        if self.cluster is not None:
            self.cluster.record("host-a", name)  # its cgroups are swept if anything goes wrong

    def carry(self, name: str) -> int:
        """Checkpoint + restore, or move; returns the host PID of the container's init afterwards."""
        if self.kind == "restore":
            checkpoint(self.src, name)
            assert self.src.container(name)["state"] == "checkpointed"
            restore(self.src, name)
        else:
            self.cluster.move_json("host-a", name, "host-b", mode=self.kind)
            assert name not in self.src.ps()
        ct = self.dst.container(name)
        assert ct["state"] == "running" and not proc_gone(proc_identity(ct["pid"])), ct
        return ct["pid"]


@pytest.fixture
def stage(request) -> Stage:
    """Parametrized indirectly with "restore", "lazy" or "copy"."""
    kind = request.param
    if kind == "restore":
        h = request.getfixturevalue("services_host")
        st = Stage(kind, h, h)
        logs_of = SimpleNamespace(nodes={"host": h})
    else:
        c = request.getfixturevalue("services_pair")
        st = Stage(kind, c["host-a"], c["host-b"], c)
        logs_of = c
    yield st
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        print_logs(logs_of)
        for h in st.hosts:
            for name in h.catalog():
                r = h.run("logs", name)
                print(f"--- container.log of {name} on {h.root}\n{r.out[-2000:]}")
    leaks = _clean(st)
    if leaks:
        pytest.fail("the tool left things behind (cleaned up now):\n  " + "\n  ".join(leaks))


def _clean(st: Stage) -> list[str]:
    """Remove this test's containers and snapshots; what had to be removed by force is a leak."""
    leaks: list[str] = []
    for h in st.hosts:
        for name in h.catalog():
            r = h.run("rm", "-f", name, timeout=90)
            if r.rc != 0:
                leaks.append(f"`migrate rm -f {name}` failed: {r.err.strip()}")
        for snap in h.catalog("snapshots"):
            r = h.run("snapshot", "rm", snap)
            if r.rc != 0:
                leaks.append(f"`migrate snapshot rm {snap}` failed: {r.err.strip()}")
    for h in st.hosts:
        try:  # an agent or a shim may take a moment to exit after the last command
            wait_until(lambda h=h: not h._procs_of_root(), 10, f"the processes of {h.root} to exit")
        except AssertionError:
            pass
        leaks += h._kill_leftovers()
        for point in linux.mounts_under(str(h.root)):
            leaks.append(f"mount left behind: {point}")
            linux.umount(point, linux.MNT_DETACH)
    if st.cluster is not None:
        leaks += kill_in_cgroups(st.cluster.cgroups_seen)
        try:
            assert_no_migration_leftovers(*st.hosts)
        except AssertionError as e:
            leaks.append(str(e))
    return leaks


# ---------------------------------------------------------------------------------------------
# small helpers for the workloads' logs


def numbers(text: str) -> list[int]:
    """The counter values in a log: complete lines that are just a number."""
    return [int(x) for x in re.findall(r"^(\d+)\n", text, re.MULTILINE)]


def wait_numbers(h: MigrateHost, name: str, at_least: int, timeout: float) -> tuple[list[int], str]:
    """Wait until the counter in NAME's log reached at_least; returns the numbers and the log."""
    text = h.wait_log(name, lambda t: (n := numbers(t)) != [] and n[-1] >= at_least, timeout,
                      f"{name}'s counter to reach {at_least}")
    return numbers(text), text


def exec_python(h: MigrateHost, name: str, code: str, *args: str) -> str:
    """Run Python code inside the container NAME on host h (`migrate exec`); returns its stdout."""
    return h.ok("exec", name, "python3", "-c", code, *args).out


# ---------------------------------------------------------------------------------------------
# 1: python3 -m http.server


FETCH = r"""
import hashlib, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    data = r.read()
print(r.status, len(data), hashlib.sha256(data).hexdigest())
"""


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_http_server_serves_the_same_file(stage):
    port = stage.port()
    size = 256 << 10
    stage.start("web", "sh", "-c", f"mkdir -p /srv/www && head -c {size} /dev/urandom > /srv/www/blob && "
                f"exec python3 -u -m http.server {port} --bind 127.0.0.1 --directory /srv/www")
    stage.src.wait_log("web", lambda t: "Serving HTTP on 127.0.0.1" in t, START_TIMEOUT, "the server to listen")
    url = f"http://127.0.0.1:{port}/blob"
    status, length, before = stage.src.host_python(FETCH, url).split()
    assert (status, int(length)) == ("200", size)
    stage.src.wait_connections_closed(port)

    stage.carry("web")

    status, length, after = stage.dst.host_python(FETCH, url).split()
    assert (status, int(length)) == ("200", size)
    assert after == before, "the file served after the restore differs from the one before"
    # the same server process answered both: it started once and logged both requests
    text = stage.dst.wait_log("web", lambda t: t.count('"GET /blob HTTP/1.1" 200') == 2, 10,
                              "the second request in the server's log")
    assert text.count("Serving HTTP on") == 1, text[-1000:]


# ---------------------------------------------------------------------------------------------
# 2: redis-server


RESP = r"""
import json, socket, sys

def encode(args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out

def reply(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise EOFError(f"short reply {line!r}")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return {"error": rest.decode()}
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [reply(f) for _ in range(n)]
    raise ValueError(f"unknown reply {line!r}")

s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
f = s.makefile("rb")
out = []
for command in json.loads(sys.argv[2]):
    s.sendall(encode(command))
    out.append(reply(f))
f.close()
s.close()
print(json.dumps(out))
"""


def redis(h: MigrateHost, port: int, *commands: list[str]) -> list:
    return json.loads(h.host_python(RESP, port, json.dumps(commands)))


def run_id(info: str) -> str:
    m = re.search(r"^run_id:([0-9a-f]{40})\r?$", info, re.MULTILINE)
    assert m, info
    return m.group(1)


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_redis_keeps_its_keys_and_its_run_id(stage):
    port = stage.port()
    stage.start("redis", "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no")
    stage.src.wait_log("redis", lambda t: "Ready to accept connections" in t, START_TIMEOUT, "redis to be ready")
    keys = {f"key:{i}": f"value {i} " + "x" * i for i in range(50)}
    replies = redis(stage.src, port, *(["SET", k, v] for k, v in keys.items()), ["INFO", "server"])
    assert replies[:-1] == ["OK"] * len(keys), replies
    before = run_id(replies[-1])
    stage.src.wait_connections_closed(port)

    stage.carry("redis")

    replies = redis(stage.dst, port, ["MGET", *keys], ["DBSIZE"], ["INFO", "server"])
    assert replies[0] == list(keys.values())
    assert replies[1] == len(keys)
    assert run_id(replies[2]) == before, "another redis process answers: its run_id changed"


# ---------------------------------------------------------------------------------------------
# 3: a SQLite writer in the container's own filesystem


SQLITE_WRITER = r"""
import sqlite3, sys, time
db = sqlite3.connect("/data.db", isolation_level=None, timeout=10)
db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, at REAL NOT NULL)")
n = 0
while True:
    n += 1
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (n, time.time()))
        db.execute("COMMIT")
    except sqlite3.Error as e:
        print(f"sqlite error at {n}: {e} ({getattr(e, 'sqlite_errorname', '?')})", flush=True)
        sys.exit(3)
    print(n, flush=True)
    time.sleep(0.05)
"""

SQLITE_CHECK = r"""
import json, sqlite3
db = sqlite3.connect("/data.db", timeout=10)
print(json.dumps([db.execute("PRAGMA integrity_check").fetchone()[0],
                  *db.execute("SELECT count(*), min(n), max(n) FROM t").fetchone()]))
"""


def assert_writer_goes_on(h: MigrateHost, before: list[int]) -> None:
    """The same writer goes on past `before` on h, and the database is whole."""
    target = before[-1] + 20
    try:
        after, text = wait_numbers(h, "db", target, AFTER_TIMEOUT)
    except AssertionError:
        text = h.logs("db")
        died = re.findall(r"^sqlite error.*$", text, re.MULTILINE)
        raise AssertionError(f"the writer did not go on past {before[-1]} (state {h.container('db')['state']}): "
                             f"{died or text[-300:]}") from None
    assert_consecutive(after)  # the same writer: no restart from 1, no gap
    assert not re.search(r"sqlite error|readonly database|SQLITE_READONLY", text), text[-500:]
    assert h.container("db")["state"] == "running"
    integrity, count, low, high = json.loads(exec_python(h, "db", SQLITE_CHECK))
    assert integrity == "ok"
    assert (count, low) == (high, 1), "rows are missing from the table"
    assert high >= after[-1]


@pytest.mark.parametrize("stage", ["restore"], indirect=True)
def test_sqlite_writer_goes_on_after_checkpoint_and_restore(stage):
    """The restore reuses the container's own upper dir: the database keeps its inode number."""
    stage.start("db", "python3", "-u", "-c", SQLITE_WRITER)
    before, _ = wait_numbers(stage.src, "db", 10, START_TIMEOUT)
    stage.carry("db")
    assert_writer_goes_on(stage.dst, before)


@pytest.mark.parametrize("stage", ["lazy", "copy"], indirect=True)
def test_sqlite_writer_is_not_moved_into_a_readonly_database(stage):
    """A move creates the files anew (new inode numbers) and SQLite would refuse every write
    there (SQLITE_READONLY_DBMOVED; docs/filesystem-identity.md): preflight refuses instead,
    naming the database, and the writer goes on where it is, unharmed."""
    stage.start("db", "python3", "-u", "-c", SQLITE_WRITER)
    before, _ = wait_numbers(stage.src, "db", 10, START_TIMEOUT)
    pid = stage.src.container("db")["pid"]
    r = stage.cluster.move("host-a", "db", "host-b", mode=stage.kind)
    assert r.rc == 8 and "/data.db" in r.err and "SQLITE_READONLY_DBMOVED" in r.err, str(r)
    assert len(r.err.strip().splitlines()) == 1, str(r)
    assert "db" not in stage.dst.ps()
    assert stage.src.container("db")["pid"] == pid
    assert_writer_goes_on(stage.src, before)


# ---------------------------------------------------------------------------------------------
# 4: an inotify watch on a file of the container's root filesystem


INOTIFY_WATCHER = r"""
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
os.makedirs("/watched", exist_ok=True)
open("/watched/file", "a").close()
fd = libc.inotify_init1(0)
if fd < 0:
    raise OSError(ctypes.get_errno(), "inotify_init1")
wd = libc.inotify_add_watch(fd, b"/watched/file", IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE)
if wd < 0:
    raise OSError(ctypes.get_errno(), "inotify_add_watch")
print("watching /watched/file", flush=True)
n = 0
while True:
    buf = os.read(fd, 65536)
    off = 0
    while off < len(buf):
        wd_, mask, cookie, length = struct.unpack_from("iIII", buf, off)
        off += 16 + length
        n += 1
        print(f"event {n} mask={mask:#x}", flush=True)
"""
EVENT = re.compile(r"^event (\d+) mask=(0x[0-9a-f]+)$", re.MULTILINE)


def events(text: str) -> list[tuple[int, int]]:
    return [(int(n), int(mask, 16)) for n, mask in EVENT.findall(text)]


def write_and_wait_for_modify(h: MigrateHost, name: str, line: str, seen: int) -> list[tuple[int, int]]:
    """Append a line to the watched file from inside the container; wait for an IN_MODIFY event
    numbered after `seen`."""
    h.ok("exec", name, "sh", "-c", f"echo {shlex.quote(line)} >> /watched/file")
    text = h.wait_log(name, lambda t: any(n > seen and mask & 0x2 for n, mask in events(t)), 15,
                      f"an IN_MODIFY event after event {seen}")
    return events(text)


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_inotify_watch_reports_writes_after_the_move(stage):
    stage.start("watch", "python3", "-u", "-c", INOTIFY_WATCHER)
    stage.src.wait_log("watch", lambda t: "watching" in t, START_TIMEOUT, "the watch to be set")
    seen = write_and_wait_for_modify(stage.src, "watch", "before", 0)

    stage.carry("watch")

    got = write_and_wait_for_modify(stage.dst, "watch", "after", seen[-1][0])
    assert [n for n, _ in got] == list(range(1, len(got) + 1)), got  # the same watcher counts on
    text = stage.dst.logs("watch")
    assert text.count("watching") == 1, text[-500:]
    assert stage.dst.ok("exec", "watch", "cat", "/watched/file").out == "before\nafter\n"


# ---------------------------------------------------------------------------------------------
# 5: a process tree talking over a loopback TCP connection


PING_PONG = r"""
import os, socket, sys, time
port = int(sys.argv[1])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(1)

def serve(sock, first):
    # each side prints the number it received, then answers with the next one
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")
    if first is not None:
        sock.sendall(b"%d\n" % first)
    while True:
        line = f.readline()
        if not line:
            print(f"{os.getpid()}: connection closed", flush=True)
            sys.exit(3)
        n = int(line)
        print(n, flush=True)
        time.sleep(0.05)
        sock.sendall(b"%d\n" % (n + 1))

if os.fork() == 0:
    listener.close()
    serve(socket.create_connection(("127.0.0.1", port)), 1)
conn, _ = listener.accept()
serve(conn, None)
"""


def python_pids(h: MigrateHost, name: str) -> list[int]:
    """PIDs (in the container's pid namespace) of its python processes."""
    out = h.ok("exec", name, "ps", "-eo", "pid=,comm=").out
    return sorted(int(pid) for pid, comm in (ln.split(None, 1) for ln in out.splitlines() if ln.strip())
                  if comm.startswith("python"))


@pytest.mark.parametrize("stage", STAGES, indirect=True)
def test_process_tree_keeps_its_loopback_connection(stage):
    port = stage.port()
    stage.start("pair", "python3", "-u", "-c", PING_PONG, str(port))
    before, _ = wait_numbers(stage.src, "pair", 10, START_TIMEOUT)
    pids = python_pids(stage.src, "pair")
    assert len(pids) == 2, pids

    stage.carry("pair")

    after, text = wait_numbers(stage.dst, "pair", before[-1] + 20, AFTER_TIMEOUT)
    assert_consecutive(after)  # both ends go on, over the same connection, without a restart
    assert "connection closed" not in text, text[-500:]
    assert python_pids(stage.dst, "pair") == pids
