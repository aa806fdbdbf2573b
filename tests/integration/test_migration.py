"""Live migration between test hosts through the real `migrate` CLI, real SSH and real CRIU.

Every test makes its own hosts (network namespaces with their own sshd and MIGRATE_ROOT, see
migrate/testhosts.py) and drives each host through the CLI as a user on that host would (HostCLI
in cluster.py: clihost.MigrateHost run inside the host's network and UTS namespaces).
A migration is run on its source and reaches the target by its ssh config name. Whatever
happens, every container on every host is removed and anything
left in their cgroups is killed by PID before the hosts are torn down; what had to be removed
by force is a leak of the tool and fails the test.
"""

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from clihost import (
    IMAGE,
    _cli,
    assert_consecutive,
    checksums,
    counter_numbers,
    proc_identity,
    record_timing,
    static_program,
    wait_until,
)
from cluster import (
    Cluster,
    assert_counts_on,
    assert_no_migration_leftovers,
    assert_refused_and_unchanged,
    set_host_direct,
    set_host_env,
    start_counter,
)
from test_checkpoint import GHOST_HOLDER, first_error, kept_criu_log
from test_containers import assert_all_gone

from runtime import journal, linux
from runtime.cgroups import Cgroups
from runtime.criu import find_binary
from runtime.imagebuild import build_image, busybox_layer
from runtime.layers import LayerStore

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

NUMBERS_FILE = Path("/tmp/migrate-512-numbers.txt")


# ---------------------------------------------------------------------------------------------
# 1, 2: the counter continues


def _counter_continues(c: Cluster, mode: str) -> None:
    a, b = c["host-a"], c["host-b"]
    before = start_counter(c)
    r = c.move("host-a", "c1", "host-b", mode=mode)
    assert r.rc == 0, str(r)
    assert "c1 now runs on host-b" in r.out and "downtime" in r.out, str(r)
    assert "c1" not in a.ps()
    nums = assert_counts_on(c, "host-b", "c1", before)
    # `migrate logs` on host-b shows the whole story: before the move (from 1) and after it
    text = b.logs("c1")
    whole = counter_numbers(text)
    assert whole[0] == 1 and whole[:len(nums)] == nums
    assert_consecutive(whole)


def test_counter_continues_on_the_target_copy_mode(two):
    _counter_continues(two, "copy")


def test_counter_continues_on_the_target_lazy_mode(two):
    _counter_continues(two, "lazy")


# ---------------------------------------------------------------------------------------------
# 3: statistics


def test_json_statistics(two):
    start_counter(two)
    stats = two.move_json("host-a", "c1", "host-b")
    assert stats["source"] and stats["mode"] == "copy"
    assert isinstance(stats["downtime_s"], float) and isinstance(stats["total_s"], float)
    assert 0 < stats["downtime_s"] < stats["total_s"], stats
    phases = stats["phases_s"]
    assert isinstance(phases, dict) and phases and all(isinstance(v, float) and v >= 0 for v in phases.values())
    assert sum(phases.values()) <= stats["total_s"] * 1.05 + 0.05, stats
    assert set(stats["bytes"]) == {"layers", "upper", "pre-copy", "images", "pages"}, stats
    assert all(isinstance(v, int) and v >= 0 for v in stats["bytes"].values()), stats
    assert stats["bytes"]["layers"] > 0 and stats["bytes"]["images"] > 0, stats
    assert stats["bytes_total"] == sum(stats["bytes"].values())
    assert_counts_on(two, "host-b", "c1", [])


# ---------------------------------------------------------------------------------------------
# 4: files in the container


def test_files_written_in_the_container_move_with_it(two):
    a, b = two["host-a"], two["host-b"]
    a.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    a.ok("exec", "c1", "sh", "-c", "echo hello > /root/marker && echo tmp > /tmp/marker && rm /etc/group")
    two.move_json("host-a", "c1", "host-b")
    assert b.ok("exec", "c1", "cat", "/root/marker").out == "hello\n"
    assert b.ok("exec", "c1", "cat", "/tmp/marker").out == "tmp\n"
    assert b.run("exec", "c1", "test", "-e", "/etc/group").rc == 1  # the deletion (a whiteout) moved too
    assert b.ok("exec", "c1", "cat", "/proc/1/cmdline").out.split("\0")[0] == "sleep"


# ---------------------------------------------------------------------------------------------
# 5: a round trip over three hosts


