"""Checkpoint and restore on one host through the real `migrate` CLI and real CRIU."""

import os
import re
import signal
import struct
import time
from pathlib import Path

import pytest
from clihost import (
    COUNTER,
    IMAGE,
    assert_consecutive,
    checksums,
    counter_numbers,
    proc_gone,
    proc_identity,
    record_timing,
    wait_until,
)
from test_containers import _limit_files, assert_all_gone, assert_limits

from runtime import linux

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SNAPSHOT_ID = re.compile(r"[0-9a-f]{12}")


def checkpoint(host, *args: str) -> str:
    r = host.ok("checkpoint", *args)
    snap_id = r.out.strip()
    assert SNAPSHOT_ID.fullmatch(snap_id), str(r)
    return snap_id


def restore(host, *args: str) -> int:
    """Restore; returns the host PID of the restored init, checked against ps."""
    r = host.ok("restore", *args)
    m = re.fullmatch(r"(\S+) running \(pid (\d+)\)", r.out.strip())
    assert m, str(r)
    c = host.container(m.group(1))
    assert (c["state"], c["pid"]) == ("running", int(m.group(2)))
    assert not proc_gone(proc_identity(c["pid"]))
    return c["pid"]


def assert_log_frozen(host, name: str, pause: float = 0.4) -> str:
    """A checkpointed container writes nothing more."""
    first = host.logs(name)
    time.sleep(pause)
    assert host.logs(name) == first, f"{name}'s log still grows: it was not stopped"
    return first


def test_checkpoint_and_restore_continues_the_counter(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    pid = bb.container("c1")["pid"]
    init = proc_identity(pid)
    bb.wait_count("c1", 5)

    snap_id = checkpoint(bb, "c1")
    c = bb.container("c1")
    assert (c["state"], c["pid"]) == ("checkpointed", None)
    wait_until(lambda: proc_gone(init), 10, "the checkpointed init to be gone")
    before = counter_numbers(assert_log_frozen(bb, "c1"))
    assert_consecutive(before)
    assert len(before) >= 5

    snaps = bb.json("snapshots")
    assert [(s["id"], s["container"], s["tag"]) for s in snaps] == [(snap_id, "c1", None)]
    assert snaps[0]["size"] > 0 and snaps[0]["image"] == IMAGE and snaps[0]["criu_version"]
    assert [s["id"] for s in bb.json("snapshots", "c1")] == [snap_id]

    new_pid = restore(bb, "c1")
    assert new_pid != pid or proc_identity(new_pid) != init
    after = bb.wait_count("c1", len(before) + 10)
    assert_consecutive(after)  # no gap, no restart from 1: the very next number follows
    assert after[len(before)] == before[-1] + 1


def test_stdout_held_on_another_fd_at_the_checkpoint_comes_back_with_a_reader(bb):
    """A shell inside `{ ...; } > file` keeps its stdout pipe on another fd meanwhile: the restore
    must still give that pipe back joined to the log (not a pipe without reader: EPIPE)."""
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c",
          'i=0; while true; do i=$((i+1)); { echo $i; usleep 200000; } > /last; echo $i; done')
    bb.wait_count("c1", 3)
    checkpoint(bb, "c1")
    before = counter_numbers(assert_log_frozen(bb, "c1"))
    restore(bb, "c1")
    after = bb.wait_count("c1", before[-1] + 3)
    assert_consecutive(after)
    assert "Broken pipe" not in bb.logs("c1")


