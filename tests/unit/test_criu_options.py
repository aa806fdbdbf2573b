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


def test_dump_request_lazy_with_page_server():
    req = dump_request(DumpOptions(pid=1, lazy_pages=True, page_server=("127.0.0.1", 27000)), images_fd=3)
    assert req.opts.lazy_pages and req.opts.ps.address == "127.0.0.1" and req.opts.ps.port == 27000


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


def test_log_errors_quotes_the_last_error_lines(tmp_path: Path):
    log = tmp_path / "dump.log"
    log.write_text("(00.001) fine\n(00.002) Error (criu/a.c:1): first\n(00.003) x\n"
                   "(00.004) Error (criu/b.c:2): second\n(00.005) Error (criu/c.c:3): third\n"
                   "(00.006) Error (criu/d.c:4): fourth\n")
    assert log_errors(log) == ["Error (criu/b.c:2): second", "Error (criu/c.c:3): third",
                               "Error (criu/d.c:4): fourth"]
    assert log_errors(tmp_path / "missing.log") == []