def test_round_trip_over_three_hosts(cluster, busybox_archives):
    c = cluster(3)
    c["host-a"].import_busybox(busybox_archives["docker-archive"])
    nums = start_counter(c)
    for src, dst in (("host-a", "host-b"), ("host-b", "host-c"), ("host-c", "host-a")):
        stats = c.move_json(src, "c1", dst)
        assert stats["source"]
        assert "c1" not in c[src].ps()
        nums = assert_counts_on(c, dst, "c1", nums, more=5)
    assert set(c["host-a"].ps()) == {"c1"} and c["host-b"].ps() == {} and c["host-c"].ps() == {}
    assert_no_migration_leftovers(*c.nodes.values())


# ---------------------------------------------------------------------------------------------
# 6: the source is clean afterwards


def test_no_trace_left_on_the_source(two):
    a, b = two["host-a"], two["host-b"]
    start_counter(two)
    rec = two.record("host-a", "c1")
    procs = [proc_identity(rec["pid"]), proc_identity(rec["shim_pid"])]
    assert all(procs)
    assert all(os.path.isdir(p) for p in rec["cgroups"].values())
    two.move_json("host-a", "c1", "host-b")
    assert_all_gone(a, "c1", rec, procs)  # processes, mounts, cgroups, folder, catalog, ps
    assert linux.mounts_under(str(a.root)) == []
    assert not any(os.path.exists(p) for p in a.cgroup_parents()), "the per-root cgroup folder is left"
    assert os.listdir(a.state.containers) == []
    assert_no_migration_leftovers(a, b)
    assert b.container("c1")["state"] == "running"


# ---------------------------------------------------------------------------------------------
# 7: layers are sent once


def test_second_container_of_the_same_image_sends_no_layers(two):
    a, b = two["host-a"], two["host-b"]
    a.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    c2 = start_counter(two, name="c2")
    first = two.move_json("host-a", "c1", "host-b")
    assert first["bytes"]["layers"] > 0, first
    second = two.move_json("host-a", "c2", "host-b")
    assert second["bytes"]["layers"] == 0, second
    assert second["bytes"]["images"] > 0, second
    assert set(b.ps()) == {"c1", "c2"}
    assert_counts_on(two, "host-b", "c2", c2)



def test_a_layer_tree_the_source_changed_never_stands_for_that_layer_in_an_import_on_the_target(
        two, busybox_archives):
    """A layer goes as its blob, not its tree: what the source did to its tree stays there, and
    the target holds the tree it extracted from the verified blob, which a later import of the
    image there verifies against and keeps."""
    a, b = two["host-a"], two["host-b"]
    a.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    [digest] = LayerStore(a.state.layers).digests()
    (LayerStore(a.state.layers).path_of(digest) / "planted").write_text("not in the image\n")
    r = two.move("host-a", "c1", "host-b")
    assert r.rc == 0, str(r)
    there = LayerStore(b.state.layers)
    assert not (there.path_of(digest) / "planted").exists()
    assert b.run("exec", "c1", "ls", "/planted").rc != 0
    assert there.blob_of(digest).read_bytes() == LayerStore(a.state.layers).blob_of(digest).read_bytes()
    b.ok("image", "import", busybox_archives["docker-archive"])
    assert there.digests() == [digest] and not (there.path_of(digest) / "planted").exists()


def test_a_layer_blob_the_source_tampered_with_is_refused_on_the_target(two):
    """A blob that does not hash to its layer's digest (one byte flipped on the source) is refused
    at the layers step: the container runs on at the source, the target keeps nothing."""
    a, b = two["host-a"], two["host-b"]
    before = start_counter(two)
    rec = two.record("host-a", "c1")
    [digest] = LayerStore(a.state.layers).digests()
    blob = LayerStore(a.state.layers).blob_of(digest)
    genuine = blob.read_bytes()
    blob.write_bytes(genuine[:1000] + bytes([genuine[1000] ^ 1]) + genuine[1001:])

    r = a.fails(8, "c1", "host-b")
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "failed at layers" in r.err and f"layer {digest}: digest mismatch" in r.err, str(r)
    assert "keeps running here" in r.err, str(r)
    ct = a.container("c1")
    assert (ct["state"], ct["pid"]) == ("running", rec["pid"]), ct
    assert_counts_on(two, "host-a", "c1", before)
    assert b.ps() == {} and LayerStore(b.state.layers).digests() == []
    blobs = b.state.layers / "blobs" / "sha256"
    assert not blobs.exists() or not any(blobs.iterdir())
    assert_no_migration_leftovers(a, b)
    wait_until(lambda: not b._procs_of_root(), 10, "the agent on host-b to exit")

    blob.write_bytes(genuine)  # and the rollback left a container that can still move
    nums = counter_numbers(a.logs("c1"))
    two.move_json("host-a", "c1", "host-b")
    assert_counts_on(two, "host-b", "c1", nums)


