"""migrate.treesync on real trees: what changes() finds, and packets through JSON that make the copy equal."""

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
import time

import pytest

from migrate.treesync import RACY_NS, Walk, changes, full, pack, unpack, walk
from runtime.errors import InvalidInput

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown, device nodes and trusted.* xattrs need root")


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value: (tag, perm, id) entries in the kernel's order."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


UNDEFINED_ID = 0xFFFFFFFF
ACL_READER = acl((0x01, 6, UNDEFINED_ID), (0x02, 4, 1000), (0x04, 4, UNDEFINED_ID), (0x10, 4, UNDEFINED_ID),
                 (0x20, 0, UNDEFINED_ID))
ACL_WRITER = acl((0x01, 6, UNDEFINED_ID), (0x02, 6, 1000), (0x04, 4, UNDEFINED_ID), (0x10, 6, UNDEFINED_ID),
                 (0x20, 0, UNDEFINED_ID))


def snapshot(root) -> tuple[dict, list]:
    """Everything rsync -aHAX --numeric-ids keeps of the entries below root, and which names share an inode."""
    tree, names_of = {}, {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = st.st_rdev
            rel = os.path.relpath(path, root)
            tree[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                         xattrs, content)
            if not stat.S_ISDIR(st.st_mode):
                names_of.setdefault(st.st_ino, []).append(rel)
    return tree, sorted(sorted(names) for names in names_of.values() if len(names) > 1)


def through_json(packet: dict) -> dict:
    return json.loads(json.dumps(packet))


def settled(tree_walk: Walk) -> Walk:
    """The walk as if it had started long after every entry's last change: nothing in it is racy."""
    return Walk(tree_walk.entries, time.time_ns() + 100 * RACY_NS)


def populate(root) -> None:
    (root / "sub").mkdir(parents=True)
    for name in ("keep", "sub/keep", "gone", "f2d", "modes", "owned", "xattrs", "hard", "linked1"):
        (root / name).write_bytes(name.encode() * 3)
    os.link(root / "linked1", root / "linked2")
    (root / "rewrite").write_bytes(b"aaaa")
    (root / "append").write_bytes(b"start")
    for folder in ("gonedir/deep", "d2f", "opaque", "was-opaque", "moved/inner"):
        (root / folder).mkdir(parents=True)
        (root / folder / "x").write_bytes(b"x")
    os.setxattr(root / "xattrs", "user.gone", b"1")
    os.setxattr(root / "was-opaque", "trusted.overlay.opaque", b"y")
    (root / "acl").write_bytes(b"")
    os.setxattr(root / "acl", "system.posix_acl_access", ACL_READER)
    (root / "suid").write_bytes(b"#!")
    os.chown(root / "suid", 1000, 1000)
    os.chmod(root / "suid", 0o4755)
    os.symlink("keep", root / "sub/ln")
    os.mknod(root / "sock", stat.S_IFSOCK | 0o644)
    os.mknod(root / "old-whiteout", stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 1))


