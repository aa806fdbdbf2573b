"""Containers are confined by default (runtime/confine.py, runtime/seccomp.py, rootfs masks) and
stay so through checkpoint and restore; `run --privileged` is not. Every check runs inside the
container, as its own init, and reports one line per attempt."""

import json
import os
import re
from pathlib import Path

import pytest
from clihost import static_program
from test_checkpoint import checkpoint, restore

from runtime import confine
from runtime.imagebuild import FileSpec, build_image, busybox_layer

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PROBE_IMAGE = "probe:latest"
CONFINED_CAPS = f"{confine.KEPT_MASK:016x}"

# Drops to uid N and runs a program; installed setuid root as /bin/euid, it prints its ids.
EUID_C = r"""
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc > 3 && strcmp(argv[1], "--as") == 0) {
        int id = atoi(argv[2]);
        if (setgroups(0, NULL) || setgid(id) || setuid(id)) { perror("drop"); return 2; }
        execv(argv[3], argv + 3);
        perror("exec");
        return 2;
    }
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    return 0;
}
"""

# `r NAME CMD...` prints "NAME rc=N output"; round N ends with "end N".
PROBE = r"""
r() { name=$1; shift; out=$("$@" 2>&1); echo "$name rc=$? $out"; }
probe() {
  echo "round $1"
  grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
  head -c 256 /dev/zero > /tmp/junk.ko
  r module insmod /tmp/junk.ko
  mkdir -p /tmp/m
  r mount mount -t tmpfs probe /tmp/m
  umount /tmp/m 2>/dev/null
  r sysctl sh -c 'echo probed > /proc/sys/kernel/hostname'
  rm -f /tmp/cdev /tmp/fifo
  r mknod mknod /tmp/cdev c 1 3
  r fifo mkfifo /tmp/fifo
  r setuid /bin/runas --as 1000 /bin/euid
  r imagedev sh -c 'echo x > /imgnull'
  r kcore sh -c 'test ! -e /proc/kcore || test ! -s /proc/kcore'
  echo "root $(grep '^overlay / ' /proc/mounts | cut -d' ' -f4)"
  echo "end $1"
}
probe 1
while [ ! -e /ctl/again ]; do sleep 0.1; done
probe 2
while true; do sleep 1; done
"""


@pytest.fixture(scope="module")
def probe_archive(tmp_path_factory) -> Path:
    """busybox, a setuid-root /bin/euid with its dropping twin /bin/runas, and a char device node."""
    d = tmp_path_factory.mktemp("probe")
    program = static_program(d, "euid", EUID_C).read_bytes()
    files = {**busybox_layer(), "bin/runas": FileSpec(data=program, mode=0o755),
             "bin/euid": FileSpec(data=program, mode=0o4755),
             "imgnull": FileSpec("chardev", mode=0o666, major=1, minor=3)}
    build_image(d / "probe.tar", files, fmt="oci-archive", name=PROBE_IMAGE, config={"Cmd": ["sh"]})
    return d / "probe.tar"


def start_probe(host, archive: Path, ctl: Path, *run_args: str) -> int:
    host.ok("image", "import", archive)
    ctl.mkdir()
    host.ok("run", "--name", "p", *run_args, "-v", f"{ctl}:/ctl", PROBE_IMAGE, "sh", "-c", PROBE)
    return host.container("p")["pid"]


def results(host, round_: int) -> dict[str, tuple[int, str]]:
    """{attempt: (exit status, output)} and {status field: value} of a round of the probe."""
    text = host.wait_log("p", lambda t: f"end {round_}\n" in t, timeout=30, what=f"probe round {round_}")
    block = text.split(f"round {round_}\n", 1)[1].split(f"end {round_}\n", 1)[0]
    out = {}
    for line in block.splitlines():
        if m := re.fullmatch(r"(\w+) rc=(\d+) ?(.*)", line):
            out[m.group(1)] = (int(m.group(2)), m.group(3))
        elif m := re.fullmatch(r"(\w+):\s+(.*)|(root) (.*)", line):
            out[m.group(1) or m.group(3)] = (0, m.group(2) or m.group(4))
    return out