def test_leave_running_and_restore_a_copy_under_a_new_name(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    pid = bb.container("c1")["pid"]
    bb.wait_count("c1", 5)

    snap_id = checkpoint(bb, "--leave-running", "--tag", "t1", "c1")
    c = bb.container("c1")
    assert (c["state"], c["pid"]) == ("running", pid)
    at_dump = len(counter_numbers(bb.logs("c1")))
    bb.wait_count("c1", at_dump + 5)  # it keeps counting
    assert [(s["id"], s["tag"]) for s in bb.json("snapshots", "c1")] == [(snap_id, "t1")]
    # a tag names one snapshot of a container
    bb.fails(4, "checkpoint", "--leave-running", "--tag", "t1", "c1")

    snap_log = (bb.state.snapshot_dir(snap_id) / "container.log").read_text()
    snap_nums = counter_numbers(snap_log)
    assert_consecutive(snap_nums)
    assert len(snap_nums) >= 5

    pid2 = restore(bb, "--snapshot", "t1", "--name", "c2", "c1")
    assert pid2 != pid
    c2 = bb.wait_count("c2", len(snap_nums) + 10)
    assert bb.logs("c2").startswith(snap_log)  # the copy's log starts as the snapshot's did
    assert_consecutive(c2)  # and goes on with the next number
    assert c2[len(snap_nums)] == snap_nums[-1] + 1
    # the original never stopped, and both count on their own
    c1 = counter_numbers(bb.logs("c1"))
    assert_consecutive(c1)
    assert bb.container("c1")["pid"] == pid
    ps = bb.ps()
    assert {n: c["state"] for n, c in ps.items()} == {"c1": "running", "c2": "running"}
    assert bb.record("c1")["cgroups"] != bb.record("c2")["cgroups"]


def test_512_mib_survive_checkpoint_and_restore(host, memhog_image):
    host.ok("image", "import", memhog_image)
    host.ok("run", "--name", "big", "memhog")
    text = host.wait_log("big", lambda t: len(checksums(t)) == 1, 60, "the 512 MiB to be filled")
    original = checksums(text)[0]
    mem = host.container("big")["memory"]
    assert mem >= 512 << 20, f"the cgroup accounts only {mem} bytes"

    cp = host.ok("checkpoint", "big")
    snap_id = cp.out.strip()
    assert host.container("big")["state"] == "checkpointed"
    images = host.state.snapshot_dir(snap_id) / "images"
    pages = sum(f.stat().st_size for f in images.glob("pages-*.img"))
    assert pages >= 512 << 20, f"only {pages} bytes of pages dumped"
    # the images hold the process's memory: only root may reach them
    for folder in (host.state.snapshots, host.state.snapshot_dir(snap_id), images):
        st = folder.stat()
        assert (st.st_uid, st.st_mode & 0o077) == (0, 0), f"{folder} is mode {st.st_mode & 0o777:o}"

    rs = host.ok("restore", "big")
    pid = host.container("big")["pid"]
    os.kill(pid, signal.SIGUSR1)
    text = host.wait_log("big", lambda t: len(checksums(t)) == 2, 60, "the checksum after restore")
    assert checksums(text) == [original, original]
    assert host.container("big")["memory"] >= 512 << 20

    stats = _criu_stats(images)
    record_timing("512MiB", checkpoint_s=f"{cp.seconds:.2f}", restore_s=f"{rs.seconds:.2f}",
                  pages_mib=pages >> 20, **stats)


def _criu_stats(images: Path) -> dict[str, str]:
    """CRIU's own timings from stats-dump and stats-restore, in seconds (diagnostics only).

    Read with the protobuf class directly: pycriu's generic image loader does not work with
    the protobuf release installed here. The files are: two magic words, a size, the message."""
    out: dict[str, str] = {}
    try:
        from pycriu.images import stats_pb2
    except ImportError:
        return out
    for name, keys in (("stats-dump", ("freezing_time", "frozen_time", "memdump_time", "memwrite_time")),
                       ("stats-restore", ("forking_time", "restore_time"))):
        try:
            raw = (images / name).read_bytes()
            (size,) = struct.unpack("<I", raw[8:12])
            entry = stats_pb2.stats_entry()
            entry.ParseFromString(raw[12:12 + size])
        except Exception:  # noqa: BLE001 - diagnostics only
            continue
        section = entry.dump if name == "stats-dump" else entry.restore
        for k in keys:
            out[f"criu_{k}_s"] = f"{getattr(section, k) / 1e6:.3f}"
    return out


def test_volume_file_opened_before_the_checkpoint_keeps_growing(bb, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    out = vol / "out.txt"
    bb.ok("run", "--name", "c1", "-v", f"{vol}:/data", IMAGE, "sh", "-c",
          "exec 3>>/data/out.txt; i=0; while true; do i=$((i+1)); echo $i >&3; sleep 0.1; done")

    def count(at_least: int) -> list[int]:
        return wait_until(lambda: (n := counter_numbers(out.read_text()) if out.exists() else []) and
                          len(n) >= at_least and n, 20, f"out.txt to reach {at_least} lines", interval=0.1)

    count(5)
    checkpoint(bb, "c1")
    before = counter_numbers(out.read_text())
    time.sleep(0.4)
    assert counter_numbers(out.read_text()) == before, "out.txt still grows after the checkpoint"
    assert_consecutive(before)

    pid = restore(bb, "c1")
    after = count(len(before) + 10)
    assert_consecutive(after)
    # the restored shell still writes through its fd 3 to the same file
    assert os.readlink(f"/proc/{pid}/fd/3").endswith("/data/out.txt")


def test_files_in_the_upper_dir_survive_checkpoint_and_restore(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    bb.ok("exec", "c1", "sh", "-c", "echo hello > /tmp/marker && rm /etc/group")
    snap_id = checkpoint(bb, "c1")
    snap_upper = bb.state.snapshot_dir(snap_id) / "upper"
    assert (snap_upper / "tmp/marker").read_text() == "hello\n"
    restore(bb, "c1")
    r = bb.ok("exec", "c1", "cat", "/tmp/marker")
    assert r.out == "hello\n"
    assert bb.run("exec", "c1", "test", "-e", "/etc/group").rc == 1  # the whiteout came back too
    assert (bb.state.container_dir("c1") / "upper/tmp/marker").read_text() == "hello\n"
    # the restored init is again PID 1 of its own namespaces
    assert bb.ok("exec", "c1", "cat", "/proc/1/cmdline").out.split("\0")[0] == "sleep"


def test_limits_come_back_with_the_restored_container(bb):
    bb.ok("run", "--name", "c1", "--memory", "64m", "--cpus", "0.5", IMAGE, "sleep", "1000")
    checkpoint(bb, "c1")
    restore(bb, "c1")
    assert_limits(bb, "c1")


def test_a_job_near_its_memory_limit_restores_whole(bb, memhog_image):
    """CRIU restores from inside the container's cgroups, and its own memory (about 50 MB even
    for a shell) is not the container's: 64 MiB held under a 96 MiB limit comes back whole, its
    limit with it, instead of CRIU being OOM-killed half-way."""
    bb.ok("image", "import", memhog_image)
    bb.ok("run", "--name", "big", "--memory", "96m", "memhog", "/bin/memhog", "64")
    original = checksums(bb.wait_log("big", lambda t: len(checksums(t)) == 1, 60, "the 64 MiB to be filled"))[0]
    checkpoint(bb, "big")
    pid = restore(bb, "big")
    assert _limit_files(bb.record("big")["cgroups"])["memory"] == str(96 << 20)
    os.kill(pid, signal.SIGUSR1)
    text = bb.wait_log("big", lambda t: len(checksums(t)) == 2, 60, "the checksum after restore")
    assert checksums(text) == [original, original]
    assert bb.container("big")["state"] == "running"


def test_nothing_is_left_after_checkpoint_and_rm(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    rec = bb.record("c1")
    procs = [proc_identity(rec["pid"]), proc_identity(rec["shim_pid"])]
    checkpoint(bb, "c1")
    bb.ok("rm", "c1")
    assert_all_gone(bb, "c1", rec, procs)


def test_nothing_is_left_after_restore_and_rm_force(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    first = bb.record("c1")
    procs = [proc_identity(first["pid"]), proc_identity(first["shim_pid"])]
    checkpoint(bb, "c1")
    restore(bb, "c1")
    rec = bb.record("c1")
    procs += [proc_identity(rec["pid"]), proc_identity(rec["shim_pid"])]
    assert all(procs[2:])
    bb.wait_count("c1", 3)
    bb.ok("rm", "-f", "c1")
    assert_all_gone(bb, "c1", rec, procs)
    assert rec["cgroups"] == first["cgroups"]


# ---------------------------------------------------------------------------------------------
# failures leave evidence: the CRIU log of a failed dump or restore is kept, root-only


HARMLESS = "rlimit: Can't setup RLIMIT_NOFILE for self"  # in every CRIU log here (FACTS.md)
# A deleted file still open is dumped as a copy (a "ghost file") only up to CRIU's ghost limit
# (1 MiB): a shell holding one of 8 MiB cannot be dumped; CRIU resumes it.
GHOST_HOLDER = "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null; exec 3</big; rm /big; echo ready; sleep 1000"


def assert_root_only(*paths: Path) -> None:
    for p in paths:
        st = p.stat()
        assert (st.st_uid, st.st_mode & 0o077) == (0, 0), f"{p} is mode {st.st_mode & 0o777:o}"


def kept_criu_log(host, r, host_name: str | None = None) -> Path:
    """The CRIU log a one-line error names: kept in the state root's criu-logs, only root reads it."""
    where = f" on {host_name}" if host_name else ""
    m = re.search(rf"\(CRIU log{where}: (/\S+)\)", r.err)
    assert m, str(r)
    log = Path(m.group(1))
    assert log.parent == host.state.criu_logs and log.is_file(), f"{log} does not exist: {r}"
    assert_root_only(host.state.criu_logs, log)
    return log


def first_error(log: Path) -> str:
    """The first error line CRIU logged that is not the harmless one, without its timestamp."""
    for line in log.read_text().splitlines():
        if "Error" in line and HARMLESS not in line:
            return re.sub(r"^\(\s*[\d.]+\)\s*", "", line).strip()
    raise AssertionError(f"no error line in {log}")


def test_a_failed_dump_keeps_its_criu_log(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", GHOST_HOLDER)
    bb.wait_log("c1", lambda t: "ready" in t)
    pid = bb.container("c1")["pid"]
    r = bb.fails(3, "logs", "--criu", "c1")
    assert "no CRIU log" in r.err, str(r)

    r = bb.fails(6, "checkpoint", "c1")
    log = kept_criu_log(bb, r)
    assert re.fullmatch(r"c1-dump-\d{8}T\d{6}\.\d{6}Z\.log", log.name), log.name
    assert os.listdir(bb.state.criu_logs) == [log.name]
    assert "ghost" in r.err and first_error(log) in r.err and HARMLESS not in r.err, str(r)
    # the failed snapshot is gone; the container runs on
    assert bb.json("snapshots", "c1") == [] and os.listdir(bb.state.snapshots) == []
    c = bb.container("c1")
    assert (c["state"], c["pid"]) == ("running", pid) and not proc_gone(proc_identity(pid))

    assert bb.ok("logs", "--criu", "c1").out == log.read_text()
    bb.ok("rm", "-f", "c1")
    assert bb.ok("logs", "--criu", "c1").out == log.read_text()  # the log outlives the container
    bb.fails(2, "logs", "--criu", "-f", "c1")


def test_a_failed_restore_keeps_its_criu_log_and_quotes_the_first_error(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    images = bb.state.snapshot_dir(checkpoint(bb, "c1")) / "images"
    cores = list(images.glob("core-*.img"))
    assert cores
    for core in cores:  # damaged images: each task's registers and state are gone
        core.unlink()

    logs = []
    for _ in range(2):
        r = bb.fails(6, "restore", "c1")
        assert "CRIU restore failed" in r.err, str(r)
        log = kept_criu_log(bb, r)
        assert log.name.startswith("c1-restore-") and log not in logs
        assert first_error(log) in r.err and HARMLESS not in r.err, str(r)
        logs.append(log)
        assert bb.container("c1")["state"] == "checkpointed"
        assert linux.mounts_under(str(bb.root)) == []  # nothing half-restored
        assert bb.ok("logs", "--criu", "c1").out == log.read_text()  # the newest
    assert sorted(os.listdir(bb.state.criu_logs)) == sorted(p.name for p in logs)


# ---------------------------------------------------------------------------------------------
# STARTED is the container's first start


def test_started_stays_the_first_start_across_checkpoint_and_restore(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    started = bb.record("c1")["started"]
    assert started and bb.container("c1")["started"] == started
    checkpoint(bb, "c1")
    restore(bb, "c1")
    assert bb.record("c1")["started"] == started
    assert bb.container("c1")["started"] == started
    checkpoint(bb, "--leave-running", "c1")
    checkpoint(bb, "c1")
    restore(bb, "c1")
    assert bb.container("c1")["started"] == started
    # a copy under a new name is a container of its own: it started when it was restored
    restore(bb, "--name", "c2", "c1")
    assert bb.container("c2")["started"] > started


@pytest.mark.parametrize("fault,settles_as", [
    ("checkpoint-written", "running"),  # frozen, files copied, not published: gone, the tree runs on
    ("checkpoint-published", "running"),  # published in the freeze, then CRIU lets the tree go: kept
    ("checkpoint-dumped", "checkpointed"),  # the tree ended by CRIU, the row never written: adopted
])
def test_a_checkpoint_killed_anywhere_leaves_a_whole_snapshot_or_none(bb, fault, settles_as):
    """Once CRIU's dump is through, the snapshot is never lost: a checkpoint SIGKILLed after it
    published leaves a folder the next command adopts; one killed before leaves nothing."""
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("c1", 3)
    r = bb.run("checkpoint", "c1", env={"MIGRATE_FAULTS": f"{fault}:kill"})
    assert r.rc == -signal.SIGKILL, str(r)
    wait_until(lambda: bb.container("c1")["state"] == settles_as, 30, f"c1 to settle as {settles_as}")
    snaps = bb.json("snapshots", "c1")
    folders = sorted(p.name for p in bb.state.snapshots.iterdir()) if bb.state.snapshots.is_dir() else []
    if fault == "checkpoint-written":
        assert snaps == [] and folders == [], folders  # the unfinished folder is swept
        nums = bb.wait_count("c1", len(counter_numbers(bb.logs("c1"))) + 3)
        assert_consecutive(nums)
        bb.ok("stop", "c1")
        bb.ok("rm", "c1")
        return
    assert [s["id"] for s in snaps] == folders and len(folders) == 1, (snaps, folders)
    # the snapshot is whole: it restores (as a new container where c1 ran on past it)
    name = "c2" if settles_as == "running" else "c1"
    restore(bb, "c1", "--snapshot", snaps[0]["id"], *(["--name", name] if name != "c1" else []))
    nums = bb.wait_count(name, len(counter_numbers(bb.logs(name))) + 3)
    assert_consecutive(nums)
    for n in {"c1", name}:
        bb.ok("rm", "-f", n)
