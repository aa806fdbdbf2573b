"""CRIU through its RPC (`criu swrk`), with a loop for notify messages.

pycriu only sends one request and reads one answer; we need the notifications (post-dump,
while the tree is still frozen, is where the upper dir is captured), so this module speaks
the protobuf messages from `pycriu.rpc_pb2` over the swrk socket itself. Option building is
pure (dataclass -> criu_req), so it is unit-tested without CRIU.
"""

import contextlib
import functools
import os
import re
import select
import signal
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import criukdat, procfs
from .errors import CriuError

MAX_MESSAGE = 1 << 20
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _rpc():
    try:
        from pycriu import rpc_pb2
    except ImportError as e:
        raise CriuError(f"pycriu is not importable ({e}): run ./scripts/setup") from None
    return rpc_pb2


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'4.1.1' -> (4, 1, 1), for comparing CRIU versions (anything unreadable counts as 0)."""
    parts = []
    for piece in (version or "").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


NETWORK_LOCK_SKIP_SINCE = (3, 19)  # CRIU's RPC has network_lock SKIP from 3.19 on


@functools.cache
def binary_version(binary: str) -> tuple[int, ...]:
    """The version of the criu at BINARY (asked once per process)."""
    return version_tuple(Criu(binary).version())


def tcp_images(images_dir: Path) -> list[str]:
    """The TCP connections a dump holds (CRIU writes one tcp-stream image for each)."""
    return sorted(p.name for p in images_dir.glob("tcp-stream-*.img"))


def find_binary() -> str:
    """Absolute path of the criu to use: $MIGRATE_CRIU, else `criu` on PATH or in the sbin folders."""
    explicit = os.environ.get("MIGRATE_CRIU")
    found = explicit if explicit else shutil.which("criu", path=_SEARCH_PATH)
    if not found or not os.access(found, os.X_OK):
        raise CriuError("criu is not installed (or MIGRATE_CRIU is wrong): run ./scripts/setup")
    return os.path.abspath(found)


@dataclass(frozen=True)
class DumpOptions:
    pid: int
    leave_running: bool = False
    external: tuple[str, ...] = ()
    log_file: str = "dump.log"
    file_locks: bool = True
    tcp_established: bool = True  # connections between the container's own processes
    lazy_pages: bool = False
    # the page connection: a socket connected to the other host's CRIU (a page server there, or
    # in lazy mode its lazy-pages daemon); memory goes through it, not into the images
    page_socket: int | None = None
    # pre-copy: a pre-dump (memory only, the tree runs on), or a dump that sends only the pages
    # dirtied since the images in parent_images (relative to the images folder) were written
    pre_dump: bool = False
    parent_images: str | None = None
    log_level: int = 4
    # False: no nftables table (the container has no TCP connection to hold still while it is
    # dumped); creating and deleting one costs CRIU ~20 ms, and a lazy dump deletes it inside the pause
    network_lock: bool = True
    # inotify watches on overlay files: their file handles do not open, so CRIU finds the
    # watched paths by inode number in these folders of the container (only when needed;
    # "/" itself does not work: CRIU stats the path without its leading slash)
    irmap_scan_paths: tuple[str, ...] = ()
    # a tree the cgroup freezer holds: CRIU takes it through this freezer and leaves it as it found it
    freeze_cgroup: str | None = None


@dataclass(frozen=True)
class RestoreOptions:
    root: str
    external: tuple[str, ...] = ()
    inherit_fds: tuple[tuple[str, int], ...] = ()
    log_file: str = "restore.log"
    file_locks: bool = True
    tcp_established: bool = True
    tcp_close: bool = False  # connections restore closed: their peers are not where we are
    lazy_pages: bool = False
    log_level: int = 4
    network_lock: bool = True  # False: the images hold no TCP connection to unlock (~10 ms of nftables)


def _request(kind: str, opts: DumpOptions | RestoreOptions, images_fd: int):
    """What dumps and restores share: images, log, locks, notifications, external resources."""
    rpc = _rpc()
    req = rpc.criu_req(type=getattr(rpc, kind))
    o = req.opts
    o.images_dir_fd = images_fd
    o.log_file = opts.log_file
    o.log_level = opts.log_level
    o.file_locks = opts.file_locks
    o.tcp_established = opts.tcp_established
    # the container shares its host's network: no netns to lock, and iptables may be absent
    o.network_lock = rpc.SKIP if not opts.network_lock and hasattr(rpc, "SKIP") else rpc.NFTABLES
    o.notify_scripts = True
    o.manage_cgroups_mode = rpc.IGNORE  # cgroups are ours: recreated with their limits before restore
    o.external.extend(opts.external)
    if opts.lazy_pages:
        o.lazy_pages = True
    return req


def dump_request(opts: DumpOptions, images_fd: int):
    # one pre-dump per swrk session (CRIU >= 3.17): PRE_DUMP would bind the session to a DUMP
    req = _request("SINGLE_PRE_DUMP" if opts.pre_dump else "DUMP", opts, images_fd)
    req.opts.pid = opts.pid
    if not opts.pre_dump:  # (a pre-dump keeps the default splice mode: VM_READ in CRIU 3.17
        req.opts.leave_running = opts.leave_running  # gave restored trees that segfault)
    if opts.pre_dump or opts.parent_images:
        req.opts.track_mem = True  # a final dump without it sends every page again
    if opts.parent_images:
        req.opts.parent_img = opts.parent_images
    # connections still in a listener's accept queue, owned by no process yet, are dropped:
    # their clients see a reset, as if the server had been a moment slower
    req.opts.tcp_skip_in_flight = True
    req.opts.irmap_scan_paths.extend(opts.irmap_scan_paths)
    if opts.page_socket is not None and not opts.lazy_pages:
        req.opts.ps.fd = opts.page_socket
    if opts.freeze_cgroup:
        req.opts.freeze_cgroup = opts.freeze_cgroup
    return req


def restore_request(opts: RestoreOptions, images_fd: int):
    req = _request("RESTORE", opts, images_fd)
    req.opts.root = opts.root
    req.opts.rst_sibling = True  # the restored init becomes our child, so we can reap it
    req.opts.tcp_close = opts.tcp_close
    for key, fd in opts.inherit_fds:
        req.opts.inherit_fd.add(key=key, fd=fd)
    return req


# error lines every CRIU run here logs, whatever happens (FACTS.md): never the cause of a failure
HARMLESS_ERRORS = ("rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",)


def log_errors(log_path: Path, count: int = 3) -> list[str]:
    """CRIU's own error lines, without the timestamp prefix: the first one (often the cause)
    and the last `count` (where it gave up), each once, without the harmless ones."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    errors = [re.sub(r"^\(\s*[\d.]+\)\s*", "", ln).strip() for ln in lines if "Error" in ln or "error" in ln]
    errors = [e for e in errors if not any(h in e for h in HARMLESS_ERRORS)]
    return list(dict.fromkeys(errors[:1] + errors[-count:]))


