"""Option building for CRIU's RPC is pure: checked here without CRIU or root."""

from pathlib import Path

import pytest

pytest.importorskip("pycriu")
from pycriu import rpc_pb2 as rpc  # noqa: E402

from runtime.criu import DumpOptions, RestoreOptions, dump_request, log_errors, restore_request  # noqa: E402


def test_dump_request():
    req = dump_request(DumpOptions(pid=42, leave_running=True, external=("mnt[/data]:vol_data",)), images_fd=7)
    assert req.type == rpc.DUMP
    o = req.opts
    assert (o.images_dir_fd, o.pid, o.leave_running, o.notify_scripts) == (7, 42, True, True)
    assert list(o.external) == ["mnt[/data]:vol_data"]
    assert o.manage_cgroups_mode == rpc.IGNORE
    assert o.file_locks and not o.HasField("lazy_pages") and not o.HasField("ps")


def test_dump_request_gives_criu_the_page_connection():
    req = dump_request(DumpOptions(pid=1, page_socket=9), images_fd=3)
    assert req.opts.ps.fd == 9 and not req.opts.ps.HasField("port") and not req.opts.ps.address
    rpc.criu_req.FromString(req.SerializeToString())


def test_dump_request_lazy_leaves_the_page_connection_to_the_config_file():
    """cr-service reads ps.fd only for dumps that are not lazy (Criu.dump writes --ps-socket into
    an RPC config file instead): a lazy request must not carry a ps that would bind a port."""
    req = dump_request(DumpOptions(pid=1, lazy_pages=True, page_socket=9), images_fd=3)
    assert req.opts.lazy_pages and not req.opts.HasField("ps")


def test_restore_request():
    req = restore_request(RestoreOptions(root="/r", external=("mnt[vol_data]:/srv",),
                                         inherit_fds=(("pipe:[11]", 5), ("pipe:[12]", 6))), images_fd=4)
    assert req.type == rpc.RESTORE
    o = req.opts
    assert o.root == "/r" and o.rst_sibling and o.notify_scripts
    assert [(i.key, i.fd) for i in o.inherit_fd] == [("pipe:[11]", 5), ("pipe:[12]", 6)]
    assert list(o.external) == ["mnt[vol_data]:/srv"]
    # the request must serialize: every required field is set
    rpc.criu_req.FromString(req.SerializeToString())


def test_log_errors_quotes_the_first_and_the_last_error_lines(tmp_path: Path):
    log = tmp_path / "dump.log"
    log.write_text("(00.001) fine\n(00.002) Error (criu/a.c:1): first\n(00.003) x\n"
                   "(00.004) Error (criu/b.c:2): second\n(00.005) Error (criu/c.c:3): third\n"
                   "(00.006) Error (criu/d.c:4): fourth\n(00.007) Error (criu/e.c:5): fifth\n")
    # the first (usually the cause), then the last three (where CRIU gave up)
    assert log_errors(log) == ["Error (criu/a.c:1): first", "Error (criu/c.c:3): third",
                               "Error (criu/d.c:4): fourth", "Error (criu/e.c:5): fifth"]
    assert log_errors(tmp_path / "missing.log") == []


# how every CRIU run on these machines starts its log (FACTS.md): harmless, never the cause
RLIMIT = "(00.034094) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"


def test_log_errors_skips_the_harmless_rlimit_line(tmp_path: Path):
    log = tmp_path / "dump.log"
    log.write_text("(00.000001) Version: 4.1.1\n" + RLIMIT +
                   "(00.034941) Error (compel/src/lib/infect.c:418): Unable to detach from 999999: No such process\n"
                   "(00.034950) Error (criu/cr-dump.c:2111): Dumping FAILED.\n")
    assert log_errors(log) == ["Error (compel/src/lib/infect.c:418): Unable to detach from 999999: No such process",
                               "Error (criu/cr-dump.c:2111): Dumping FAILED."]
    log.write_text(RLIMIT + "(00.1) all is well\n")
    assert log_errors(log) == []


def test_log_errors_quotes_no_line_twice(tmp_path: Path):
    log = tmp_path / "restore.log"
    log.write_text(RLIMIT + "(00.1) Error (criu/a.c:1): only\n")
    assert log_errors(log) == ["Error (criu/a.c:1): only"]  # first and last at once
    log.write_text("(00.1) Error (criu/a.c:1): same\n(00.2) ok\n(00.3) Error (criu/a.c:1): same\n"
                   "(00.4) Error (criu/b.c:2): other\n")
    assert log_errors(log) == ["Error (criu/a.c:1): same", "Error (criu/b.c:2): other"]
    log.write_text("(00.1) Error (criu/a.c:1): one\n(00.2) Error (criu/b.c:2): two\n")
    assert log_errors(log) == ["Error (criu/a.c:1): one", "Error (criu/b.c:2): two"]
    log.write_text("(00.1) pie: 1: error: failed to open something\n")  # lower-case "error" counts too
    assert log_errors(log) == ["pie: 1: error: failed to open something"]


