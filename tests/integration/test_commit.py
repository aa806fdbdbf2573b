"""The commit, where two copies could appear: the target decides once, in its journal, and the
source lets its copy go only when it knows that decision. Each case is made for real: the agent
or the controller SIGKILLed around the decision, an agent that stops answering, a target that
cannot be reached any more; then `migrate recover`."""

import os
import signal
import subprocess
import time

import pytest
from clihost import _cli, assert_consecutive, counter_numbers, wait_until
from cluster import assert_counts_on, assert_no_migration_leftovers, kill_in_cgroups, set_host_env, start_counter

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _frozen(node, name: str, seconds: float = 1.0) -> bool:
    """Its counter does not move: the processes are held."""
    before = counter_numbers(node.logs(name))
    time.sleep(seconds)
    return counter_numbers(node.logs(name)) == before


@pytest.mark.parametrize("mode", ["copy", "lazy"])
@pytest.mark.parametrize("fault", ["commit-decided:kill", "committed:kill"])
def test_an_agent_that_died_after_deciding_the_commit_leaves_the_target_copy(two, mode, fault):
    """The decision is the journal's: the fenced shim finds it when its agent's pipe ends, and
    the source, whose answer was lost, asks again on a new connection and lets go."""
    a, b = two["host-a"], two["host-b"]
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": fault})
    before = start_counter(two)
    r = two.move("host-a", "c1", "host-b", mode=mode)
    assert r.rc == 0, str(r)
    assert "c1" not in a.ps()
    assert_counts_on(two, "host-b", "c1", before)
    assert b.record("c1")["migration"] is None  # committed: no longer fenced, not abortable
    b.ps()  # the next command there sweeps what the dead agent left
    assert_no_migration_leftovers(a, b)


def test_a_commit_answer_that_never_comes_is_asked_for_again_and_an_undecided_one_aborts(two):
    """The agent stops answering before it decides: the source asks on a new connection, which
    decides `aborted` there and ends the target's copy, and only then resumes the source."""
    a, b = two["host-a"], two["host-b"]
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": "commit:hang"})
    before = start_counter(two)
    pid = a.container("c1")["pid"]
    r = a.fails(8, "c1", "host-b", "--mode", "copy")
    assert "aborted" in r.err and "keeps running here" in r.err, str(r)
    assert a.container("c1")["pid"] == pid
    assert_counts_on(two, "host-a", "c1", before)
    wait_until(lambda: b.ps() == {}, 30, "host-b to have no copy")
    wait_until(lambda: not b._procs_of_root(), 30, "the agent that hung to end")
    b.ps()
    assert_no_migration_leftovers(a, b)


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_a_controller_killed_after_asking_for_the_commit_leaves_one_copy(two, mode):
    """The controller dies as it sends the commit: CRIU lets the source go, but its cgroup holds
    it frozen; the next command here finds it in doubt, and `recover` asks host-b. Whether the
    commit left this host is a race (the SSH connection ends with the controller, and the line
    may still be in its pipe): host-b either committed and has it, or aborted and the source runs
    on; never both, never neither."""
    a, b = two["host-a"], two["host-b"]
    before = start_counter(two)
    r = a.run("c1", "host-b", "--mode", mode, env={"MIGRATE_FAULTS": "sent-commit:kill"})
    assert r.rc == -9, str(r)
    wait_until(lambda: a.container("c1")["state"] == "in-doubt", 30, "the source to be found in doubt")
    assert _frozen(a, "c1")  # never two running copies
    assert a.fails(4, "stop", "c1").err.count("migrate recover c1") == 1
    # host-b settles by itself: its agent lost its controller, so it aborts unless it committed
    def settled() -> bool:
        row = b.catalog().get("c1")
        return row is None or (row["state"] == "running" and row["migration"] is None)

    wait_until(settled, 60, "host-b to settle")
    committed = "c1" in b.catalog()
    r = a.ok("recover")
    if committed:
        assert "c1 runs on host-b (it committed): removed here" in r.out, str(r)
        assert "c1" not in a.ps()
    else:
        assert "host-b never committed c1: it runs here again" in r.out, str(r)
        assert a.container("c1")["state"] == "running" and not _frozen(a, "c1")
    nums = assert_counts_on(two, "host-b" if committed else "host-a", "c1", before)
    assert_consecutive(nums)
    assert a.ok("recover").out.strip() == "nothing to recover here"
    b.ps()
    assert_no_migration_leftovers(a, b)