def test_a_layer_imported_before_blobs_were_kept_is_refused_at_preflight_until_imported_again(
        two, busybox_archives):
    a, b = two["host-a"], two["host-b"]
    before = start_counter(two)
    rec = two.record("host-a", "c1")
    [digest] = LayerStore(a.state.layers).digests()
    LayerStore(a.state.layers).blob_of(digest).unlink()  # as a store made before blobs were kept holds it
    state_a, state_b = a.snapshot_of_state(), b.snapshot_of_state()
    r = a.fails(8, "c1", "host-b")
    assert "cannot migrate c1" in r.err and "have no blob here" in r.err and "import the image again" in r.err, str(r)
    assert_refused_and_unchanged(two, r, 8, state_a, rec["pid"], before)
    assert b.snapshot_of_state() == state_b

    a.ok("image", "import", busybox_archives["docker-archive"])  # verifies the blob and keeps it
    nums = counter_numbers(a.logs("c1"))
    two.move_json("host-a", "c1", "host-b")
    assert_counts_on(two, "host-b", "c1", nums)


# ---------------------------------------------------------------------------------------------
# 8: a failed restore on the target rolls back


@pytest.mark.parametrize("mode,fault,step", [
    ("copy", "restore", "restore"),
    ("lazy", "restore", "restore"),
    ("lazy", "pages", "memory pages"),  # after the target resumed: it is killed, the source resumes
])
def test_failed_restore_on_the_target_rolls_back(two, mode, fault, step):
    a, b = two["host-a"], two["host-b"]
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": fault})
    before = start_counter(two)
    rec = two.record("host-a", "c1")
    planned_b = Cgroups.plan(b.state.cgroup_parent, "c1").paths

    r = a.fails(8, "c1", "host-b", "--mode", mode)
    assert f"failed at {step}" in r.err and "c1" in r.err and "host-b" in r.err, str(r)

    # the source: the same processes, running, counting on without a gap
    ct = a.container("c1")
    assert (ct["state"], ct["pid"]) == ("running", rec["pid"]), ct
    assert a.record("c1")["shim_pid"] == rec["shim_pid"]
    assert_counts_on(two, "host-a", "c1", before)
    # the target: nothing, not even the layers that were sent for it
    assert b.ps() == {}
    assert LayerStore(b.state.layers).digests() == []
    assert linux.mounts_under(str(b.root)) == []
    assert not any(os.path.exists(p) for p in planned_b.values())
    assert not any(os.path.exists(p) for p in b.cgroup_parents())
    assert not b.state.container_dir("c1").exists()
    assert_no_migration_leftovers(a, b)
    wait_until(lambda: not b._procs_of_root(), 10, "the agent on host-b to exit")

    # and the rollback left a container that can still move
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": ""})
    nums = counter_numbers(a.logs("c1"))
    two.move_json("host-a", "c1", "host-b")
    assert_counts_on(two, "host-b", "c1", nums)


# ---------------------------------------------------------------------------------------------
# 9: ten migrations leak nothing


def _census(c: Cluster) -> dict:
    """Everything a migration could leak, on this machine, for the hosts of c."""
    roots = [str(n.root) for n in c.nodes.values()]
    parents = [p for n in c.nodes.values() for p in n.cgroup_parents()]
    parent_names = {os.path.basename(p) for p in parents}
    base = str(c.hosts.base)
    markers = {f"MIGRATE_ROOT={r}".encode() for r in roots}
    netns = set()
    for h in c.hosts:
        st = os.stat(f"/run/netns/{h.netns}")
        netns.add((st.st_dev, st.st_ino))
    me = os.getpid()

    procs: Counter = Counter()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if state == "Z" or comm == "sleep":  # zombies are gone; the counter's sleeps come and go
                continue
            ns = os.stat(f"/proc/{pid}/ns/net")
            ours = (
                (ns.st_dev, ns.st_ino) in netns
                or any(name in Path(f"/proc/{pid}/cgroup").read_text() for name in parent_names)
                or markers & set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
                or base.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
                or int(ppid) == me
            )
        except (OSError, ValueError):
            continue
        if ours:
            procs[comm] += 1

    mounts = sorted(p for p in linux.mounts_under(base))
    cgroups = []
    for parent in parents:
        for dirpath, _dirs, _files in os.walk(parent):
            cgroups.append(dirpath)
    dirs = []
    for r in roots:
        for dirpath, dirnames, filenames in os.walk(r):
            rel = os.path.relpath(dirpath, r)
            depth = 0 if rel == "." else rel.count("/") + 1
            if depth >= 3 or rel.endswith("/rootfs"):
                dirnames[:] = []
            dirs += [os.path.join(dirpath, n) for n in dirnames + filenames
                     if not n.endswith(("-journal", "-wal", "-shm"))]
    fds = sorted(os.listdir("/proc/self/fd"))
    return {"procs": dict(procs), "mounts": mounts, "cgroups": sorted(cgroups), "dirs": sorted(dirs),
            "fds": len(fds)}


