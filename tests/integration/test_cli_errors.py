"""Bad input through the real CLI: one line on stderr, the documented exit code, nothing changed."""

import gzip
import io
import os
import shutil
import subprocess
import tarfile

import pytest
from clihost import COUNTER, IMAGE, _cli, proc_gone, proc_identity

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _with_c1(host):
    host.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    host.ok("checkpoint", "--leave-running", "c1")
    return host


@pytest.fixture
def c1(bb):
    """bb with a running counter c1 that has one snapshot (taken with --leave-running)."""
    return _with_c1(bb)


@pytest.fixture(scope="module")
def shared(module_host, busybox_archives):
    """Like c1, but one for the whole module: for the many checks that must change nothing."""
    module_host.import_busybox(busybox_archives["docker-archive"])
    return _with_c1(module_host)


def assert_unchanged(host, before: dict) -> None:
    after = host.snapshot_of_state()
    assert after == before


def assert_still_running(host, name: str, pid: int) -> None:
    c = host.record(name)  # the catalog itself: one CLI call less per check
    assert (c["state"], c["pid"]) == ("running", pid)
    assert not proc_gone(proc_identity(pid))


@pytest.mark.parametrize("argv", [
    ["logs", "nope"], ["logs", "-f", "nope"], ["stop", "nope"], ["rm", "nope"], ["rm", "-f", "nope"],
    ["exec", "nope", "true"], ["checkpoint", "nope"], ["restore", "nope"], ["snapshots", "nope"],
    ["snapshot", "rm", "0123456789ab"], ["restore", "--snapshot", "nosuchtag", "c1"],
    ["run", "--name", "c2", "nosuchimage:1"], ["run", "--name", "c2", "nosuchimage"], ["image", "rm", "nosuchimage"],
    ["image", "import", "/nonexistent/image.tar"], ["run", "--name", "c2", "-v", "/nonexistent:/data", IMAGE, "true"],
])
def test_unknown_things_are_not_found(shared, argv):
    before = shared.snapshot_of_state()
    r = shared.fails(3, *argv)
    assert any(w in r.err for w in ("no such", "no snapshot", "does not exist")), str(r)
    assert_unchanged(shared, before)


@pytest.mark.parametrize("argv", [
    ["run", "--name", "../x", IMAGE, "true"], ["run", "--name=-x", IMAGE, "true"], ["run", "--name", "-x", IMAGE],
    ["run", "--name", "a/b", IMAGE, "true"], ["run", "--name", "", IMAGE, "true"],
    ["run", "--name", "x" * 64, IMAGE, "true"],
    ["restore", "--name", "../x", "c1"], ["restore", "--name=-x", "c1"],
    ["checkpoint", "--tag", "../t", "c1"],
    ["run", "--name", "c2", "-v", "relative:/data", IMAGE, "true"],
    ["run", "--name", "c2", "-v", "/tmp:/data:rx", IMAGE, "true"],
    ["run", "--name", "c2", "-e", "NOEQUALS", IMAGE, "true"],
    ["run", "--name", "c2", "--cpus", "0", IMAGE, "true"],
    ["run", "--name", "c2", "--memory", "lots", IMAGE, "true"],
    ["run", "--name", "c2", "--cpus", "half", IMAGE, "true"],
    ["run", "--name", "c2", "-w", "relative", IMAGE, "true"],
    ["exec", "c1"],
])
def test_invalid_input_is_refused(shared, argv):
    pid = shared.record("c1")["pid"]
    before = shared.snapshot_of_state()
    shared.fails(2, *argv)
    assert_unchanged(shared, before)
    assert_still_running(shared, "c1", pid)


def test_conflicts_with_the_current_state(c1):
    pid = c1.container("c1")["pid"]
    before = c1.snapshot_of_state()
    assert "already exists" in c1.fails(4, "run", "--name", "c1", IMAGE, "true").err
    c1.fails(4, "restore", "c1")  # it runs
    c1.fails(4, "rm", "c1")  # it runs: needs -f
    c1.fails(4, "image", "rm", IMAGE)  # c1 uses it
    assert_unchanged(c1, before)
    assert_still_running(c1, "c1", pid)
    # the same against a checkpointed container
    c1.ok("checkpoint", "c1")
    before = c1.snapshot_of_state()
    for argv in (["stop", "c1"], ["exec", "c1", "true"], ["checkpoint", "c1"]):
        c1.fails(4, *argv)
    assert_unchanged(c1, before)


