"""The snapshot archive's manifest, its member names, the compatibility judgement and the tree
carrier, without CRIU."""

import io
import json
import os
import tarfile

import pytest

from runtime import archive
from runtime.errors import ImageError
from runtime.layers import MAX_HEADER_BYTES, extract_native_tree, native_tree_tar, tar_members

HEX = "a" * 64
LAYER = f"sha256:{'b' * 64}"


def _manifest(**over) -> dict:
    spec = {"name": "job", "image": "busybox:latest", "image_id": f"sha256:{'c' * 64}", "layers": [LAYER],
            "argv": ["sh"], "env": [], "working_dir": "/", "volumes": [],
            "limits": {"memory_bytes": None, "cpus": None, "pids": None}}
    m = {
        "format": archive.FORMAT, "version": archive.VERSION, "created": 1.0,
        "snapshot": {"id": "0123456789ab", "container": "job", "tag": None, "created": 1.0,
                     "criu_version": "4.1.1", "spec": spec},
        "host": {"arch": "x86_64", "kernel": "6.18", "hostname": "host-a", "cpu_flags": ["fpu", "sse2", "avx2"],
                 "criu_version": "4.1.1", "cpuinfo": None},
        "image": {"name": "busybox:latest", "id": spec["image_id"], "layers": [LAYER]},
        "layers": {},
        "members": [{"name": "snapshot/spec.json", "size": 10, "sha256": HEX},
                    {"name": archive.UPPER, "size": 10240, "sha256": HEX},
                    {"name": "snapshot/images/pages-1.img", "size": 4096, "sha256": HEX}],
    }
    m.update(over)
    return m


def test_a_sealed_manifest_parses_back():
    m = _manifest()
    assert archive.parse_manifest(archive.seal(m)) == {**m, "sha256": json.loads(archive.seal(m))["sha256"]}


@pytest.mark.parametrize("at", [0, 10, 200, -20, -2])
def test_any_changed_byte_of_the_manifest_is_refused(at):
    data = bytearray(archive.seal(_manifest()))
    data[at] ^= 0x01
    with pytest.raises(ImageError):
        archive.parse_manifest(bytes(data))


def test_a_resealed_change_must_still_make_sense():
    members = [{"name": "../../etc/passwd", "size": 1, "sha256": HEX}]
    with pytest.raises(ImageError, match="unexpected member"):
        archive.parse_manifest(archive.seal(_manifest(members=members)))
    with pytest.raises(ImageError, match="format version"):
        archive.parse_manifest(archive.seal(_manifest(version=99)))
    with pytest.raises(ImageError, match="no spec"):
        archive.parse_manifest(archive.seal(_manifest(members=_manifest()["members"][1:])))
    twice = _manifest()["members"] + [{"name": archive.UPPER, "size": 1, "sha256": HEX}]
    with pytest.raises(ImageError, match="twice"):
        archive.parse_manifest(archive.seal(_manifest(members=twice)))
    carried = _manifest()["members"] + [{"name": f"layers/{'d' * 64}", "size": 1, "sha256": HEX}]
    with pytest.raises(ImageError, match="layers do not match"):  # a layer the spec does not use
        archive.parse_manifest(archive.seal(_manifest(members=carried, layers={f"sha256:{'d' * 64}": {
            "size": 1, "diff_id": f"sha256:{HEX}"}})))
    bad_name = _manifest()
    bad_name["snapshot"]["container"] = "../x"
    with pytest.raises(ImageError, match="garbles"):
        archive.parse_manifest(archive.seal(bad_name))
    with pytest.raises(ImageError, match="not a snapshot archive"):
        archive.parse_manifest(b'{"format": "something else"}')


def test_a_version_1_archive_is_read_unless_it_carries_layers_as_trees():
    assert archive.parse_manifest(archive.seal(_manifest(version=1)))["version"] == 1
    carried = _manifest()["members"] + [{"name": f"layers/{LAYER[7:]}.tar", "size": 1, "sha256": HEX}]
    with pytest.raises(ImageError, match="version-1 archive carries its layers as trees"):
        archive.parse_manifest(archive.seal(_manifest(version=1, members=carried, layers={LAYER: {
            "size": 1, "diff_id": f"sha256:{HEX}"}})))


