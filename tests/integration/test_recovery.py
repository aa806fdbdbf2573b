"""When the process doing an operation dies, or a container's processes vanish, the records
still tell the truth: the next command settles them from the facts (runtime/reconcile.py).
Each case is made for real: SIGKILL of the shim, of `migrate checkpoint`, of `migrate NAME HOST`."""

import os
import signal
import subprocess
import time

import pytest
from clihost import COUNTER, IMAGE, _cli, assert_consecutive, counter_numbers, proc_gone, proc_identity, wait_until
from cluster import assert_counts_on, assert_no_migration_leftovers, set_host_env, start_counter

from runtime import linux

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def test_a_container_whose_shim_and_processes_were_killed_is_lost_not_running(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("c1", 3)
    rec = bb.record("c1")
    shim, init = proc_identity(rec["shim_pid"]), proc_identity(rec["pid"])
    os.kill(rec["shim_pid"], signal.SIGKILL)  # the shim first: nobody records the exit
    wait_until(lambda: proc_gone(shim), 10, "the shim to die")
    os.kill(rec["pid"], signal.SIGKILL)
    wait_until(lambda: proc_gone(init), 10, "init to die")
    r = bb.ok("ps")
    assert "lost" in r.out and "c1 was running, but its processes and its shim are gone" in r.err, str(r)
    ct = bb.container("c1")
    assert (ct["state"], ct["pid"]) == ("lost", None)
    bb.fails(4, "stop", "c1")
    bb.ok("rm", "c1")  # a lost container can be removed (or restored from a snapshot)
    assert "c1" not in bb.ps()


def test_a_container_whose_shim_died_is_shown_unsupervised_and_lost_once_its_processes_end(bb):
    """Its processes run on (a quiet one is never killed for it), but ps says that nothing logs
    its output or will record its exit; once they are gone it is lost, never running."""
    bb.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    rec = bb.record("c1")
    os.kill(rec["shim_pid"], signal.SIGKILL)
    wait_until(lambda: not linux.pid_running(rec["shim_pid"]), 10, "the shim to die")
    assert "unsupervised" in bb.ok("ps").out
    row = bb.container("c1")
    assert (row["state"], row["pid"]) == ("unsupervised", rec["pid"])
    os.kill(rec["pid"], signal.SIGKILL)
    wait_until(lambda: bb.container("c1")["state"] == "lost", 10, "c1 to be lost")
    bb.ok("rm", "c1")
    # and one whose shim died is stopped all the same (killed by PID), lost then
    bb.ok("run", "--name", "c2", IMAGE, "sleep", "1000")
    rec = bb.record("c2")
    os.kill(rec["shim_pid"], signal.SIGKILL)
    wait_until(lambda: not linux.pid_running(rec["shim_pid"]), 10, "the shim to die")
    bb.ok("stop", "c2")
    assert bb.container("c2")["state"] == "lost" and not linux.pid_running(rec["pid"])
    bb.ok("rm", "c2")


def test_a_killed_checkpoint_leaves_the_container_running_not_checkpointing(host, memhog_image):
    host.ok("image", "import", memhog_image)
    host.ok("run", "--name", "m1", "memhog:latest")
    host.wait_log("m1", lambda t: "sum " in t, 60, "memhog to fill its memory")
    pid = host.container("m1")["pid"]
    proc = subprocess.Popen([*_cli(), "checkpoint", "m1"], env=host.env, cwd=host.work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: host.record("m1")["state"] == "checkpointing", 30, "the checkpoint to begin", 0.01)
        time.sleep(0.2)  # inside CRIU's dump of 512 MiB
    finally:
        proc.kill()
        proc.wait()
    # CRIU notices its caller is gone, fails the dump and lets the tree go; until then the
    # record stays checkpointing (CRIU still holds the tree), never a wrong "running"
    wait_until(lambda: host.container("m1")["state"] == "running", 60, "the record to settle on running")
    assert host.container("m1")["pid"] == pid and not proc_gone(proc_identity(pid))
    os.kill(pid, signal.SIGUSR1)  # it still answers with the checksum of its memory
    host.wait_log("m1", lambda t: t.count("sum ") >= 2, 30, "memhog to answer")
    host.ok("stop", "m1")
    host.ok("rm", "m1")


def test_a_killed_migration_leaves_one_running_copy_and_no_stuck_record(two):
    a, b = two["host-a"], two["host-b"]
    before = start_counter(two)
    # a large upper dir keeps the migration in its running phase (layers, upper sync) for a while
    a.ok("exec", "c1", "sh", "-c", "dd if=/dev/urandom of=/big bs=1M count=300 2>/dev/null")
    proc = subprocess.Popen([*a.prefix, *_cli(), "c1", "host-b", "--mode", "copy"], env=a.env, cwd=a.work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: a.record("c1")["state"] == "migrating", 30, "the migration to begin", 0.01)
        time.sleep(0.3)
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: a.container("c1")["state"] == "running", 30, "the source record to settle on running")
    nums = a.wait_count("c1", len(counter_numbers(a.logs("c1"))) + 5)
    assert_consecutive(nums)
    assert nums[:len(before)] == before
    # the agent on host-b saw its connection end and undid its side: no second copy there
    wait_until(lambda: b.ps() == {}, 30, "host-b to have no copy")
    # and the container is fully usable again: it moves
    r = two.move("host-a", "c1", "host-b")
    assert r.rc == 0, str(r)
    assert b.container("c1")["state"] == "running" and "c1" not in a.ps()


