import shlex
from pathlib import Path

from migrate.hosts import HostSpec
from migrate.ssh import SSHSession
from migrate.stats import MigrationStats
from migrate.transfer import Rsync, missing_layers


def test_only_missing_layers_in_order_each_once():
    assert missing_layers(["a", "b", "a", "c"], ["b"]) == ["a", "c"]
    assert missing_layers(["a"], ["a"]) == []


def rsync() -> Rsync:
    spec = HostSpec(alias="host-b", hostname="10.0.0.3", port=2222, user="root", ssh_config="/cfg")
    return Rsync(SSHSession(spec, Path("/run/cm")))


def test_rsync_argv_rides_on_the_control_connection():
    argv = rsync().argv([Path("/x/upper")], "/root/in/", delete=True)
    assert argv[0] == "rsync" and "-aHAX" in argv and "--numeric-ids" in argv and "--delete" in argv
    assert argv[-3:] == ["--", "/x/upper", "host-b:/root/in/"]
    ssh = shlex.split(argv[argv.index("-e") + 1])
    assert ssh == rsync().session.ssh_argv()
    assert "ControlPath=/run/cm/master" in ssh and "StrictHostKeyChecking=yes" in ssh


def test_rsync_argv_keeps_hostile_paths_as_single_arguments():
    argv = rsync().argv([Path("/x/a b;rm -rf ~")], "/in/")
    assert "/x/a b;rm -rf ~" in argv


def test_stats_json():
    s = MigrationStats("c1", "host-a", "host-b")
    with s.phase("layers"):
        pass
    s.bytes["images"] = 10
    s.downtime, s.total = 0.5, 2.0
    j = s.to_json()
    assert j["bytes_total"] == 10 and set(j["bytes"]) == {"layers", "upper", "pre-copy", "images", "pages"}
    assert "layers" in j["phases_s"] and j["downtime_s"] == 0.5


def test_a_file_rewritten_within_the_same_second_with_the_same_size_is_sent_again(tmp_path):
    """What the frozen final sync relies on: rsync's quick check with our flags sees a change
    that whole-second mtimes hide (a database page rewritten in place)."""
    import os
    import subprocess

    from migrate.transfer import RSYNC_FLAGS

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    f = src / "page"

    def write(data: str, ns_in_second: int, second: int) -> None:
        f.write_text(data)
        os.utime(f, ns=(second * 10**9, second * 10**9 + ns_in_second))

    second = 1_700_000_000
    write("AAAA", 100, second)
    flags = [a for a in RSYNC_FLAGS if not a.startswith("--info")]
    subprocess.run(["rsync", *flags, f"{src}/", f"{dst}/"], check=True, capture_output=True)
    write("BBBB", 900, second)  # same size, same whole second
    subprocess.run(["rsync", *flags, f"{src}/", f"{dst}/"], check=True, capture_output=True)
    assert (dst / "page").read_text() == "BBBB"