@pytest.mark.parametrize("name", ["snapshot/images/../../x", "snapshot/images/.hidden", "/snapshot/spec.json",
                                  "snapshot/images/a/b", "snapshot/owner.json", "layers/abc",
                                  f"layers/{'b' * 64}.tar", "upper/x"])
def test_member_names_are_fixed(name):
    with pytest.raises(ImageError):
        archive.member_kind(name)


def test_member_kinds():
    assert archive.member_kind("snapshot/images/pages-1.img") == ("file", "images/pages-1.img")
    assert archive.member_kind("snapshot/container.log") == ("file", "container.log")
    assert archive.member_kind(archive.UPPER) == ("upper", "")
    assert archive.member_kind(f"layers/{'b' * 64}") == ("layer", LAYER)


LOCAL = {"arch": "x86_64", "criu_version": "4.2.1", "cpu_flags": ["fpu", "sse2", "avx2", "avx512f"]}


def test_same_or_newer_criu_same_arch_and_an_accepted_cpu_pass():
    assert archive.judge(_manifest(), LOCAL, (True, "")) == []
    assert archive.judge(_manifest(), LOCAL, None) == []  # no CRIU cpuinfo recorded: CRIU's restore judges


def test_older_criu_other_arch_and_a_lacking_cpu_are_each_named():
    problems = archive.judge(_manifest(), {"arch": "aarch64", "criu_version": "4.1", "cpu_flags": ["fpu"]},
                             (False, "cpu: avx2 missing"))
    assert len(problems) == 3
    assert "x86_64" in problems[0] and "aarch64" in problems[0]
    assert "4.1.1" in problems[1] and "older" in problems[1]
    assert "avx2" in problems[2] and "host-a" in problems[2]


def test_a_cpu_refusal_without_missing_flags_quotes_criu():
    problems = archive.judge(_manifest(), LOCAL, (False, "Error (criu/cpu.c): xsave features differ"))
    assert problems == ["its processes ran on a CPU of host-a that this one cannot stand in for: "
                        "Error (criu/cpu.c): xsave features differ"]


def test_cpu_flags_of_the_first_cpu():
    text = "processor\t: 0\nflags\t\t: sse2 fpu avx\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert archive.cpu_flags(text) == ["avx", "fpu", "sse2"]
    assert archive.cpu_flags("") == []


def test_a_tree_travels_with_links_and_modes(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("data")
    os.chmod(src / "d" / "f", 0o640)
    os.link(src / "d" / "f", src / "hard")
    os.symlink("/etc/passwd", src / "link")
    os.symlink("d", src / "dirlink")
    buf = io.BytesIO()
    native_tree_tar(src, buf)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_native_tree(io.BytesIO(buf.getvalue()), dest, "test")
    assert (dest / "d" / "f").read_text() == "data"
    assert (dest / "d" / "f").stat().st_mode & 0o777 == 0o640
    assert os.path.samefile(dest / "hard", dest / "d" / "f")
    assert os.readlink(dest / "link") == "/etc/passwd" and os.readlink(dest / "dirlink") == "d"


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted.* xattrs need root")
def test_a_tree_keeps_whiteouts_and_opaque_dirs_but_no_other_device(tmp_path):
    src = tmp_path / "src"
    (src / "opaque").mkdir(parents=True)
    os.setxattr(src / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(src / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    buf = io.BytesIO()
    native_tree_tar(src, buf)
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_native_tree(io.BytesIO(buf.getvalue()), dest, "test")
    assert os.getxattr(dest / "opaque", "trusted.overlay.opaque") == b"y"
    assert os.major(os.lstat(dest / "gone").st_rdev) == 0 and (os.lstat(dest / "gone").st_mode & 0o170000) == 0o020000

    os.mknod(src / "null", 0o600 | 0o020000, os.makedev(1, 3))
    buf = io.BytesIO()
    native_tree_tar(src, buf)
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    with pytest.raises(ImageError, match="only overlay whiteouts"):
        extract_native_tree(io.BytesIO(buf.getvalue()), dest2, "test")


def test_an_oversized_tar_header_is_refused_before_it_is_read_whole():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x" * (MAX_HEADER_BYTES + 1000))  # a pax path header larger than the bound
        tar.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    with pytest.raises(ImageError, match="header is larger"):
        for _ in tar_members(buf, "test"):
            pass