@pytest.mark.parametrize("mode,fault", [
    ("copy", "commit:kill"),  # the agent dies when the commit arrives
    ("lazy", "commit:kill"),
    ("copy", "restored:kill-parent"),  # the agent dies while the shim restores: nobody reads its verdict
])
def test_a_target_copy_never_outlives_an_agent_that_died_before_the_commit(two, mode, fault):
    """The fence: the restored copy's shim holds the agent's go pipe and kills the copy when it
    ends before the commit byte, so the source (which CRIU resumes) is the only one that runs."""
    a, b = two["host-a"], two["host-b"]
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": fault})
    before = start_counter(two)
    pid = a.container("c1")["pid"]
    r = a.fails(8, "c1", "host-b", "--mode", mode)
    assert "host-b" in r.err and "keeps running here" in r.err, str(r)
    ct = a.container("c1")
    assert (ct["state"], ct["pid"]) == ("running", pid)
    nums = a.wait_count("c1", len(counter_numbers(a.logs("c1"))) + 5)
    assert_consecutive(nums) and nums[:len(before)] == before
    # on host-b: no record, no process, no mount of it; its fenced shim took it all down
    wait_until(lambda: b.ps() == {} and not b.state.container_dir("c1").exists(), 30, "the copy on host-b to go")
    wait_until(lambda: not b._procs_of_root(), 30, "every process of host-b's root to end")
    assert linux.mounts_under(str(b.root)) == []
    b.ps()  # the next command there sweeps what the dead agent left (its memory images)
    assert_no_migration_leftovers(a, b)


def test_a_controller_killed_while_criu_serves_pages_leaves_the_source_running(two):
    """The worst moment of a lazy migration: CRIU holds the source frozen and serves its pages,
    and the controller dies before the target connected. The agent ends its side; the next
    command here finds CRIU holding the tree for nobody, ends it, and the tree runs on."""
    a, b = two["host-a"], two["host-b"]
    before = start_counter(two)
    pid = a.container("c1")["pid"]
    r = a.run("c1", "host-b", "--mode", "lazy", env={"MIGRATE_FAULTS": "page-server-ready:kill"})
    assert r.rc == -signal.SIGKILL, str(r)
    # the tree is frozen by the orphaned CRIU until a command settles the record
    wait_until(lambda: a.container("c1")["state"] == "running", 30, "the source to run again")
    assert a.container("c1")["pid"] == pid
    nums = a.wait_count("c1", len(counter_numbers(a.logs("c1"))) + 5)
    assert_consecutive(nums) and nums[:len(before)] == before
    wait_until(lambda: b.ps() == {}, 30, "host-b to have no copy")
    assert_no_migration_leftovers(a, b)  # the images CRIU wrote here for it are gone too