def test_a_command_missing_from_the_image_leaves_no_container(bb):
    before = bb.snapshot_of_state()
    r = bb.run("run", "--name", "c2", IMAGE, "/bin/does-not-exist", "arg")
    assert r.rc != 0, str(r)
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "/bin/does-not-exist" in lines[0] and "No such file" in lines[0], str(r)
    assert bb.ps() == {}
    assert_unchanged(bb, before)
    assert not any(os.path.exists(p) for p in bb.cgroup_parents())


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty-layout", "bad-index"])
def test_a_corrupt_image_is_refused(shared, busybox_archives, kind):
    path = shared.work / kind
    if kind == "garbage":
        path.write_bytes(b"this is not an image\n" * 100)
    elif kind == "truncated":
        data = busybox_archives["oci-archive"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty-layout":
        path.mkdir()
    else:
        shutil.copytree(busybox_archives["oci-layout"], path)  # plain files only
        (path / "index.json").write_text("{not json")
    before = shared.snapshot_of_state()
    shared.fails(5, "image", "import", path)
    assert_unchanged(shared, before)
    assert [i["name"] for i in shared.json("image", "ls")] == [IMAGE]


def test_a_tar_bomb_is_refused_within_its_bounds(shared):
    """A few hundred KiB of gzip holding a 64 MiB GNU long-name header: refused by the 1 MiB
    header bound, not read into memory; nothing is left in the store."""
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.addfile(tarfile.TarInfo("a" * (64 << 20)))
    path = shared.work / "bomb.tar.gz"
    path.write_bytes(gzip.compress(bomb.getvalue(), compresslevel=1))
    before = shared.snapshot_of_state()
    r = shared.fails(5, "image", "import", path)
    assert "a tar header is larger than" in r.err, str(r)
    assert_unchanged(shared, before)


def test_a_missing_criu_fails_the_checkpoint_and_the_container_keeps_running(c1):
    pid = c1.container("c1")["pid"]
    before = c1.snapshot_of_state()
    for criu in ("/nonexistent", "/bin/false"):
        r = c1.fails(6, "checkpoint", "c1", env={"MIGRATE_CRIU": criu})
        assert "CRIU" in r.err or "criu" in r.err
        assert_still_running(c1, "c1", pid)
        assert_unchanged(c1, before)
    # and it still works: it keeps counting, and a real checkpoint succeeds afterwards
    n = len(c1.logs("c1").splitlines())
    c1.wait_count("c1", n + 3)
    c1.ok("checkpoint", "c1")
    assert c1.container("c1")["state"] == "checkpointed"


def test_a_missing_criu_fails_the_restore_and_nothing_is_half_restored(c1):
    c1.ok("checkpoint", "c1")
    before = c1.snapshot_of_state()
    c1.fails(6, "restore", "c1", env={"MIGRATE_CRIU": "/nonexistent"})
    assert c1.container("c1")["state"] == "checkpointed"
    assert_unchanged(c1, before)
    before = c1.snapshot_of_state()
    c1.fails(6, "restore", "--name", "c2", "c1", env={"MIGRATE_CRIU": "/nonexistent"})
    assert "c2" not in c1.ps()
    assert_unchanged(c1, before)
    c1.ok("restore", "c1")
    assert c1.container("c1")["state"] == "running"


@pytest.mark.parametrize("argv", [["--help"], ["ps"], ["ps", "--json"], ["image", "ls"], ["snapshots", "c1"]])
def test_a_reader_that_stops_reading_ends_the_command_quietly(shared, argv):
    """`migrate ps | head`: once the reader is gone the command ends as a tool that SIGPIPE
    ended (141), with nothing on stderr and no internal error kept."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*_cli(), *argv], env=shared.env, cwd=shared.work, stdin=subprocess.DEVNULL,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")
    assert not (shared.root / "internal-errors.log").exists()