@pytest.fixture
def trees(tmp_path):
    """A populated source and the copy rsync makes of it, as the other host has it before the freeze.
    --modify-window=-1 as migrate.transfer runs it: comparing whole seconds, rsync would leave the
    mtime of a dir or symlink it has just made in the same second as it was."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    populate(src)
    subprocess.run(["rsync", "-aHAX", "--numeric-ids", "--modify-window=-1", f"{src}/", f"{dst}/"], check=True)
    assert snapshot(src) == snapshot(dst)
    return src, dst


def change_everything(src) -> None:
    rewrite = src / "rewrite"
    mtime = os.stat(rewrite).st_mtime_ns
    rewrite.write_bytes(b"bbbb")
    os.utime(rewrite, ns=(mtime, mtime))  # same size and mtime: only ctime tells
    with open(src / "append", "ab") as f:
        f.write(b" and more")
    (src / "new").write_bytes(b"new")
    (src / "newdir/deeper").mkdir(parents=True)
    (src / "newdir/deeper/f").write_bytes(b"f")
    os.symlink("/nowhere", src / "newdir/ln")
    os.setxattr(src / "newdir/ln", "trusted.on-a-symlink", b"1", follow_symlinks=False)
    (src / "gone").unlink()
    shutil.rmtree(src / "gonedir")
    (src / "f2d").unlink()
    (src / "f2d").mkdir()
    (src / "f2d/child").write_bytes(b"c")
    (src / "d2f/x").unlink()
    (src / "d2f").rmdir()
    (src / "d2f").write_bytes(b"was a dir")
    os.chmod(src / "modes", 0o640)
    os.chown(src / "owned", 1234, 5678)
    os.setxattr(src / "xattrs", "user.added", b"\x00\xffbinary")
    os.removexattr(src / "xattrs", "user.gone")
    os.setxattr(src / "acl", "system.posix_acl_access", ACL_WRITER)
    os.setxattr(src / "opaque", "trusted.overlay.opaque", b"y")
    os.removexattr(src / "was-opaque", "trusted.overlay.opaque")
    os.mknod(src / "sub/whiteout", stat.S_IFCHR, os.makedev(0, 0))
    os.mkfifo(src / "fifo", 0o620)
    os.link(src / "hard", src / "sub/hard-too")
    os.rename(src / "moved", src / "renamed")


def test_changes_since_the_walk_make_the_copy_equal(trees):
    src, dst = trees
    before = settled(walk(src))
    change_everything(src)

    found = changes(before, src)

    assert {"keep", "sub/keep", "sub/ln", "linked1", "suid", "sock"}.isdisjoint(found.changed)
    resent = {"rewrite", "append", "modes", "owned", "xattrs", "acl", "opaque", "was-opaque", "hard", "sub/hard-too"}
    assert resent <= set(found.changed)
    assert set(found.removed) == {"gone", "gonedir", "f2d", "d2f", "moved"}
    assert found.changed.index("newdir") < found.changed.index("newdir/deeper") < found.changed.index("newdir/deeper/f")
    packet = through_json(pack(src, found.changed, found.removed))
    assert {"path": "sub/hard-too", "link": "hard"} in packet["entries"]

    unpack(dst, packet)

    assert snapshot(dst) == snapshot(src)
    assert ["hard", "sub/hard-too"] in snapshot(dst)[1]


def test_setuid_survives_the_chown(trees):
    src, dst = trees
    before = settled(walk(src))
    os.chown(src / "suid", 1001, 1001)  # clears the setuid bit
    os.chmod(src / "suid", 0o6750)

    found = changes(before, src)
    unpack(dst, through_json(pack(src, found.changed, found.removed)))

    assert stat.S_IMODE(os.stat(dst / "suid").st_mode) == 0o6750
    assert snapshot(dst) == snapshot(src)


def test_a_rewrite_in_place_keeps_its_folders_mtime(trees):
    src, dst = trees
    before = settled(walk(src))
    with open(src / "sub/keep", "r+b") as f:
        f.write(b"SUB")

    found = changes(before, src)
    assert found.changed == ("sub/keep",)
    assert found.data_bytes == os.stat(src / "sub/keep").st_size
    unpack(dst, through_json(pack(src, found.changed)))  # replaces the file: the folder's listing changes

    assert snapshot(dst) == snapshot(src)


def test_racy_entries_are_resent(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    first = walk(tmp_path)

    assert changes(Walk(first.entries, first.started_ns), tmp_path).changed == ("f",)  # changed just before
    assert changes(Walk(first.entries, first.started_ns - 100 * RACY_NS), tmp_path).changed == ("f",)  # after
    assert changes(settled(first), tmp_path).changed == ()


def test_always_forces_a_path_in(tmp_path):
    (tmp_path / "mapped").write_bytes(b"x")
    (tmp_path / "other").write_bytes(b"y")

    found = changes(settled(walk(tmp_path)), tmp_path, always=["mapped", "not-there"])

    assert found.changed == ("mapped",)


def test_an_unchanged_tree_sends_nothing(trees):
    src, _ = trees
    before = settled(walk(src))

    found = changes(before, src)

    assert (found.changed, found.removed, found.data_bytes) == ((), (), 0)
    assert found.now.entries == before.entries
    assert len(json.dumps(pack(src, found.changed, found.removed))) < 40


def test_vanished_paths_are_packed_as_removed(tmp_path):
    (tmp_path / "here").write_bytes(b"x")

    packet = pack(tmp_path, ["here", "vanished", "here/under-a-file"], ["gone"])

    assert [entry["path"] for entry in packet["entries"]] == ["here"]
    assert packet["removed"] == ["gone", "vanished", "here/under-a-file"]


def test_walk_of_a_missing_root_is_empty(tmp_path):
    assert walk(tmp_path / "missing").entries == {}
    assert full(tmp_path / "missing") == {"entries": [], "removed": []}


def test_full_recreates_a_tree_in_a_missing_folder(trees, tmp_path):
    src, _ = trees
    target = tmp_path / "images" / "7"

    unpack(target, through_json(full(src)))

    assert snapshot(target) == snapshot(src)


def file_entry(path: str, **fields) -> dict:
    return {"path": path, "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0, "xattrs": {},
            "data": base64.b64encode(b"x").decode(), **fields}


def dir_entry(path: str) -> dict:
    return {"path": path, "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0, "xattrs": {}}


def entries(*items: dict, removed=()) -> dict:
    return {"entries": list(items), "removed": list(removed)}


HOSTILE = {
    "parent ..": entries(file_entry("../x")),
    "absolute": entries(file_entry("/abs")),
    "inner ..": entries(file_entry("a/../b")),
    "inner .": entries(file_entry("a/./b")),
    "empty component": entries(file_entry("a//b")),
    "trailing slash": entries(file_entry("a/")),
    "empty path": entries(file_entry("")),
    "NUL": entries(file_entry("a\0b")),
    "too long": entries(file_entry("a/" * 2100 + "b")),
    "name too long": entries(file_entry("n" * 256)),
    "not encodable": entries(file_entry("\ud800")),
    "removed ..": entries(removed=["../x"]),
    "unknown type": entries(file_entry("door", type="door")),
    "missing field": entries({"path": "f", "type": "fifo"}),
    "extra field": entries(file_entry("f", target="x")),
    "bad base64": entries(file_entry("f", data="!!!")),
    "bad xattr base64": entries(file_entry("f", xattrs={"user.a": "%%"})),
    "xattr namespace": entries(file_entry("f", xattrs={"os2.a": ""})),
    "link to later": entries({"path": "h", "link": "f"}, file_entry("f")),
    "link to nothing": entries({"path": "h", "link": "nowhere"}),
    "link to a dir": entries(dir_entry("d"), {"path": "h", "link": "d"}),
    "negative uid": entries(file_entry("f", uid=-1)),
    "huge gid": entries(file_entry("f", gid=2**32)),
    "huge mode": entries(file_entry("f", mode=0o17777)),
    "huge mtime": entries(file_entry("f", mtime_ns=2**64)),
    "bool uid": entries(file_entry("f", uid=True)),
    "string mode": entries(file_entry("f", mode="644")),
    "huge rdev": entries({**dir_entry("c"), "type": "char", "rdev": [0, 2**20]}),
    "under a symlink of the packet": entries(
        {**dir_entry("esc"), "type": "symlink", "target": "/"}, file_entry("esc/x")),
    "child before parent": entries(file_entry("d/x"), dir_entry("d")),
    "repeated path": entries(file_entry("f"), file_entry("f")),
    "not a packet": [],
    "no removed": {"entries": []},
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_packet_changes_nothing(tmp_path, case):
    dst = tmp_path / "dst"
    populate(dst)
    (dst / "a").mkdir()
    before = snapshot(dst)

    with pytest.raises(InvalidInput):
        unpack(dst, through_json(HOSTILE[case]))

    assert snapshot(dst) == before


@pytest.fixture
def escape(tmp_path):
    """A tree with a symlink `esc` to a folder outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "esc")
    return root, outside