class _CriuGone(CriuError):
    """criu ended (crashed, or was never criu) without answering a request."""


@dataclass
class _Session:
    """One `criu swrk` process and its socket."""

    binary: str
    extra_fds: tuple[int, ...] = ()
    on_spawn: Callable[[int], None] | None = None
    proc: subprocess.Popen = field(init=False)
    sock: socket.socket = field(init=False)

    def __post_init__(self):
        criukdat.ensure(self.binary)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [self.binary, "swrk", str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *self.extra_fds),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError as e:
            ours.close()
            raise CriuError(f"cannot start {self.binary}: {e.strerror}") from None
        finally:
            theirs.close()
        self.sock = ours
        if self.on_spawn:
            self.on_spawn(self.proc.pid)

    def call(self, req, on_notify: Callable[[str, int], None] | None):
        rpc = _rpc()
        self._send(req)
        while True:
            data = self._recv()
            if not data:
                raise _CriuGone(f"CRIU ({self.binary}) {self._how_it_ended()} without answering")
            resp = rpc.criu_resp()
            resp.ParseFromString(data)
            if resp.type != rpc.NOTIFY:
                return resp
            try:
                if on_notify:
                    on_notify(resp.notify.script, resp.notify.pid)
            except BaseException:
                with contextlib.suppress(CriuError):  # the hook's own error is the one to report
                    self._send(rpc.criu_req(type=rpc.NOTIFY, notify_success=False))
                raise
            self._send(rpc.criu_req(type=rpc.NOTIFY, notify_success=True))

    def _send(self, req) -> None:
        try:
            self.sock.send(req.SerializeToString())
        except (BrokenPipeError, ConnectionResetError):  # criu died (or was never criu: MIGRATE_CRIU)
            raise _CriuGone(f"CRIU ({self.binary}) {self._how_it_ended()} without answering") from None

    def _how_it_ended(self, timeout: float = 5.0) -> str:
        """'was killed by SIGKILL' or 'exited with code N': a kill (the OOM killer of the
        container's memory cgroup, which CRIU restores from inside) reads differently from a crash."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "closed its socket"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(MAX_MESSAGE)
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _dump_stats(stats: Path):
    """A dump's or pre-dump's stats: its stats-dump image is two magics (service image, stats),
    a size and one stats_entry. Parsed here: pycriu's own reader (pb2dict) does not work with
    current protobuf."""
    from pycriu.images import stats_pb2

    data = stats.read_bytes()
    if len(data) < 12:
        raise CriuError(f"{stats} is not CRIU's stats image")
    service, magic, size = struct.unpack_from("<III", data)
    if (service, magic) != (0x55105940, 0x57093306):
        raise CriuError(f"{stats} is not CRIU's stats image")
    entry = stats_pb2.stats_entry()
    entry.ParseFromString(data[12:12 + size])
    return entry.dump


def pages_written(stats: Path) -> int:
    return _dump_stats(stats).pages_written


def frozen_seconds(stats: Path) -> float | None:
    """How long a (non-lazy) dump held the tree frozen, as CRIU measured it; None if unknown."""
    try:
        return _dump_stats(stats).frozen_time / 1e6
    except (OSError, CriuError, ImportError):
        return None


PAGES_STALL = 60.0  # seconds without a page arriving before a lazy transfer counts as failed


class _Daemon:
    """A criu that serves the other host (lazy-pages, page-server) on the page connection
    (`--ps-socket`, a socket already connected to the other host's CRIU): started with a status
    fd, on which it writes one zero byte once it is ready; its log in its images folder."""

    what = "criu"

    def __init__(self, argv: list[str], page_socket: int, log: Path, timeout: float = 30.0):
        criukdat.ensure(argv[0])
        status_r, status_w = os.pipe()
        self.log = log
        self.proc = subprocess.Popen(
            [*argv, "--ps-socket", str(page_socket), "-o", log.name, "-v4", "--status-fd", str(status_w)],
            pass_fds=(status_w, page_socket), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(status_w)
        try:
            ready = select.select([status_r], [], [], timeout)[0] and os.read(status_r, 1) == b"\0"
        finally:
            os.close(status_r)
        if not ready:
            self.kill()
            raise CriuError(f"{self.what} did not start: {'; '.join(log_errors(self.log)) or 'no answer'}",
                            log=self.log, op=self.what.split()[-1])

    def failure(self) -> str:
        return "; ".join(log_errors(self.log)) or f"exit status {self.proc.returncode}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class PageServer(_Daemon):
    """`criu page-server` on a pre-copy target: receives one round's pages (a pre-dump's, or the
    final dump's) into images_dir, which links to the round before (`parent`), so a restore
    from the last folder follows the chain. It serves one connection, then exits (0: all came)."""

    what = "criu page-server"

    def __init__(self, binary: str, images_dir: Path, page_socket: int, parent: str | None = None):
        argv = [binary, "page-server", "-D", str(images_dir), *(["--prev-images-dir", parent] if parent else [])]
        super().__init__(argv, page_socket, images_dir / "page-server.log")

    def wait(self, timeout: float) -> None:
        """Until the round's pages are all in (CriuError if it failed or took past TIMEOUT)."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CriuError(f"the page server did not finish within {timeout:.0f} s", log=self.log,
                            op="page-server") from None
        if status != 0:
            raise CriuError(f"the page server failed: {self.failure()}", log=self.log, op="page-server")