def test_one_operation_at_a_time_and_a_dead_owners_lock_clears(two):
    """While a migration holds c1, every other operation on it is refused, naming what holds
    it; once that migration's process is gone, the next command frees c1 again."""
    a, b = two["host-a"], two["host-b"]
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": "target-preload:hang"})
    before = start_counter(two)
    proc = subprocess.Popen([*a.prefix, *_cli(), "c1", "host-b", "--mode", "copy"], env=a.env, cwd=a.work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: a.record("c1")["state"] == "migrating", 30, "the migration to begin")
        assert f"migrating (by pid {proc.pid})" in a.ok("ps").out
        for args in (("stop", "c1"), ("rm", "-f", "c1"), ("checkpoint", "c1"), ("c1", "host-b"),
                     ("exec", "c1", "true")):
            r = a.fails(4, *args)
            assert "c1: it is migrating" in r.err, str(r)
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: a.container("c1")["state"] == "running", 30, "the dead migration's hold to clear")
    nums = a.wait_count("c1", len(counter_numbers(a.logs("c1"))) + 3)
    assert_consecutive(nums) and nums[:len(before)] == before
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": ""})
    wait_until(lambda: not b._procs_of_root(), 30, "the agent that hung to end")
    a.ok("checkpoint", "--leave-running", "c1")  # free again
    assert_no_migration_leftovers(a, b)


def test_an_agent_that_goes_silent_is_given_up_within_the_heartbeat_limit(two):
    """The agent stops answering and beating while it restores (a stalled host): the controller
    gives it up after the heartbeat's silence, far sooner than the freeze deadline, and the
    source resumes once a new connection has decided the abort there."""
    a, b = two["host-a"], two["host-b"]
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": "target-restore:hang"})
    before = start_counter(two)
    pid = a.container("c1")["pid"]
    started = time.monotonic()
    r = a.fails(8, "c1", "host-b", "--mode", "copy", "--freeze-timeout", "300")
    assert time.monotonic() - started < 90, str(r)
    assert "no word from" in r.err and "keeps running here" in r.err, str(r)
    assert a.container("c1")["pid"] == pid
    assert_counts_on(two, "host-a", "c1", before)
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": ""})
    wait_until(lambda: not b._procs_of_root(), 30, "the agent that hung to end")
    assert b.ps() == {}
    assert_no_migration_leftovers(a, b)


def test_a_controller_that_goes_silent_is_given_up_by_the_agent(two):
    """The controller stops (and so stops beating) after the target preloaded: the agent gives
    it up after the heartbeat's silence and undoes everything there, while the controller still
    hangs; when it goes on, it finds the agent gone and keeps the container running here."""
    a, b = two["host-a"], two["host-b"]
    before = start_counter(two)
    pid = a.container("c1")["pid"]
    env = {**a.env, "MIGRATE_FAULTS": "source-checkpoint:hang"}
    proc = subprocess.Popen([*a.prefix, *_cli(), "c1", "host-b", "--mode", "copy"], env=env, cwd=a.work,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "c1" in b.ps(), 60, "host-b to preload c1")
        wait_until(lambda: b.ps() == {} and not b._procs_of_root(), 60, "host-b's agent to give up and undo")
        assert proc.poll() is None  # the controller still hangs
        _, err = proc.communicate(timeout=120)  # its stdin closed: it goes on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 8 and "keeps running here" in err, err
    assert a.container("c1")["pid"] == pid and a.container("c1")["state"] == "running"
    assert_counts_on(two, "host-a", "c1", before)
    assert b.ps() == {}
    assert_no_migration_leftovers(a, b)
