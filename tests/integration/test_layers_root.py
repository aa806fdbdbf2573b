"""What only root can do: real overlayfs whiteouts, ownership and device nodes, checked through a
real overlay mount."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from runtime.imagebuild import FileSpec, build_image, busybox_layer, make_layer, opaque, whiteout
from migrate.agent import Agent
from runtime.container import Runtime
from runtime.errors import ImageError
from runtime.images import import_image
from runtime.layers import LayerStore
from runtime.paths import StateRoot

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

BASE = {
    "etc": FileSpec.directory(),
    "etc/passwd": b"root:x:0:0::/:/bin/sh\n",
    "etc/keep": b"keep",
    "bin": FileSpec.directory(),
    "bin/old": b"old",
}
TOP = {whiteout("etc/passwd"): b"", opaque("bin"): b"", "bin/new": b"new"}


@pytest.fixture
def image(tmp_path):
    store = LayerStore(tmp_path / "layers")
    build_image(tmp_path / "image.tar", layers=[BASE, TOP], fmt="oci-archive")
    return store, import_image(tmp_path / "image.tar", store)


def test_whiteouts_become_overlayfs_whiteouts(image):
    store, img = image
    top = store.path_of(img.layers[1])
    st = os.lstat(top / "etc/passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(top / "bin", "trusted.overlay.opaque") == b"y"
    assert not (top / "etc/.wh.passwd").exists() and not (top / "bin/.wh..wh..opq").exists()


def test_overlay_mount_hides_what_the_whiteouts_delete(image, tmp_path):
    store, img = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lower = ":".join(str(store.path_of(d)) for d in reversed(img.layers))  # topmost first
    r = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"overlayfs cannot be mounted here: {r.stderr.strip()}")
    try:
        assert sorted(os.listdir(mnt / "etc")) == ["keep"]
        assert sorted(os.listdir(mnt / "bin")) == ["new"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_owner_setuid_and_device_nodes_are_preserved(tmp_path):
    store = LayerStore(tmp_path / "layers")
    files = {
        "home": FileSpec.directory(0o750, uid=1000, gid=1000),
        "home/su": FileSpec(data=b"#!", mode=0o4755, uid=1000, gid=50),
        "home/link": FileSpec.symlink("su", uid=1001, gid=1001),
        "dev": FileSpec.directory(),
        "dev/null": FileSpec("chardev", mode=0o666, major=1, minor=3),
        "dev/loop9": FileSpec("blockdev", mode=0o660, major=7, minor=9, gid=6),
    }
    build_image(tmp_path / "image", files, fmt="oci-layout")
    root = store.path_of(import_image(tmp_path / "image", store).layers[0])
    st = (root / "home").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o750)
    st = (root / "home/su").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 50, 0o4755)
    st = os.lstat(root / "home/link")
    assert (st.st_uid, st.st_gid) == (1001, 1001)
    st = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(root / "dev/loop9")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 9) and st.st_gid == 6


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="no /bin/busybox (Debian: busybox-static)")
def test_busybox_image_runs_in_a_chroot(tmp_path):
    store = LayerStore(tmp_path / "layers")
    build_image(tmp_path / "bb.tar", busybox_layer(), fmt="docker-archive", config={"Cmd": ["sh"]})
    root = store.path_of(import_image(tmp_path / "bb.tar", store).layers[0])
    r = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "echo $(cat /etc/passwd | cut -d: -f1)"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr


def test_a_blob_sent_under_a_layer_s_digest_is_refused_and_genuine_ones_are_extracted_on_the_target(image, tmp_path):
    """The target side of a migration, in process: the source's rsync leaves the layers' blobs in
    staging. One that is not the layer's (a tampered password file) is refused and nothing is
    adopted; the genuine ones are verified and extracted there, whiteouts and all."""
    source, img = image
    target = Runtime(StateRoot(tmp_path / "target"))
    agent = Agent(target)
    tampered = make_layer({**BASE, "etc/passwd": b"root::0:0::/:/bin/sh\n"}, "gzip")  # no password
    try:
        for migration, blobs in (("0123456789abcdef", {img.layers[0]: tampered}), ("fedcba9876543210", {})):
            prep = agent.handle({"op": "prepare", "name": "c1", "migration": migration, "volumes": []})
            for d in img.layers:
                (Path(prep["staging"]) / d.split(":")[1]).write_bytes(blobs.get(d) or source.blob_of(d).read_bytes())
            if blobs:
                with pytest.raises(ImageError, match=f"layer {img.layers[0]}: digest mismatch"):
                    agent.handle({"op": "adopt_layers", "name": "c1", "digests": list(img.layers)})
                agent.abort()  # the controller's rollback
                assert target.layers.digests() == [] and not Path(prep["staging"]).exists()
                continue
            assert agent.handle({"op": "adopt_layers", "name": "c1", "digests": list(img.layers)}) == {"adopted": 2}
        genuine = target.layers.path_of(img.layers[0])
        assert (genuine / "etc/passwd").read_bytes() == BASE["etc/passwd"]
        assert os.getxattr(target.layers.path_of(img.layers[1]) / "bin", "trusted.overlay.opaque") == b"y"
        assert [target.layers.blob_of(d).read_bytes() for d in img.layers] == [
            source.blob_of(d).read_bytes() for d in img.layers]
    finally:
        agent.abort()
        target.close()
