"""Container lifecycle through the real `migrate` CLI: images, run, ps, logs, exec, stop, rm, limits."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from clihost import COUNTER, IMAGE, _cli, proc_gone, proc_identity, wait_until

from runtime import linux
from runtime.cgroups import Cgroups
from runtime.layers import LayerStore

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SLEEPER = ["sh", "-c", "trap 'exit 7' TERM; echo started; echo oops >&2; while true; do sleep 0.1; done"]


def test_import_every_format_and_image_rm_waits_for_its_containers(host, busybox_archives):
    names = {"docker-archive": "bb-docker:1", "oci-archive": "bb-oci:1", "oci-layout": "bb-layout:1"}
    for fmt, name in names.items():
        r = host.ok("image", "import", busybox_archives[fmt], "--name", name)
        assert name in r.out
    listed = {i["name"]: i for i in host.json("image", "ls")}
    assert set(listed) == set(names.values())
    # the same content in every format: one config, one layer, stored once
    assert len({i["id"] for i in listed.values()}) == 1
    assert all(len(i["layers"]) == 1 and i["size"] > 0 for i in listed.values())
    store = LayerStore(host.state.layers)
    assert store.digests() == listed["bb-oci:1"]["layers"]

    host.ok("run", "--name", "c1", "bb-oci:1", "sleep", "1000")
    assert host.fails(4, "image", "rm", "bb-oci:1").err.count("c1") == 1
    assert "bb-oci:1" in {i["name"] for i in host.json("image", "ls")}
    host.ok("rm", "-f", "c1")
    host.ok("image", "rm", "bb-oci:1")
    assert {i["name"] for i in host.json("image", "ls")} == {"bb-docker:1", "bb-layout:1"}
    assert store.digests() == listed["bb-oci:1"]["layers"]  # still used by the others
    host.ok("image", "rm", "bb-docker:1")
    host.ok("image", "rm", "bb-layout:1")
    assert host.json("image", "ls") == []
    assert store.digests() == []  # the last user gone, the layer goes too


def test_image_name_without_tag_means_latest(bb):
    bb.ok("run", "--name", "c1", "busybox", "sleep", "1000")
    assert bb.container("c1")["image"] == IMAGE


def test_run_ps_logs_exec_stop_rm(bb):
    before = time.time()
    r = bb.ok("run", "--name", "c1", IMAGE, *SLEEPER)
    assert r.out.strip() == "c1"
    c = bb.container("c1")
    assert c["state"] == "running" and c["image"] == IMAGE
    assert isinstance(c["pid"], int) and not proc_gone(proc_identity(c["pid"]))
    assert before - 1 <= c["started"] <= time.time() + 1
    assert isinstance(c["memory"], int) and c["memory"] > 0
    assert c["exit_code"] is None

    text = bb.wait_log("c1", lambda t: "started" in t and "oops" in t)  # stdout and stderr
    assert text.splitlines()[:2] in (["started", "oops"], ["oops", "started"])

    r = bb.run("exec", "c1", "hostname")
    assert (r.rc, r.out) == (0, "c1\n"), str(r)
    r = bb.run("exec", "c1", "echo", "hi")
    assert (r.rc, r.out) == (0, "hi\n"), str(r)
    assert bb.run("exec", "c1", "sh", "-c", "exit 3").rc == 3
    assert bb.run("exec", "c1", "false").rc == 1
    r = bb.run("exec", "c1", "/bin/no-such-program")
    assert r.rc == 127 and "Traceback" not in r.err, str(r)
    r = bb.run("exec", "-e", "GREETING=hello there", "c1", "sh", "-c", 'echo "$GREETING from $HOSTNAME"')
    assert (r.rc, r.out) == (0, "hello there from c1\n"), str(r)
    # the exec'd process sees the container's processes, not the host's: init is PID 1
    r = bb.ok("exec", "c1", "cat", "/proc/1/cmdline")
    assert r.out.split("\0")[:2] == ["sh", "-c"]

    t0 = time.monotonic()
    r = bb.ok("stop", "-t", "5", "c1")
    assert r.out.strip() == "c1 exited (7)"
    assert time.monotonic() - t0 < 4, "SIGTERM was trapped: stop must not have waited for the timeout"
    c = bb.container("c1")
    assert (c["state"], c["exit_code"], c["pid"], c["memory"]) == ("exited", 7, None, None)
    assert bb.fails(4, "exec", "c1", "true")
    bb.ok("rm", "c1")
    assert bb.ps() == {}


def test_stop_kills_after_the_timeout_when_sigterm_is_ignored(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", COUNTER)  # PID 1 without a handler ignores SIGTERM
    bb.wait_count("c1", 3)
    t0 = time.monotonic()
    r = bb.ok("stop", "-t", "1", "c1")
    elapsed = time.monotonic() - t0
    assert r.out.strip() == "c1 exited (137)"
    assert 1.0 <= elapsed < 10, elapsed
    c = bb.container("c1")
    assert (c["state"], c["exit_code"]) == ("exited", 137)


def test_container_that_exits_by_itself_and_logs_follow(bb):
    bb.ok("run", "--name", "c1", IMAGE, "sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done; exit 5")
    follow = subprocess.run([*_cli(), "logs", "-f", "c1"], env=bb.env, capture_output=True, text=True, timeout=30)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == "line 1\nline 2\nline 3\n"
    wait_until(lambda: bb.container("c1")["state"] == "exited", 10, "c1 to be recorded as exited")
    assert bb.container("c1")["exit_code"] == 5
    assert bb.logs("c1") == "line 1\nline 2\nline 3\n"


def test_read_only_volume_cannot_be_written(bb, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "in.txt").write_text("from the host\n")
    bb.ok("run", "--name", "c1", "-v", f"{ro}:/ro:ro", "-v", f"{rw}:/rw", IMAGE, "sleep", "1000")
    r = bb.run("exec", "c1", "cat", "/ro/in.txt")
    assert (r.rc, r.out) == (0, "from the host\n"), str(r)
    r = bb.run("exec", "c1", "sh", "-c", "echo x > /ro/new.txt")
    assert r.rc != 0 and "Read-only file system" in r.err, str(r)
    r = bb.run("exec", "c1", "rm", "/ro/in.txt")
    assert r.rc != 0, str(r)
    assert sorted(os.listdir(ro)) == ["in.txt"]
    bb.ok("exec", "c1", "sh", "-c", "echo y > /rw/new.txt")
    assert (rw / "new.txt").read_text() == "y\n"


def _limit_files(cgroups: dict) -> dict[str, str]:
    """The limit values, read from whichever hierarchy holds each controller."""
    def read(key, name):
        return Path(cgroups[key], name).read_text().strip()

    if "memory" in cgroups:
        memory = read("memory", "memory.limit_in_bytes")
    else:
        memory = read("unified", "memory.max")
    if "cpu" in cgroups:
        cpu = f"{read('cpu', 'cpu.cfs_quota_us')} {read('cpu', 'cpu.cfs_period_us')}"
    else:
        cpu = read("unified", "cpu.max")
    return {"memory": memory, "cpu": cpu}


def assert_limits(host, name: str) -> None:
    rec = host.record(name)
    cgroups = rec["cgroups"]
    assert cgroups, "no cgroups recorded"
    # every hierarchy of the host that the runtime knows gets a folder, with init inside
    for key, path in cgroups.items():
        assert os.path.isdir(path), (key, path)
        assert str(rec["pid"]) in Path(path, "cgroup.procs").read_text().split(), (key, path)
    assert _limit_files(cgroups) == {"memory": str(64 << 20), "cpu": "50000 100000"}


def test_memory_cpu_and_pids_limits_reach_the_cgroups(bb):
    bb.ok("run", "--name", "c1", "--memory", "64m", "--cpus", "0.5", "--pids", "50", IMAGE, "sleep", "1000")
    assert_limits(bb, "c1")
    cgroups = bb.record("c1")["cgroups"]
    assert Path(cgroups.get("pids", cgroups.get("unified")), "pids.max").read_text().strip() == "50"
    # the limit holds: 200 MiB in one buffer is killed by the OOM killer, 16 MiB is fine
    bb.ok("run", "--name", "c2", "--memory", "64m", IMAGE, "sh", "-c",
          "dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null; echo big=$?; "
          "dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; echo small=$?")
    assert bb.wait_log("c2", lambda t: "small=" in t) == "big=137\nsmall=0\n"


def test_nothing_is_left_after_stop_and_rm(bb):
    bb.ok("run", "--name", "c1", IMAGE, *SLEEPER)
    rec = bb.record("c1")
    init, shim = proc_identity(rec["pid"]), proc_identity(rec["shim_pid"])
    assert init and shim
    bb.ok("stop", "-t", "1", "c1")
    bb.ok("rm", "c1")
    assert_all_gone(bb, "c1", rec, [init, shim])


def assert_all_gone(host, name: str, rec: dict, procs: list) -> None:
    """No process, mount, cgroup folder, container folder or catalog entry left of `name`."""
    for ident in procs:
        wait_until(lambda ident=ident: proc_gone(ident), 10, f"process {ident[0]} of {name} to be gone")
    cdir = host.state.container_dir(name)
    assert linux.mounts_under(str(cdir)) == []
    for key, path in rec["cgroups"].items():
        assert not os.path.exists(path), f"cgroup {key} left: {path}"
    assert not cdir.exists()
    assert name not in host.catalog()
    assert name not in host.ps()


def test_a_containers_cgroups_are_the_tools_own_not_its_callers(bb):
    """Run from inside a cgroup of its own in every hierarchy (as an SSH login sits in its
    session's scope): neither the container nor its shim stays there, so that cgroup can be
    removed (as systemd does when the session ends) with the container running on, in folders
    at the top of each hierarchy, with the shim in a leaf beside the container's."""
    from runtime.cgroups import HostCgroups

    host = HostCgroups.of_this_host()
    tops = [*host.v1.values(), *([host.v2] if host.v2 else [])]
    session = [Path(top, f"session-test-{os.getpid()}") for top in tops]
    enter = "; ".join(f"echo $$ > {p}/cgroup.procs" for p in session)
    try:
        for p in session:
            p.mkdir()
        subprocess.run([*bb.prefix, "sh", "-c", enter + '; exec "$@"', "sh", *_cli(), "run", "--name", "c1",
                        IMAGE, *SLEEPER], env=bb.env, cwd=bb.work, check=True, capture_output=True, timeout=60)
        rec = bb.record("c1")
        for p in session:
            assert (p / "cgroup.procs").read_text() == "", p
            p.rmdir()  # the session ends
        for key, path in rec["cgroups"].items():
            top = host.v2 if key == "unified" else host.v1[key]
            assert Path(path).parent.parent.parent == Path(top) and Path(path).name == "container", path
            assert str(rec["shim_pid"]) in (Path(path).parent / "shim" / "cgroup.procs").read_text().split()
        time.sleep(0.5)
        assert bb.container("c1")["state"] == "running" and linux.pid_running(rec["pid"])
    finally:
        for p in session:
            if p.is_dir():
                for pid in (p / "cgroup.procs").read_text().split():
                    linux.send_signal(int(pid), signal.SIGKILL)
                wait_until(lambda p=p: not (p / "cgroup.procs").read_text(), 10, "the session cgroup to empty")
                p.rmdir()


def test_a_cgroup_removed_while_a_command_reads_it_is_gone_not_an_error():
    """`ps`, `rm` or a reconcile look at a container's cgroups while its shim may be removing
    them: a file opened just before the rmdir fails with ENODEV (seen: `ps` died of it), and
    that is read as "gone", like a folder that is missing."""
    import multiprocessing

    from runtime.cgroups import HostCgroups

    top = HostCgroups.of_this_host().v2
    if top is None:
        pytest.skip("no cgroup2 hierarchy here")
    folder = Path(top, f"removed-test-{os.getpid()}")

    def churn(stop) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                folder.mkdir()
            with contextlib.suppress(OSError):
                folder.rmdir()

    stop = multiprocessing.Event()
    churner = multiprocessing.Process(target=churn, args=(stop,))
    churner.start()
    cgroups = Cgroups({"unified": str(folder)})
    calls, deadline = 0, time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            assert cgroups.pids() == set()
            assert cgroups.memory_usage() in (None, 0)
            cgroups.freeze()
            cgroups.thaw()
            calls += 1
    finally:
        stop.set()
        churner.join(10)
        with contextlib.suppress(OSError):
            folder.rmdir()
    assert calls > 100


def test_a_full_disk_costs_output_not_the_container(host, busybox_archives):
    """The state root fills up while the container writes: the shim drops what the log cannot
    take and keeps supervising; once there is room again the log says how much was lost."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(host.root)], check=True)
    try:
        host.import_busybox(busybox_archives["docker-archive"])
        filler = host.root / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=2"], check=True, capture_output=True)
        # 40 MB of output into a 24 MB root, then quiet: room made later is not taken again
        host.ok("run", "--name", "c1", IMAGE, "sh", "-c", "yes 0123456789abcdef | head -c 40000000; sleep 1000")
        shim = host.record("c1")["shim_pid"]
        wait_until(lambda: os.statvfs(host.root).f_bavail == 0, 60, "the state root to fill up")
        wait_until(lambda: not [p for p in Cgroups(host.record("c1")["cgroups"]).pids()
                                if Path(f"/proc/{p}/comm").read_text().strip() in ("yes", "head")], 60,
                   "the output to end (into nowhere)")
        assert linux.pid_running(shim) and linux.pid_running(host.record("c1")["pid"])
        filler.unlink()
        host.wait_log("c1", lambda t: "bytes of output were lost here" in t, 30, "the log to tell what it lost")
        assert host.container("c1")["state"] == "running"
        r = host.ok("stop", "-t", "1", "c1")
        assert "c1 exited" in r.out
    finally:
        host.run("rm", "-f", "c1")
        subprocess.run(["umount", "-l", str(host.root)], check=False)


def test_exec_enters_with_the_hosts_programs_whatever_the_containers_path(bb):
    """What enters the container (runtime.nsexec, by this Python's absolute path) is chosen on the
    host: a lookup with the container's PATH would run, as root on the host, a program the
    container's spec points to (here a decoy nsenter, the tool exec used to run)."""
    decoy = bb.work / "decoy"
    decoy.mkdir()
    marker = bb.work / "decoy-ran"
    (decoy / "nsenter").write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    (decoy / "nsenter").chmod(0o755)
    bb.ok("run", "--name", "c1", "-e", f"PATH={decoy}:/bin", IMAGE, "sleep", "1000")
    assert bb.ok("exec", "c1", "echo", "inside").out == "inside\n"
    assert not marker.exists()
    bb.ok("rm", "-f", "c1")