class LazyPagesDaemon(_Daemon):
    """`criu lazy-pages`: fills a lazily restored tree's memory from the source's page server.

    It must run before the restore (which hands it the userfaultfds) and reads the images, so
    they must be in place. Exit status 0 means every page arrived; anything else means the
    restored tree would read zeroes where pages are missing, so the caller must kill it.
    """

    what = "criu lazy-pages"

    def __init__(self, binary: str, images_dir: Path, page_socket: int):
        super().__init__([binary, "lazy-pages", "--page-server", "-D", str(images_dir)], page_socket,
                         images_dir / "lazy-pages.log")

    def wait(self, timeout: float, stall: float = PAGES_STALL) -> int:
        """Its exit status; it is killed when it makes no progress for `stall` seconds (its log,
        at -v4 a line per transfer, stops growing and it reads nothing: the page connection
        went silent, a cut nobody saw) or runs past `timeout`."""
        deadline = time.monotonic() + timeout
        mark, since = None, time.monotonic()
        while True:
            try:
                return self.proc.wait(min(0.5, max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            progress = (_size(self.log), procfs.bytes_read(self.proc.pid))
            if progress != mark:
                mark, since = progress, now
            elif now - since > stall:
                self.kill()
                raise CriuError(f"no memory page arrived for {stall:.0f} s: the lazy page transfer stalled",
                                log=self.log, op="lazy-pages")
            if now > deadline:
                self.kill()
                raise CriuError(f"the lazy page transfer did not finish within {timeout:.0f} s",
                                log=self.log, op="lazy-pages")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def network_lock_tables(dump_log_head: str, root_pid: int) -> tuple[str, ...]:
    """The names a dump's nftables lock table may have: CRIU 4.x names it after the dump's run
    id (`inet CRIU-<run id>`, cut to nftables' name length), 3.x after the dumped tree's PID."""
    # `criu swrk` logs its own run id first, then the dump's: the table is named after the last
    ids = re.findall(r"\) CRIU run id = ([0-9a-f-]+)", dump_log_head)
    return (("CRIU-" + ids[-1])[:_NFT_TABLE_NAME],) if ids else (f"CRIU-{root_pid}",)


_NFT_TABLE_NAME = 26  # CRIU prints "inet CRIU-..." into a 32-byte buffer


def release_network_lock(dump_log: Path, root_pid: int) -> None:
    """Drop the nftables table a final dump leaves behind. CRIU keeps it so that a restore of
    that very dump could resume connections to the outside, but the tree is gone, and kept
    tables would pile up with every checkpoint and move and drop the packets of the next
    connection with the same addresses (a restored copy's own): peers outside now get a reset
    at once instead of silence. A restore does not need it (it unlocks only what is there)."""
    try:
        with open(dump_log, errors="replace") as f:
            head = f.read(1 << 16)
    except OSError:
        head = ""
    if not shutil.which("nft"):
        return
    wanted = network_lock_tables(head, root_pid)
    listed = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        name = line.split()[-1] if line.startswith("table inet ") else ""
        if name in wanted:
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, timeout=30)


class Criu:
    def __init__(self, binary: str | None = None):
        self.binary = binary or find_binary()

    def dump(self, opts: DumpOptions, images_dir: Path, on_notify=None, on_spawn=None) -> None:
        """Checkpoint the tree at opts.pid; on_notify(script, pid) runs while CRIU waits (tree frozen)."""
        build = dump_request
        if opts.lazy_pages and opts.page_socket is not None:
            # CRIU's RPC takes a connected page socket (ps.fd) only for dumps that are not lazy;
            # an RPC config file reaches every option, --ps-socket too
            conf = images_dir / "page-socket.conf"
            conf.write_text(f"ps-socket {opts.page_socket}\n")

            def build(o, fd):
                req = dump_request(o, fd)
                req.opts.config_file = str(conf)
                return req
        self._run("dump", build, opts, images_dir, on_notify, on_spawn,
                  extra_fds=() if opts.page_socket is None else (opts.page_socket,))
        if not opts.leave_running:
            release_network_lock(images_dir / opts.log_file, opts.pid)

    def pre_dump(self, opts: DumpOptions, images_dir: Path) -> int:
        """One pre-copy round (opts.pre_dump): the pages dirtied since opts.parent_images go to
        the page connection (opts.page_socket) while the tree runs on. Returns how many it sent."""
        self._run("pre-dump", dump_request, opts, images_dir, None, extra_fds=(opts.page_socket,))
        return pages_written(images_dir / "stats-dump")

    def page_server(self, images_dir: Path, page_socket: int, parent: str | None = None) -> PageServer:
        return PageServer(self.binary, images_dir, page_socket, parent)

    def restore(self, opts: RestoreOptions, images_dir: Path, on_notify=None, on_spawn=None) -> int:
        """Restore; returns the host PID of the restored init, which is our child."""
        resp = self._run("restore", restore_request, opts, images_dir, on_notify, on_spawn,
                         extra_fds=tuple(fd for _, fd in opts.inherit_fds))
        return resp.restore.pid

    def _run(self, what, build, opts, images_dir: Path, on_notify, on_spawn=None, extra_fds=()):
        images_fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
        log = images_dir / opts.log_file
        earlier = _mtime(log)  # a snapshot restored before holds the log of that restore
        session = None
        try:
            session = _Session(self.binary, (images_fd, *extra_fds), on_spawn)
            resp = session.call(build(opts, images_fd), on_notify)
        except _CriuGone as e:
            if _mtime(log) in (None, earlier):  # it never got as far as logging: not criu at all
                raise
            detail = "; ".join(log_errors(log))
            raise CriuError(f"{e}{': ' + detail if detail else ''}", log=log, op=what) from None
        finally:
            if session:
                session.close()
            os.close(images_fd)
        if not resp.success:
            detail = "; ".join(log_errors(log)) or resp.cr_errmsg or f"errno {resp.cr_errno}"
            raise CriuError(f"CRIU {what} failed: {detail}", log=log, op=what)
        return resp

    def can_skip_network_lock(self) -> bool:
        return binary_version(self.binary) >= NETWORK_LOCK_SKIP_SINCE

    def lazy_pages(self, images_dir: Path, page_socket: int) -> LazyPagesDaemon:
        return LazyPagesDaemon(self.binary, images_dir, page_socket)

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"Version:\s*(\S+)", out)
        return m.group(1) if m else "unknown"

    def has_feature(self, feature: str) -> bool:
        p = subprocess.run([self.binary, "check", "--feature", feature], capture_output=True, timeout=60)
        return p.returncode == 0

    def check(self) -> tuple[bool, str]:
        """`criu check` as a subprocess (pycriu's check() is broken with 4.1.1)."""
        p = subprocess.run([self.binary, "check"], capture_output=True, text=True, timeout=60)
        text = (p.stdout + p.stderr).strip().splitlines()
        return p.returncode == 0, (text[-1] if text else "")
