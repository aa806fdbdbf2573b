"""Where a container's cgroups go, as a pure function of the host: its cgroup mounts (from
/proc/self/mountinfo of a v1, a hybrid and a pure v2 host) and whether systemd runs. Never
below the caller's own cgroup (an SSH session's scope), whatever that is."""

import os
from pathlib import Path

import pytest

from runtime import cgroups
from runtime.cgroups import Cgroups, HostCgroups, controllers, parse_mounts, plan
from runtime.spec import Limits

# /proc/self/mountinfo lines as those hosts have them (Debian 12; Ubuntu 20.04; CentOS 7)
PURE_V2 = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:33 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,cpu,cpuacct
38 31 0:35 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:18 - cgroup cgroup rw,pids
39 31 0:36 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:19 - cgroup cgroup rw,freezer
"""
V1 = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line) + "\n"
# the caller's own cgroup on such hosts: an SSH login; it must not matter
SESSION = "0::/user.slice/user-0.slice/session-6.scope\n"


def host(mountinfo: str, systemd: bool) -> HostCgroups:
    return HostCgroups(*parse_mounts(mountinfo), systemd)


def test_mounts_are_read_for_every_layout():
    assert parse_mounts(PURE_V2) == ({}, "/sys/fs/cgroup")
    v1 = {"memory": "/sys/fs/cgroup/memory", "cpu": "/sys/fs/cgroup/cpu,cpuacct", "pids": "/sys/fs/cgroup/pids"}
    assert parse_mounts(HYBRID) == (v1, "/sys/fs/cgroup/unified")
    assert parse_mounts(V1) == (v1, None)


def test_with_systemd_the_container_is_a_leaf_of_its_own_scope_in_the_tools_slice():
    c = plan(host(PURE_V2, systemd=True), "migrate", "t1")
    assert c.paths == {"unified": "/sys/fs/cgroup/migrate.slice/migrate-t1.scope/container"}
    assert c.scope == Path("/sys/fs/cgroup/migrate.slice/migrate-t1.scope") and c.pure_v2
    # hybrid: the unified hierarchy is systemd's (the scope); v1 controllers, which it does not
    # delegate, get a fixed folder of ours
    c = plan(host(HYBRID, systemd=True), "migrate", "t1")
    assert c.paths == {"unified": "/sys/fs/cgroup/unified/migrate.slice/migrate-t1.scope/container",
                       "memory": "/sys/fs/cgroup/memory/migrate/t1/container",
                       "cpu": "/sys/fs/cgroup/cpu,cpuacct/migrate/t1/container",
                       "pids": "/sys/fs/cgroup/pids/migrate/t1/container"}
    assert c.scope is not None and not c.pure_v2


def test_without_systemd_a_fixed_folder_at_the_top_of_each_hierarchy():
    c = plan(host(PURE_V2, systemd=False), "migrate", "t1")
    assert c.paths == {"unified": "/sys/fs/cgroup/migrate/t1/container"} and c.scope is None
    c = plan(host(V1, systemd=False), "migrate-0a1b2c3d4e", "t1")
    assert c.paths == {"memory": "/sys/fs/cgroup/memory/migrate-0a1b2c3d4e/t1/container",
                       "cpu": "/sys/fs/cgroup/cpu,cpuacct/migrate-0a1b2c3d4e/t1/container",
                       "pids": "/sys/fs/cgroup/pids/migrate-0a1b2c3d4e/t1/container"}
    assert c.scope is None and c.launcher("x") == []


@pytest.mark.parametrize("mountinfo", [PURE_V2, HYBRID, V1])
@pytest.mark.parametrize("systemd", [True, False])
def test_never_below_the_callers_cgroup(mountinfo, systemd):
    for path in plan(host(mountinfo, systemd), "migrate", "t1").paths.values():
        assert "user.slice" not in path and "session" not in path and SESSION.strip()[3:] not in path


def test_the_scope_is_started_by_systemd_run_delegated(monkeypatch):
    c = plan(host(PURE_V2, systemd=True), "migrate", "t1")
    argv = c.launcher("migrate container t1")
    assert argv[:2] == ["systemd-run", "--scope"] and "--unit=migrate-t1.scope" in argv
    assert "--slice=migrate.slice" in argv and "--property=Delegate=yes" in argv and argv[-1] == "--"


def test_limits_and_controllers_on_a_fake_v2_tree(tmp_path):
    """cgroupfs layout on a pure v2 host, with a folder standing in for /sys/fs/cgroup (its
    files made beforehand, as the kernel would show them): the shim moves to its leaf, the
    controllers go on from the top down to the container's folder, the limits in its leaf."""
    top = tmp_path / "cg"
    base = top / "migrate" / "t1"
    leaf = base / "container"
    for folder in (top, top / "migrate", base, base / "shim", leaf):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for name in ("memory.max", "memory.swap.max", "cpu.max", "pids.max"):
        (leaf / name).write_text("max\n")
    c = plan(HostCgroups({}, str(top), False), "migrate", "t1")
    assert c.paths == {"unified": str(leaf)}
    c.create()
    assert (leaf / "memory.max").read_text() == "max\n"  # limits come with set_limits, not before
    c.set_limits(Limits(memory_bytes=64 << 20, cpus=0.5, pids=100))
    assert (base / "shim" / "cgroup.procs").read_text() == str(os.getpid())
    assert (leaf / "memory.max").read_text() == "67108864"
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert (leaf / "pids.max").read_text() == "100"
    for folder in (top, top / "migrate", base):  # each controller written on its own: the last one stays here
        assert (folder / "cgroup.subtree_control").read_text() == "+pids"
    assert not (leaf / "cgroup.subtree_control").exists()  # the container's folder is a leaf


    # a restore lifts every limit while CRIU works inside, then sets them again
    c.set_limits(Limits())
    assert [(leaf / n).read_text() for n in ("memory.max", "memory.swap.max", "cpu.max", "pids.max")] == \
        ["max", "max", "max 100000", "max"]