def test_nothing_is_written_through_a_symlink_of_the_tree(escape):
    root, outside = escape

    for packet in (entries(file_entry("esc/x")), entries(dir_entry("esc/d")),
                   entries(file_entry("f"), {"path": "esc/h", "link": "f"})):
        with pytest.raises(InvalidInput, match="no directory"):
            unpack(root, through_json(packet))

    assert list(outside.iterdir()) == []


def test_nothing_is_removed_through_a_symlink_of_the_tree(escape):
    root, outside = escape
    (outside / "y").write_bytes(b"keep me")

    unpack(root, entries(removed=["esc/y"]))

    assert (outside / "y").read_bytes() == b"keep me"
    assert os.path.islink(root / "esc")


def test_a_symlink_in_the_tree_is_replaced_not_followed(escape):
    root, outside = escape

    unpack(root, through_json(entries(file_entry("esc"))))

    assert (root / "esc").read_bytes() == b"x"
    assert list(outside.iterdir()) == []


def test_a_walk_counts_the_data_of_its_regular_files_once_per_inode(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/a").write_bytes(b"x" * 1000)
    os.link(tmp_path / "sub/a", tmp_path / "b")  # the same 1000 bytes
    (tmp_path / "c").write_bytes(b"y" * 24)
    os.symlink("sub/a", tmp_path / "link")
    found = walk(tmp_path)
    assert found.data_bytes() == 1024
    assert found.data_bytes(["sub", "link", "c"]) == 24