def _track_ssh(netns: str) -> None:
    """Connection tracking on the host from now on: without it, the first packet seen of a
    connection made before a rule counts as `new`, and blocking new ones would cut it too."""
    rules = "table inet mgtest {\n chain input {\n type filter hook input priority -10;\n" \
            " ct state established accept\n }\n}\n"
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)


def _block_new_ssh(netns: str) -> None:
    """New SSH connections to the host go unanswered; the one already open stays."""
    subprocess.run(["ip", "netns", "exec", netns, "nft", "add", "rule", "inet", "mgtest", "input",
                    "tcp", "dport", "22", "ct", "state", "new", "drop"], check=True)


def _unblock_ssh(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "mgtest"], check=False)


def test_an_unreachable_target_leaves_the_source_held_until_recover(two):
    """The target committed and then nothing answers: the source cannot know, so it neither
    resumes nor ends its copy. It stays frozen, `in-doubt`; recover says it cannot ask while
    host-b is unreachable, and settles it once host-b answers again."""
    a, b = two["host-a"], two["host-b"]
    netns = two.hosts["host-b"].netns
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": "committed:hang"})
    before = start_counter(two)
    _track_ssh(netns)
    proc = subprocess.Popen([*a.prefix, *_cli(), "c1", "host-b", "--mode", "copy"], env=a.env, cwd=a.work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: b.ps().get("c1", {}).get("state") == "running" and b.record("c1")["migration"] is None,
                   60, "host-b to commit")
        _block_new_ssh(netns)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert proc.returncode == 9, err
        assert "held frozen here" in err and "migrate recover c1" in err, err
        assert a.container("c1")["state"] == "in-doubt" and _frozen(a, "c1")
        r = a.fails(9, "recover", "c1")
        assert "cannot ask host-b" in r.err and "stays frozen" in r.err, str(r)
    finally:
        _unblock_ssh(netns)
    r = a.ok("recover", "c1")
    assert "c1 runs on host-b (it committed): removed here" in r.out, str(r)
    assert "c1" not in a.ps()
    assert_counts_on(two, "host-b", "c1", before)
    b.ps()
    assert_no_migration_leftovers(a, b)


def test_recover_with_bad_input_says_so(two):
    a = two["host-a"]
    assert "no such container or unfinished migration: nope" in a.fails(3, "recover", "nope").err
    assert a.ok("recover").out.strip() == "nothing to recover here"



@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_a_source_host_restarted_while_in_doubt_keeps_its_dump_as_a_snapshot(two, mode):
    """The target's agent dies at the commit (so its copy is ended there: aborted) while host-b
    cannot be asked again: the source stays in doubt. Then the source "restarts": every process
    of the container and its shim is killed. Its only copy is the dump made of the frozen tree
    when the doubt began (the move's own dump streamed the memory to host-b): recover, once
    host-b answers, keeps it as a snapshot, and restore resumes the counter where it was
    frozen, with no restart."""
    a, b = two["host-a"], two["host-b"]
    netns = two.hosts["host-b"].netns
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": "commit:kill"})
    before = start_counter(two)
    _track_ssh(netns)
    env = {**a.env, "MIGRATE_FAULTS": "source-commit:hang"}
    proc = subprocess.Popen([*a.prefix, *_cli(), "c1", "host-b", "--mode", mode], env=env, cwd=a.work,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: b.ps().get("c1", {}).get("state") == "running", 60, "host-b to restore")
        _block_new_ssh(netns)
        _, err = proc.communicate(timeout=120)  # its stdin closed: it goes on and sends the commit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert proc.returncode == 9 and "held frozen here" in err, err
        rec = a.record("c1")
        assert a.container("c1")["state"] == "in-doubt"
        os.kill(rec["shim_pid"], signal.SIGKILL)  # as a restart would, with every process
        kill_in_cgroups(set(rec["cgroups"].values()))
    finally:
        _unblock_ssh(netns)
    wait_until(lambda: b.ps() == {}, 30, "host-b's fenced copy to be gone")
    r = a.ok("recover")
    assert "the checkpoint made for the move is kept as snapshot" in r.out and "migrate restore c1" in r.out, str(r)
    assert a.container("c1")["state"] == "checkpointed"
    a.ok("restore", "c1")
    nums = assert_counts_on(two, "host-a", "c1", before)
    assert_consecutive(nums)
    assert "c1" not in b.ps()
    assert_no_migration_leftovers(a, b)
