"""On real separate machines (two Debian 12 guests: systemd, pure cgroup v2, kernel 6.1), as a
lab user has them: setup picks Debian's own CRIU; a container's cgroup is a scope of the tool's
own slice with its limits; it outlives the SSH session that started it; a killed shim is not
`running`; checkpoint, restore and moves back and forth keep the counter going and leave no
cgroup behind."""

import re
import time

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3000)]  # the first test also boots and installs

COUNTER = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"
SCOPE = "0::/migrate.slice/migrate-{name}.scope/container"


def numbers(guest, name: str) -> list[int]:
    return [int(x) for x in guest.migrate("logs", name).stdout.split() if x.isdigit()]


def assert_counts_on(guest, name: str, before: list[int], more: int = 5) -> list[int]:
    """The counter runs there and continues BEFORE: no restart, no gap."""
    nums = guest.wait(lambda: (n := numbers(guest, name)) and len(n) >= len(before) + more and n, 120,
                      f"{name} to count on {guest.name}")
    assert nums[:len(before)] == before and nums == list(range(1, len(nums) + 1)), nums[-20:]
    return nums


def assert_in_its_scope(guest, name: str) -> None:
    rec = guest.record(name)
    assert rec["cgroups"] == {"unified": f"/sys/fs/cgroup/migrate.slice/migrate-{name}.scope/container"}
    assert guest.cgroup_of(rec["pid"]) == SCOPE.format(name=name)
    assert guest.cgroup_of(rec["shim_pid"]) == f"0::/migrate.slice/migrate-{name}.scope/shim"
    assert guest.ok(f"systemctl is-active migrate-{name}.scope").strip() == "active"


def assert_no_cgroup_of(guest, name: str) -> None:
    guest.wait(lambda: guest.sh(f"test -e /sys/fs/cgroup/migrate.slice/migrate-{name}.scope").returncode != 0,
               60, f"no cgroup of {name} left")


def test_setup_uses_debians_own_criu(guests):
    for guest in guests.values():
        line = next(ln for ln in guest.setup_output.splitlines() if ln.startswith("criu "))
        assert re.match(r"criu 3\.17\S* at /usr/sbin/criu \(Debian package criu ", line), line


def test_limits_apply_in_the_tools_own_scope_and_an_oom_kill_is_an_exit(guests):
    a = guests["host-a"]
    a.ok("migrate run --name t1 --memory 64m --cpus 0.5 --pids 64 busybox:latest sleep 1000")
    try:
        assert_in_its_scope(a, "t1")
        leaf = "/sys/fs/cgroup/migrate.slice/migrate-t1.scope/container"
        assert a.ok(f"cat {leaf}/memory.max {leaf}/cpu.max {leaf}/pids.max").split("\n")[:3] == \
            ["67108864", "50000 100000", "64"]
        assert int(a.ps()["t1"]["memory"]) > 0
    finally:
        a.ok("migrate rm -f t1")
    assert_no_cgroup_of(a, "t1")
    # one buffer of 200 MiB past a limit of 64 MiB: the kernel's OOM killer ends it (SIGKILL: 137)
    a.ok("migrate run --name t2 --memory 64m busybox:latest sh -c 'exec dd if=/dev/zero of=/dev/null bs=200M count=1'")
    try:
        row = a.wait(lambda: (r := a.ps()["t2"])["state"] == "exited" and r, 60, "t2 to be OOM-killed")
        assert row["exit_code"] == 137, row
        leaf = "/sys/fs/cgroup/migrate.slice/migrate-t2.scope/container"
        assert a.sh(f"test -e {leaf}").returncode != 0  # gone with it
    finally:
        a.ok("migrate rm -f t2")


def test_a_container_outlives_the_session_that_started_it_and_a_dead_shim_is_shown(guests):
    a = guests["host-a"]
    # one SSH login starts it and stays; another stops that login's session scope
    login = a.login(f"cut -d/ -f4 /proc/self/cgroup; migrate run --name t3 busybox:latest sh -c '{COUNTER}'"
                    "; sleep 600")
    try:
        scope = login.stdout.readline().strip()
        assert re.fullmatch(r"session-\d+\.scope", scope), scope
        assert login.stdout.readline().strip() == "t3"
        a.ok(f"systemctl stop {scope}")
        login.wait(timeout=60)
        before = a.wait(lambda: len(n := numbers(a, "t3")) > 5 and n, 60, "t3 to count")
        time.sleep(2)
        assert a.ps()["t3"]["state"] == "running"
        assert_counts_on(a, "t3", before)
        assert_in_its_scope(a, "t3")
        a.ok(f"kill -9 {a.record('t3')['shim_pid']}")
        a.wait(lambda: a.ps()["t3"]["state"] == "unsupervised", 30, "ps to say t3 has no shim")
        assert "running" not in a.ok("migrate ps")
        a.ok("migrate stop t3")  # killed by PID: nothing would record its exit
        assert a.ps()["t3"]["state"] == "lost"
    finally:
        if login.poll() is None:
            login.kill()
            login.wait()
        a.sh("migrate rm -f t3")
    assert_no_cgroup_of(a, "t3")


def test_checkpoint_restore_and_moves_back_and_forth(guests):
    a, b = guests["host-a"], guests["host-b"]
    a.ok(f"migrate run --name t4 --memory 64m busybox:latest sh -c '{COUNTER}'")
    try:
        before = a.wait(lambda: len(n := numbers(a, "t4")) > 5 and n, 60, "t4 to count")
        a.ok("migrate checkpoint t4")
        assert_no_cgroup_of(a, "t4")
        a.ok("migrate restore t4")
        before = assert_counts_on(a, "t4", before)
        assert_in_its_scope(a, "t4")
        hops = [(a, b, "copy"), (b, a, "lazy"), (a, b, "precopy"), (b, a, "auto")]
        for src, dst, mode in hops:
            r = src.migrate("t4", dst.name, "--mode", mode, timeout=600)
            assert r.returncode == 0, f"{src.name} -> {dst.name} ({mode}): {r.stdout}{r.stderr}"
            if mode in ("precopy", "auto"):
                assert "pre-copy: " in r.stdout + r.stderr and "round(s) of" in r.stdout + r.stderr, r
            if mode == "auto":
                assert "mode pre-copy: both hosts track dirtied memory" in r.stdout + r.stderr, r
            before = assert_counts_on(dst, "t4", before)
            assert_in_its_scope(dst, "t4")
            assert "t4" not in src.ps()
            assert_no_cgroup_of(src, "t4")
    finally:
        for guest in (a, b):
            guest.sh("migrate rm -f t4")