def test_dumps_and_restores_carry_connections_and_find_watched_files():
    o = dump_request(DumpOptions(pid=1, irmap_scan_paths=("/etc", "/srv")), images_fd=3).opts
    # connections between the container's own processes go into the images (both ends)
    assert o.tcp_established and o.tcp_skip_in_flight
    # the host's network is shared: lock with nftables (iptables may not exist)
    assert o.network_lock == rpc.NFTABLES
    assert list(o.irmap_scan_paths) == ["/etc", "/srv"]
    r = restore_request(RestoreOptions(root="/r"), images_fd=4).opts
    assert r.tcp_established and not r.tcp_close
    assert restore_request(RestoreOptions(root="/r", tcp_close=True), images_fd=4).opts.tcp_close


def test_the_network_lock_table_is_named_as_each_criu_names_it():
    from runtime.criu import network_lock_tables

    log4 = ("(00.000000) CRIU run id = 235c1d17-9b0e-4288-b9a8-65e4357aa3df\n(00.000010) swrk\n"
            "(00.000000) CRIU run id = b747e91b-d615-42b2-ab06-9b2c459df889\n")
    assert network_lock_tables(log4, 42) == ("CRIU-b747e91b-d615-42b2-ab",)  # 4.x: the dump's run id
    assert network_lock_tables("(00.000001) Lock network\n", 1125) == ("CRIU-1125",)  # 3.x: the tree's PID


def _daemon(tmp_path, argv):
    """A LazyPagesDaemon around a stand-in process (no CRIU): what wait() sees is real."""
    import subprocess

    from runtime.criu import LazyPagesDaemon

    d = object.__new__(LazyPagesDaemon)
    d.log = tmp_path / "lazy-pages.log"
    d.log.write_text("")
    d.proc = subprocess.Popen(argv)
    return d


def test_a_lazy_page_transfer_that_makes_no_progress_is_ended(tmp_path):
    import time

    from runtime.errors import CriuError

    d = _daemon(tmp_path, ["sleep", "30"])
    started = time.monotonic()
    with pytest.raises(CriuError, match="no memory page arrived for 1 s"):
        d.wait(timeout=60, stall=1.0)
    assert time.monotonic() - started < 5 and d.proc.poll() is not None  # killed


def test_a_lazy_page_transfer_that_progresses_runs_to_its_end(tmp_path):
    d = _daemon(tmp_path, ["sh", "-c", f"for i in 1 2 3 4 5 6; do echo page >> {tmp_path}/lazy-pages.log; "
                                       "sleep 0.4; done; exit 3"])
    assert d.wait(timeout=60, stall=1.0) == 3  # 2.4 s in all, never 1 s without a line


def test_the_pages_a_dump_wrote_are_read_from_its_stats_image(tmp_path: Path):
    import struct

    from pycriu.images import stats_pb2

    from runtime.criu import pages_written

    entry = stats_pb2.stats_entry()
    d = entry.dump
    d.freezing_time = d.frozen_time = d.memdump_time = d.memwrite_time = 1
    d.pages_scanned, d.pages_skipped_parent, d.pages_written, d.pages_lazy = 4113, 6, 4107, 0
    body = entry.SerializeToString()
    (tmp_path / "stats-dump").write_bytes(struct.pack("<III", 0x55105940, 0x57093306, len(body)) + body)
    assert pages_written(tmp_path / "stats-dump") == 4107
    (tmp_path / "other").write_bytes(struct.pack("<III", 1, 2, 0))
    with pytest.raises(Exception, match="not CRIU's stats image"):
        pages_written(tmp_path / "other")


def test_pre_copy_requests_track_memory_against_their_parent():
    pre = dump_request(DumpOptions(pid=9, pre_dump=True, parent_images="../pre-1", page_socket=6), images_fd=3)
    assert pre.type == rpc.SINGLE_PRE_DUMP and pre.opts.track_mem and pre.opts.parent_img == "../pre-1"
    assert pre.opts.ps.fd == 6 and not pre.opts.lazy_pages
    assert not pre.opts.HasField("pre_dump_mode")  # splice: VM_READ broke restores with CRIU 3.17
    final = dump_request(DumpOptions(pid=9, parent_images="../pre-2", page_socket=6), images_fd=3)
    assert final.type == rpc.DUMP and final.opts.track_mem and final.opts.parent_img == "../pre-2"
    plain = dump_request(DumpOptions(pid=9), images_fd=3)
    assert not plain.opts.track_mem and not plain.opts.HasField("parent_img")