def test_ten_migrations_leak_nothing(two, busybox_archives):
    a, b = two["host-a"], two["host-b"]
    # Both hosts start as hosts that have had containers: the layers, and the state layout
    # (containers/, layers/tmp/) that a first container creates and that stays, as on a real host.
    b.import_busybox(busybox_archives["docker-archive"])
    b.ok("run", "--name", "warm", IMAGE, "true")
    wait_until(lambda: b.container("warm")["state"] == "exited", 10, "warm to exit")
    b.ok("rm", "warm")
    nums = start_counter(two)
    before = _census(two)
    assert before["procs"] and before["mounts"] and before["cgroups"], before
    started = time.monotonic()
    hops = [("host-a", "host-b"), ("host-b", "host-a")] * 5
    seconds = []
    for src, dst in hops:
        stats = two.move_json(src, "c1", dst)
        assert stats["bytes"]["layers"] == 0, stats
        seconds.append(stats["total_s"])
    nums = assert_counts_on(two, "host-a", "c1", nums, more=3)
    record_timing("10 migrations", wall_s=f"{time.monotonic() - started:.1f}",
                  total_s=" ".join(f"{s:.2f}" for s in seconds))
    holder = {}

    def settled() -> bool:
        holder["after"] = _census(two)
        return holder["after"] == before

    try:
        wait_until(settled, 10, "the census to return to what it was")
    except AssertionError:
        after = holder["after"]
        diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"after 10 migrations (before, after): {diff}")
    assert set(a.ps()) == {"c1"} and b.ps() == {}
    assert_no_migration_leftovers(a, b)


# ---------------------------------------------------------------------------------------------
# 10: 512 MiB of memory


def _record_512(mode: str, stats: dict) -> None:
    line = f"{mode} downtime_s={stats['downtime_s']} total_s={stats['total_s']} " \
           f"images_bytes={stats['bytes']['images']} pages_bytes={stats['bytes']['pages']}"
    print(f"512 MiB {line}")
    kept = []
    if NUMBERS_FILE.exists():
        kept = [ln for ln in NUMBERS_FILE.read_text().splitlines() if not ln.startswith(f"{mode} ")]
    NUMBERS_FILE.write_text("".join(f"{ln}\n" for ln in [*kept, line]))
    record_timing(f"512MiB migration {mode}", downtime_s=stats["downtime_s"], total_s=stats["total_s"])


def _run_memhog(host, image) -> tuple[str, int]:
    """Container `big` on HOST holding 512 MiB of known data: (the checksum it printed, its pid)."""
    host.ok("image", "import", image)
    host.ok("run", "--name", "big", "memhog")
    original = checksums(host.wait_log("big", lambda t: len(checksums(t)) == 1, 60, "the 512 MiB to be filled"))[0]
    return original, host.container("big")["pid"]


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_512_mib_keep_their_checksum(cluster, memhog_image, mode):
    c = cluster(2)
    a, b = c["host-a"], c["host-b"]
    original, _ = _run_memhog(a, memhog_image)
    stats = c.move_json("host-a", "big", "host-b", mode=mode)
    _record_512(mode, stats)
    assert 0 < stats["downtime_s"] < stats["total_s"]
    assert stats["bytes"]["pages"] >= 512 << 20, stats  # streamed to the target in both modes
    ct = b.container("big")
    assert ct["state"] == "running"
    os.kill(ct["pid"], signal.SIGUSR1)
    text = b.wait_log("big", lambda t: len(checksums(t)) == 2, 60, "the checksum on host-b")
    assert checksums(text) == [original, original]
    assert b.container("big")["memory"] >= 512 << 20
    assert "big" not in a.ps()


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_512_mib_by_a_direct_page_connection_keep_their_checksum_and_leave_no_port(cluster, memhog_image, mode):
    """--direct: every page goes by plain TCP, the pages' byte count comes from that socket, and
    the port the source listened on for it is closed once the agent has connected."""
    c = cluster(2)
    a, b = c["host-a"], c["host-b"]
    original, _ = _run_memhog(a, memhog_image)
    before = {h: _listening_ports(h) for h in (a, b)}
    stats = c.move_json("host-a", "big", "host-b", "--direct", mode=mode)
    _record_512(f"{mode}-direct", stats)
    assert stats["page_link"] == "direct", stats
    assert stats["bytes"]["pages"] >= 512 << 20, stats
    assert {h: _listening_ports(h) for h in (a, b)} == before, "a TCP port stayed open"
    os.kill(b.container("big")["pid"], signal.SIGUSR1)
    text = b.wait_log("big", lambda t: len(checksums(t)) == 2, 60, "the checksum on host-b")
    assert checksums(text) == [original, original]
    assert "big" not in a.ps()


