"""On real separate machines (two Debian 12 guests: systemd, pure cgroup v2, kernel 6.1), as a
lab user has them: setup picks Debian's own CRIU; a container's cgroup is a scope of the tool's
own slice with its limits; it outlives the SSH session that started it; a killed shim is not
`running`; checkpoint, restore and moves back and forth keep the counter going and leave no
cgroup behind."""

import json
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
        # and the pages by a direct TCP connection over the guests' LAN, CRIU 3.17 at both ends
        hops = [(a, b, "copy", ()), (b, a, "lazy", ()), (a, b, "precopy", ()), (b, a, "auto", ()),
                (a, b, "lazy", ("--direct",)), (b, a, "precopy", ("--direct",))]
        for src, dst, mode, extra in hops:
            r = src.migrate("t4", dst.name, "--mode", mode, *extra, timeout=600)
            assert r.returncode == 0, f"{src.name} -> {dst.name} ({mode}): {r.stdout}{r.stderr}"
            if extra:
                assert "plain TCP, unencrypted" in r.stdout + r.stderr, r
                assert "no direct page connection" not in r.stdout + r.stderr, r
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


def test_moves_between_hosts_on_different_criu_versions(guests):
    """host-a on Debian sid's CRIU 4.2 (setup --criu sid), host-b on Debian 12's 3.17: the move
    up to the newer CRIU works (auto takes copy: their page servers cannot talk across 4.2), the
    move down is refused before anything is frozen, saying why."""
    a, b = guests["host-a"], guests["host-b"]
    out = a.ok("cd /root/migrate && PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheels ./scripts/setup --criu sid",
               timeout=1500)
    try:
        assert re.search(r"^criu 4\.2\S* at /usr/local/sbin/criu \(private prefix /opt/migrate/criu-sid, Debian sid\)$",
                         out, re.M), out
        a.ok("scp -q /root/busybox.tar host-b:/root/busybox.tar")
        b.ok("migrate image import /root/busybox.tar")
        b.ok(f"migrate run --name t5 busybox:latest sh -c '{COUNTER}'")
        before = b.wait(lambda: len(n := numbers(b, "t5")) > 5 and n, 120, "t5 to count")
        # 3.17 -> 4.2: copy mode, chosen by auto and saying why
        r = b.migrate("t5", "host-a", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "cannot stream memory to each other (changed in 4.2)" in r.stdout + r.stderr, r
        before = assert_counts_on(a, "t5", before)
        assert_in_its_scope(a, "t5")
        assert_no_cgroup_of(b, "t5")
        # 4.2 -> 3.17: refused at preflight, nothing changed: it counts on where it was
        for mode in ("auto", "copy"):
            r = a.migrate("t5", "host-b", "--mode", mode, timeout=600)
            assert r.returncode != 0 and "has CRIU 3.17" in r.stderr and "older than 4.2" in r.stderr, r
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert a.ps()["t5"]["state"] == "running" and "t5" not in b.ps()
        assert_counts_on(a, "t5", before)
    finally:
        for guest in (a, b):
            guest.sh("migrate rm -f t5")
        # back to what setup chooses by itself (Debian's own), for whatever runs next on host-a
        back = a.ok("cd /root/migrate && ./scripts/setup --criu auto", timeout=1500)
    assert re.search(r"^criu 3\.17\S* at /usr/sbin/criu \(Debian package criu ", back, re.M), back


def test_scheduled_snapshots_and_the_boot_unit_bring_back_a_killed_job(guests):
    """Snapshots every 2 s taken by the shim in its scope; everything of the job killed at
    once (`systemctl kill` of its scope, as a crash would); the shipped unit
    migrate-restore.service brings it back, in a scope of its own, from the newest snapshot."""
    a = guests["host-a"]
    a.ok("install -m 644 /root/migrate/systemd/migrate-restore.service /etc/systemd/system/ && "
         "systemctl daemon-reload && systemctl enable migrate-restore.service")
    a.ok(f"migrate run --name t6 --checkpoint-every 2s busybox:latest sh -c '{COUNTER}'")
    try:
        a.wait(lambda: sum(s["scheduled"] for s in json.loads(a.ok("migrate snapshots t6 --json"))) >= 2, 300,
               "two scheduled snapshots of t6")
        a.ok("systemctl kill -s KILL migrate-t6.scope")
        a.wait(lambda: a.ps()["t6"]["state"] == "lost", 60, "t6 to be lost")
        last = numbers(a, "t6")[-1]
        a.ok("systemctl start migrate-restore.service", timeout=600)
        assert a.ps()["t6"]["state"] in ("running", "checkpointing")  # (its schedule goes on at once)
        assert_in_its_scope(a, "t6")

        def counting_again():  # the numbers up to the kill, then again from the snapshot's on
            n = numbers(a, "t6")
            drop = next((i for i in range(1, len(n)) if n[i] <= n[i - 1]), None)
            return drop is not None and len(n) - drop >= 5 and (n, drop)

        nums, drop = a.wait(counting_again, 120, "t6 to count again")
        assert nums[drop - 1] == last and 1 < nums[drop] <= last, nums[drop - 3:drop + 3]
        assert nums[drop:] == list(range(nums[drop], nums[drop] + len(nums) - drop))
        assert "t6 running" in a.ok("journalctl -u migrate-restore.service --no-pager -o cat")
    finally:
        a.sh("migrate rm -f t6; systemctl disable migrate-restore.service; rm -f /etc/systemd/system/migrate-restore.service")