class _V1Memory:
    """memory.limit_in_bytes and memory.memsw.limit_in_bytes as v1 keeps them: memsw may never
    be below memory (EINVAL, as the kernel answers)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.limits = {"memory.limit_in_bytes": "-1", "memory.memsw.limit_in_bytes": "-1"}

    def write(self, name: str, value: str) -> None:
        new = {**self.limits, name: value}
        size = {k: float("inf") if v == "-1" else int(v) for k, v in new.items()}
        if size["memory.memsw.limit_in_bytes"] < size["memory.limit_in_bytes"]:
            raise OSError(22, "Invalid argument")
        self.limits = new


def test_v1_memory_limits_are_raised_lowered_and_lifted_in_an_order_the_kernel_takes(tmp_path, monkeypatch):
    memory, cpu = tmp_path / "memory", tmp_path / "cpu"
    for folder in (memory, cpu):
        folder.mkdir()
    kernel = _V1Memory(memory)
    for name in kernel.limits:
        (memory / name).write_text("-1")
    for name in ("cpu.cfs_period_us", "cpu.cfs_quota_us"):
        (cpu / name).write_text("-1")
    real_write = Path.write_text

    def write_text(path: Path, value: str, *a, **kw):
        if path.parent == memory:
            kernel.write(path.name, value)
        return real_write(path, value, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    c = Cgroups({"memory": str(memory), "cpu": str(cpu)})
    for limits in (Limits(memory_bytes=64 << 20, cpus=0.5), Limits(memory_bytes=256 << 20), Limits(),
                   Limits(memory_bytes=32 << 20)):
        c.set_limits(limits)
        want = str(limits.memory_bytes) if limits.memory_bytes else "-1"
        assert kernel.limits == {"memory.limit_in_bytes": want, "memory.memsw.limit_in_bytes": want}
        assert (cpu / "cpu.cfs_quota_us").read_text() == (str(int(limits.cpus * 100000)) if limits.cpus else "-1")


def test_a_limit_the_host_cannot_apply_is_a_clear_error(tmp_path):
    c = Cgroups({"unified": str(tmp_path)})
    with pytest.raises(Exception, match="cannot apply memory.max: this host has no memory cgroup controller"):
        c.set_limits(Limits(memory_bytes=1 << 20))
    c.set_limits(Limits())  # nothing to lift where there is no controller


def test_an_override_of_the_manager(monkeypatch):
    monkeypatch.setenv("MIGRATE_CGROUP_MANAGER", "cgroupfs")
    assert cgroups.systemd_runs() is False
    monkeypatch.setenv("MIGRATE_CGROUP_MANAGER", "systemd")
    assert cgroups.systemd_runs() is True


def test_the_controllers_containers_can_have(tmp_path):
    assert controllers(host(V1, systemd=False)) == ["cpu", "memory", "pids"]
    assert controllers(host(HYBRID, systemd=True)) == ["cpu", "memory", "pids"]  # cgroup2 has none there
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    assert controllers(HostCgroups({}, str(tmp_path), True)) == ["cpu", "memory", "pids"]