@contextlib.contextmanager
def _refusing_connections_but_ssh(host):
    """HOST's network resets every new TCP connection to it but SSH's (nftables, in its namespace)."""
    nft = ["nsenter", f"--target={host.sshd_pid}", "--net", "--", "nft"]
    subprocess.run([*nft, "add table inet migtest; add chain inet migtest input { type filter hook input "
                    "priority 0; policy accept; }; add rule inet migtest input tcp dport != 22 ct state new "
                    "reject with tcp reset"], check=True)
    try:
        yield
    finally:
        subprocess.run([*nft, "delete table inet migtest"], check=False)


def test_a_direct_page_connection_the_network_refuses_falls_back_to_ssh_and_says_so(two):
    """The host's config asks for direct (`direct = true`), the source's network refuses it:
    the pages go through SSH instead, before anything froze, and a note says why."""
    set_host_direct(two.hosts, "host-b")
    before = start_counter(two)
    with _refusing_connections_but_ssh(two.hosts.hosts["host-a"]):
        stats = two.move_json("host-a", "c1", "host-b", mode="lazy")
    assert stats["page_link"] == "ssh", stats
    assert any("no direct page connection" in n and "cannot reach" in n and "through SSH" in n
               for n in stats["notes"]), stats
    assert_counts_on(two, "host-b", "c1", before)


def test_a_lazy_transfer_that_goes_silent_is_ended_and_the_source_resumes(cluster, memhog_image):
    """The page connection stops carrying anything (here: the target's lazy-pages daemon is
    stopped, as a cut nobody saw would leave it): after the stall window the target kills its
    copy, which must not run without its pages, and the source resumes with all its memory."""
    c = cluster(2)
    a, b = c["host-a"], c["host-b"]
    original, pid = _run_memhog(a, memhog_image)
    set_host_env(c.hosts, "host-b", {"MIGRATE_FAULTS": "pages-stall"})
    r = a.fails(8, "big", "host-b", "--mode", "lazy")
    assert "failed at memory pages" in r.err and "stalled" in r.err and "keeps running here" in r.err, str(r)
    assert (a.container("big")["state"], a.container("big")["pid"]) == ("running", pid)
    os.kill(pid, signal.SIGUSR1)
    text = a.wait_log("big", lambda t: len(checksums(t)) == 2, 60, "the checksum on host-a")
    assert checksums(text) == [original, original]
    wait_until(lambda: b.ps() == {}, 30, "host-b to have no copy")
    b.ps()
    assert_no_migration_leftovers(a, b)


_LISTENERS = r"""
import sys
ports = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":
                ports.add(int(local.rsplit(":", 1)[1], 16))
print(" ".join(map(str, sorted(ports))))
"""


def _listening_ports(host) -> set[int]:
    return {int(p) for p in host.host_python(_LISTENERS).split()}


def test_the_page_connection_opens_no_port_and_its_end_cannot_end_the_source(cluster, memhog_image):
    """Issue 11: a lazy migration opens no TCP port on either host (the page connection is unix
    sockets, gone once connected, through the SSH connection), so no other process there can
    reach it; and the connection's end cannot end the source. Here every page reaches the
    target, CRIU ends its transfer and lets the source go, and then the target's agent hangs
    before the commit: the source's freezer still holds it, no process of it gone, until the
    controller knows the target's copy is gone; then it runs on with all its memory."""
    c = cluster(2)
    a, b = c["host-a"], c["host-b"]
    original, pid = _run_memhog(a, memhog_image)
    events = Path(a.record("big")["cgroups"]["unified"], "cgroup.events")
    before = {h: _listening_ports(h) for h in (a, b)}
    set_host_env(c.hosts, "host-b", {"MIGRATE_FAULTS": "pages:hang"})
    moved: dict = {}
    mover = threading.Thread(target=lambda: moved.update(r=a.run("big", "host-b", "--mode", "lazy")))
    mover.start()
    try:
        # the target restored and fetched every page; CRIU here ended and let the tree go
        wait_until(lambda: b.ps().get("big", {}).get("state") == "running", 60, "the restore on host-b")
        wait_until(lambda: "TracerPid:\t0" in Path(f"/proc/{pid}/status").read_text(), 120,
                   "CRIU to let the source go after the last page")
        assert {h: _listening_ports(h) for h in (a, b)} == before, "a TCP port was opened"
        assert list(Path(b.state.incoming).glob("*/pages-*.sock")) == []  # connected, then removed
        assert "frozen 1" in events.read_text().splitlines()
        assert Path(f"/proc/{pid}").exists()
    finally:
        mover.join(180)
    r = moved["r"]
    assert r.rc == 8 and "keeps running here" in r.err, str(r)
    assert (a.container("big")["state"], a.container("big")["pid"]) == ("running", pid)
    assert "frozen 0" in events.read_text().splitlines()
    os.kill(pid, signal.SIGUSR1)
    assert checksums(a.wait_log("big", lambda t: len(checksums(t)) == 2, 60, "the checksum on host-a")) == \
        [original, original]
    set_host_env(c.hosts, "host-b", {"MIGRATE_FAULTS": ""})
    wait_until(lambda: b.ps() == {}, 30, "host-b to have no copy")
    assert_no_migration_leftovers(a, b)