def ps_name(host) -> str:
    """The NAME column of ps's one row: the name, and a marker for a privileged container."""
    header, row = host.ok("ps").out.splitlines()[:2]
    return row[:header.index("STATE")].strip()


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_confined(r: dict, pid: int) -> None:
    assert r["CapEff"][1] == r["CapBnd"][1] == CONFINED_CAPS, r
    assert (r["NoNewPrivs"][1], r["Seccomp"][1]) == ("1", "2"), r
    s = status(pid)  # the init itself, seen from the host
    assert (s["CapEff"], s["CapPrm"], s["CapBnd"], s["CapInh"], s["CapAmb"]) == (
        CONFINED_CAPS, CONFINED_CAPS, CONFINED_CAPS, "0" * 16, "0" * 16), s
    assert (s["NoNewPrivs"], s["Seccomp"]) == ("1", "2"), s
    assert r["module"][0] != 0 and "Operation not permitted" in r["module"][1], r  # seccomp, and no CAP_SYS_MODULE
    assert r["mount"][0] != 0 and "permission denied" in r["mount"][1], r
    assert r["sysctl"][0] != 0 and "Read-only file system" in r["sysctl"][1], r
    assert r["mknod"][0] != 0 and "Operation not permitted" in r["mknod"][1], r  # no CAP_MKNOD
    assert r["fifo"][0] == 0, r  # a FIFO needs no capability
    assert r["setuid"] == (0, "uid=1000 euid=1000"), r  # no_new_privs and nosuid: the setuid bit gives nothing
    assert r["imagedev"][0] != 0 and "Permission denied" in r["imagedev"][1], r  # nodev
    assert r["kcore"][0] == 0, r  # masked: absent, or /dev/null
    assert {"nosuid", "nodev"} <= set(r["root"][1].split(",")), r


def exec_status(host) -> dict[str, str]:
    text = host.ok("exec", "p", "grep", "-E", "^(CapEff|CapBnd|NoNewPrivs|Seccomp):", "/proc/self/status").out
    return dict(line.split(":\t", 1) for line in text.splitlines())


def assert_exec_confined(host) -> None:
    """What `migrate exec` runs in the container is confined as its init is."""
    assert exec_status(host) == {"CapEff": CONFINED_CAPS, "CapBnd": CONFINED_CAPS, "NoNewPrivs": "1", "Seccomp": "2"}
    r = host.run("exec", "p", "mount", "-t", "tmpfs", "x", "/tmp")
    assert r.rc != 0 and "permission denied" in r.err, str(r)
    assert host.ok("exec", "p", "/bin/runas", "--as", "1000", "/bin/euid").out == "uid=1000 euid=1000\n"


def test_a_default_container_is_confined_and_stays_so_through_checkpoint_and_restore(host, probe_archive, tmp_path):
    ctl = tmp_path / "ctl"
    pid = start_probe(host, probe_archive, ctl)
    assert host.container("p")["privileged"] is False and ps_name(host) == "p"
    assert json.loads(host.ok("inspect", "p").out)["spec"]["privileged"] is False
    assert_confined(results(host, 1), pid)
    assert_exec_confined(host)

    checkpoint(host, "p")
    pid = restore(host, "p")
    s = status(pid)
    assert (s["CapEff"], s["CapBnd"], s["NoNewPrivs"], s["Seccomp"]) == (CONFINED_CAPS, CONFINED_CAPS, "1", "2"), s
    (ctl / "again").touch()
    assert_confined(results(host, 2), pid)  # and every attempt is refused as before
    assert_exec_confined(host)


def test_privileged_container_can_do_all_of_it(host, probe_archive, tmp_path):
    pid = start_probe(host, probe_archive, tmp_path / "ctl", "--privileged")
    assert host.container("p")["privileged"] is True
    assert json.loads(host.ok("inspect", "p").out)["spec"]["privileged"] is True
    assert ps_name(host) == "p (privileged)"
    r = results(host, 1)
    own = status(os.getpid())
    s = status(pid)
    assert (s["CapEff"], s["CapBnd"], s["NoNewPrivs"], s["Seccomp"]) == (own["CapEff"], own["CapBnd"], "0", "0"), s
    assert "Operation not permitted" not in r["module"][1], r  # reaches the kernel's loader, which refuses junk
    assert r["mount"][0] == 0, r
    assert r["sysctl"][0] == 0, r  # kernel.hostname belongs to the container's own UTS namespace
    assert host.ok("exec", "p", "hostname").out == "probed\n"
    assert exec_status(host) == {"CapEff": own["CapEff"], "CapBnd": own["CapBnd"], "NoNewPrivs": "0", "Seccomp": "0"}
    assert host.ok("exec", "p", "/bin/runas", "--as", "1000", "/bin/euid").out == "uid=1000 euid=0\n"
    assert r["mknod"][0] == 0, r
    assert r["setuid"] == (0, "uid=1000 euid=0"), r
    assert r["imagedev"][0] == 0, r
    assert not {"nosuid", "nodev"} & set(r["root"][1].split(",")), r


@pytest.mark.parametrize("mode", ["copy", "lazy"])
def test_a_confined_container_migrates_and_is_still_confined_on_the_target(cluster, probe_archive, tmp_path, mode):
    c = cluster(2)
    a, b = c["host-a"], c["host-b"]
    ctl = tmp_path / "ctl"  # the hosts share this machine's files: the volume is there on both
    start_probe(a, probe_archive, ctl)
    results(a, 1)
    c.move_json("host-a", "p", "host-b", mode=mode)
    pid = b.container("p")["pid"]
    assert b.container("p")["privileged"] is False and "p" not in a.ps()
    (ctl / "again").touch()
    assert_confined(results(b, 2), pid)