# ---------------------------------------------------------------------------------------------
# 11: refusals change nothing


def test_refused_when_the_target_has_a_container_of_that_name(two, busybox_archives):
    a, b = two["host-a"], two["host-b"]
    b.import_busybox(busybox_archives["docker-archive"])
    b.ok("run", "--name", "c1", IMAGE, "sleep", "1000")
    b_pid = b.container("c1")["pid"]
    nums = start_counter(two)
    pid = a.container("c1")["pid"]
    before, before_b = a.snapshot_of_state(), b.snapshot_of_state()
    r = two.move("host-a", "c1", "host-b")
    assert_refused_and_unchanged(two, r, 8, before, pid, nums)
    assert "already exists" in r.err and "host-b" in r.err, str(r)
    assert b.snapshot_of_state() == before_b
    assert (b.container("c1")["state"], b.container("c1")["pid"]) == ("running", b_pid)
    assert_no_migration_leftovers(a, b)


def test_refused_for_a_host_unknown_to_ssh(two):
    nums = start_counter(two)
    a = two["host-a"]
    pid = a.container("c1")["pid"]
    before = a.snapshot_of_state()
    r = two.move("host-a", "c1", "no-such-host")
    assert_refused_and_unchanged(two, r, 7, before, pid, nums)
    assert "no-such-host" in r.err, str(r)


def test_refused_when_the_host_key_is_wrong(two, tmp_path):
    nums = start_counter(two)
    a = two["host-a"]
    pid = a.container("c1")["pid"]
    # host-b's line in known_hosts now carries another key
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    impostor = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    ip = two.hosts["host-b"].ip
    kh = two.hosts.known_hosts
    lines = kh.read_text().splitlines()
    assert sum(ln.startswith(f"{ip} ") for ln in lines) == 1
    kh.write_text("".join(f"{ip} {impostor}\n" if ln.startswith(f"{ip} ") else f"{ln}\n" for ln in lines))
    before = a.snapshot_of_state()
    r = two.move("host-a", "c1", "host-b")
    assert_refused_and_unchanged(two, r, 7, before, pid, nums)
    assert "host key" in r.err and "host-b" in r.err, str(r)
    assert two["host-b"].ps() == {}


# ---------------------------------------------------------------------------------------------
# 12: a failed migration takes back what it brought, and leaves the evidence


def test_a_rolled_back_migration_removes_the_layers_it_sent(two, tmp_path):
    a, b = two["host-a"], two["host-b"]
    # host-b has an image of its own, which shares no layer with busybox
    build_image(tmp_path / "other.tar", {"other": b"other\n"}, fmt="oci-archive", name="other:latest",
                config={"Cmd": ["sh"]})
    b.ok("image", "import", tmp_path / "other.tar")
    layers_before = LayerStore(b.state.layers).digests()
    assert len(layers_before) == 1
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": "restore"})
    before = start_counter(two)

    r = a.fails(8, "c1", "host-b", "--mode", "copy")
    assert "failed at restore" in r.err, str(r)
    assert LayerStore(b.state.layers).digests() == layers_before
    assert [i["name"] for i in b.json("image", "ls")] == ["other:latest"]
    assert b.ps() == {}
    assert_no_migration_leftovers(a, b)
    assert_counts_on(two, "host-a", "c1", before)

    # the layers had arrived and went: the next try sends them again, and they stay
    set_host_env(two.hosts, "host-b", {"MIGRATE_FAULTS": ""})
    stats = two.move_json("host-a", "c1", "host-b")
    assert stats["bytes"]["layers"] > 0, stats
    assert set(LayerStore(b.state.layers).digests()) > set(layers_before)


DAMAGING_CRIU = """#!/bin/sh
# host-b's criu in this test: every restore finds its images damaged (the tasks' core-*.img gone)
if [ "$1" = swrk ]; then
    for fd in /proc/$$/fd/*; do
        if [ -f "$fd/inventory.img" ]; then rm -f "$fd"/core-*.img; fi
    done
fi
exec {criu} "$@"
"""


def test_a_failed_restore_on_the_target_keeps_its_criu_log_there(two, tmp_path):
    a, b = two["host-a"], two["host-b"]
    wrapper = tmp_path / "damaging-criu"
    wrapper.write_text(DAMAGING_CRIU.format(criu=find_binary()))
    wrapper.chmod(0o755)
    set_host_env(two.hosts, "host-b", {"MIGRATE_CRIU": str(wrapper)})
    before = start_counter(two)

    r = a.fails(8, "c1", "host-b", "--mode", "copy")
    assert "failed at restore" in r.err and "CRIU restore failed" in r.err, str(r)
    log = kept_criu_log(b, r, "host-b")  # the target's own path, said to be there
    assert log.name.startswith("c1-restore-") and first_error(log) in r.err, str(r)
    # it can be read there, where c1 never ran; here nothing failed
    assert b.ok("logs", "--criu", "c1").out == log.read_text()
    a.fails(3, "logs", "--criu", "c1")
    # and the rest rolled back as ever
    assert b.ps() == {} and LayerStore(b.state.layers).digests() == []
    assert_no_migration_leftovers(a, b)
    assert_counts_on(two, "host-a", "c1", before)


def test_a_failed_dump_on_the_source_keeps_its_criu_log_here(two):
    a, b = two["host-a"], two["host-b"]
    a.ok("run", "--name", "c1", IMAGE, "sh", "-c", GHOST_HOLDER)
    a.wait_log("c1", lambda t: "ready" in t)
    pid = a.container("c1")["pid"]
    r = a.fails(8, "c1", "host-b", "--mode", "copy")
    assert "failed at checkpoint" in r.err and "ghost" in r.err, str(r)
    log = kept_criu_log(a, r)
    assert log.name.startswith("c1-dump-") and first_error(log) in r.err, str(r)
    assert a.ok("logs", "--criu", "c1").out == log.read_text()
    b.fails(3, "logs", "--criu", "c1")
    assert (a.container("c1")["state"], a.container("c1")["pid"]) == ("running", pid)
    assert b.ps() == {} and LayerStore(b.state.layers).digests() == []
    assert_no_migration_leftovers(a, b)


# ---------------------------------------------------------------------------------------------
# 13: STARTED moves with the container


def test_started_moves_with_the_container(two):
    a, b = two["host-a"], two["host-b"]
    start_counter(two)
    started = a.record("c1")["started"]
    assert started
    two.move_json("host-a", "c1", "host-b", mode="copy")
    assert b.container("c1")["started"] == started
    two.move_json("host-b", "c1", "host-a", mode="lazy")
    assert a.container("c1")["started"] == started


# the process keeps one number in memory and in a file it rewrites in place (same inode, same
# size) a hundred times a second; any run where the file it finds is not the one it last wrote
# prints CHECK: so an upper-dir sync that misses a same-size, same-second change shows
REWRITER = ('i=0; printf "%08d\\n" 0 > /n; while true; do read v < /n; '
            '[ "$v" = "$(printf %08d $i)" ] || echo "CHECK file=$v memory=$i"; '
            'i=$((i+1)); printf "%08d\\n" $i > /n; [ $((i % 20)) = 0 ] && echo $((i / 20)); usleep 10000; done')


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_a_file_rewritten_in_place_many_times_a_second_arrives_as_last_written(two, mode):
    a, b = two["host-a"], two["host-b"]
    a.ok("run", "--name", "c1", IMAGE, "sh", "-c", REWRITER)
    two.record("host-a", "c1")
    a.wait_count("c1", 5)
    for src, dst in (("host-a", "host-b"), ("host-b", "host-a"), ("host-a", "host-b")):
        r = two.move(src, "c1", dst, mode=mode)
        assert r.rc == 0, str(r)
        node = two[dst]
        node.wait_count("c1", len(counter_numbers(node.logs("c1"))) + 3)
        assert "CHECK" not in node.logs("c1"), node.logs("c1")[-500:]
    assert_consecutive(counter_numbers(b.logs("c1")))
    assert "c1" not in a.ps()


# a 3 MB file written anew without pause: in every freeze it has changed since the upper sync
BIG_REWRITER = ('i=0; while true; do i=$((i+1)); { head -c 3000000 /dev/zero; echo; echo $i; } > /big.new; '
                'mv /big.new /big; echo $i; done')


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_files_changed_past_the_inline_limit_go_by_rsync_and_arrive_as_last_written(two, mode):
    """The frozen final sync sends the upper dir's changes in one agent message when small; 3 MB
    changed goes by rsync instead (its note says so), and arrives whole."""
    a, b = two["host-a"], two["host-b"]
    a.ok("run", "--name", "c1", IMAGE, "sh", "-c", BIG_REWRITER)
    a.wait_count("c1", 3)
    stats = two.move_json("host-a", "c1", "host-b", mode=mode)
    assert any(n.startswith("final sync by rsync: ") for n in stats["notes"]), stats
    assert stats["bytes"]["upper"] > 3_000_000, stats
    # the file the move found complete is whole on host-b, and the loop goes on writing it there
    zeros = hashlib.md5(bytes(3_000_000)).hexdigest()
    check = (f'n=$(tail -n 1 /big); [ $(wc -c < /big) = $((3000002 + ${{#n}})) ] && '
             f'[ "$(head -c 3000000 /big | md5sum)" = "{zeros}  -" ] && echo "$n"')
    first = int(b.ok("exec", "c1", "sh", "-c", check).out)
    b.wait_count("c1", counter_numbers(b.logs("c1"))[-1] + 2)
    assert int(b.ok("exec", "c1", "sh", "-c", check).out) > first


MMAP_COUNTER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>
/* counts in a file it maps shared and writable: after the first write the kernel does not
   touch the file's ctime again until writeback cleans the page (tens of seconds) */
int main(void) {
    int fd = open("/counter", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096) < 0) return 1;
    volatile unsigned long *shared = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shared == MAP_FAILED) return 1;
    unsigned long mine = 0;
    for (;;) {
        if (shared[0] != mine) { printf("CHECK file=%lu memory=%lu\n", shared[0], mine); fflush(stdout); return 3; }
        shared[0] = ++mine;
        if (mine % 100 == 0) { printf("%lu\n", mine / 100); fflush(stdout); }
        usleep(1000);
    }
}
"""


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_a_file_written_through_a_shared_mapping_arrives_as_last_written(two, tmp_path, mode):
    """Its ctime stays as it was since the upper dir was walked: the frozen sync sends it because
    the frozen process maps it shared and writable."""
    a, b = two["host-a"], two["host-b"]
    program = static_program(tmp_path, "mmapcounter", MMAP_COUNTER_C)
    build_image(tmp_path / "mmap.tar", {**busybox_layer(), "bin/mmapcounter": program}, fmt="oci-archive",
                name="mmapcounter:latest", config={"Cmd": ["/bin/mmapcounter"]})
    a.ok("image", "import", tmp_path / "mmap.tar")
    a.ok("run", "--name", "c1", "mmapcounter")
    a.wait_count("c1", 15)  # its first write (and the file's ctime) well over a second before the move
    two.move_json("host-a", "c1", "host-b", mode=mode)
    b.wait_count("c1", counter_numbers(b.logs("c1"))[-1] + 5)
    assert "CHECK" not in b.logs("c1"), b.logs("c1")[-300:]
    assert b.container("c1")["state"] == "running"


def _source_step_done(node, step: str) -> bool:
    db = sqlite3.connect(str(node.state.db), timeout=30)
    try:
        return db.execute("SELECT 1 FROM journal WHERE role=? AND step=? AND event='done'",
                          (journal.SOURCE, step)).fetchone() is not None
    finally:
        db.close()


def test_a_migration_that_meets_a_snapshot_under_way_waits_for_it_then_moves(two):
    """A snapshot (a scheduled one, most often) that begins while a migration makes its
    preflight ends in a moment: the migration waits for it and takes the container, instead
    of being refused "it is checkpointing" (which a drain under scheduled snapshots met)."""
    a = two["host-a"]
    before = start_counter(two)
    # a snapshot held half-way, in CRIU's hook, until its stdin ends
    snap = subprocess.Popen([*a.prefix, *_cli(), "checkpoint", "--leave-running", "c1"], cwd=a.work,
                            env={**a.env, "MIGRATE_FAULTS": "checkpoint-written:hang"}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    move = None
    try:
        wait_until(lambda: a.record("c1")["state"] == "checkpointing", 30, "the snapshot to begin")
        move = subprocess.Popen([*a.prefix, *_cli(), "c1", "host-b", "--mode", "copy"], env=a.env, cwd=a.work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: _source_step_done(a, "preflight") or move.poll() is not None, 60,
                   "the migration's preflight")
        time.sleep(0.5)
        assert move.poll() is None, move.communicate()  # waiting, not refused
        assert a.record("c1")["state"] == "checkpointing"
        _, err = snap.communicate(timeout=60)  # its stdin ends: the snapshot goes on
        assert snap.returncode == 0, err
        _, err = move.communicate(timeout=120)
        assert move.returncode == 0, err
    finally:
        for proc in (snap, move):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "c1" not in a.ps()
    assert_counts_on(two, "host-b", "c1", before)
