"""Snapshot archives through the real CLI and real CRIU: `migrate export` on one host,
`migrate import` on another (two state roots of their own, as two hosts have)."""

import os
import re
import shutil
import stat

import pytest
import zstandard
from clihost import COUNTER, IMAGE, assert_consecutive, counter_numbers, record_timing

from runtime.imagebuild import make_layer
from runtime.layers import LayerStore

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _export(h, *args: str) -> tuple[str, "os.PathLike"]:
    """Export from h into its work folder; returns the snapshot id and the archive."""
    out = h.work / "snap.migrate"
    r = h.ok("export", *args, "-o", out)
    m = re.fullmatch(r"exported snapshot ([0-9a-f]{12}) of \S+ to \S+ \(.+\)", r.out.strip())
    assert m, str(r)
    st = out.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    record_timing("archive-export", seconds=f"{r.seconds:.2f}", bytes=st.st_size)
    return m.group(1), out


def _carry(archive, dst) -> "os.PathLike":
    """The file copied to the other host, as scp would."""
    copy = dst.work / archive.name
    shutil.copyfile(archive, copy)
    return copy


def _imported(r) -> str:
    m = re.match(r"imported snapshot ([0-9a-f]{12}) of (\S+)", r.out)
    assert m, str(r)
    return m.group(1)


def test_running_counter_exported_and_started_on_another_host(bb, other, busybox_archives):
    other.import_busybox(busybox_archives["docker-archive"])
    bb.ok("run", "--name", "job", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("job", 5)

    r = bb.run("export", "job", "-o", bb.work / "job.migrate")
    assert r.rc == 0, str(r)
    assert "took" in r.err and "leave-running" in r.err, str(r)  # it had no snapshot: says so
    assert bb.container("job")["state"] == "running"  # and runs on
    [snap] = bb.json("snapshots", "job")
    snap_nums = counter_numbers((bb.state.snapshot_dir(snap["id"]) / "container.log").read_text())
    assert len(snap_nums) >= 5

    archive = _carry(bb.work / "job.migrate", other)
    r = other.ok("import", archive, "--start")
    new_id = _imported(r)
    assert re.search(r"^job running \(pid \d+\)$", r.out, re.MULTILINE), str(r)
    record_timing("archive-import-start", seconds=f"{r.seconds:.2f}", bytes=archive.stat().st_size)
    after = other.wait_count("job", len(snap_nums) + 10)
    assert_consecutive(after)  # no restart from 1, no gap: the next number follows the snapshot's
    assert after[len(snap_nums)] == snap_nums[-1] + 1
    assert other.container("job")["state"] == "running"
    rows = other.json("snapshots")
    assert [(s["id"], s["container"], s["image"]) for s in rows] == [(new_id, "job", IMAGE)]
    sdir = other.state.snapshot_dir(new_id)
    for folder in (sdir, sdir / "images"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in (sdir / "images").glob("*.img"))
    bb.ok("rm", "-f", "job")
    other.ok("rm", "-f", "job")


def test_image_travels_only_when_asked(bb, other):
    bb.ok("run", "--name", "job", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("job", 3)
    bb.ok("exec", "job", "sh", "-c", "mkdir -p /data/sub && echo kept > /data/sub/f && rm -rf /etc && ln /bin/sh /sh2")
    bb.ok("checkpoint", "job")
    _, bare = _export(bb, "job")

    before = other.snapshot_of_state()
    r = other.fails(3, "import", _carry(bare, other), "--start")
    assert IMAGE in r.err and "--with-image" in r.err, str(r)
    assert other.snapshot_of_state() == before  # nothing registered, no folder left

    _, full = _export(bb, "job", "--with-image")
    r = other.ok("import", _carry(full, other), "--name", "copy", "--start")
    new_id = _imported(r)
    assert [i["name"] for i in other.json("image", "ls")] == [IMAGE]
    nums = other.wait_count("copy", 10)
    assert_consecutive(nums)
    # the upper dir came whole: files, a whiteout over the image's /etc, a hard link
    assert other.ok("exec", "copy", "cat", "/data/sub/f").out == "kept\n"
    assert other.run("exec", "copy", "ls", "/etc").rc != 0
    assert other.ok("exec", "copy", "sh", "-c", "[ /sh2 -ef /bin/sh ] || ls -i /sh2 /bin/sh").rc == 0
    assert [s["container"] for s in other.json("snapshots")] == ["copy"]
    assert other.json("snapshots")[0]["id"] == new_id
    other.ok("rm", "-f", "copy")


def test_a_carried_layer_blob_that_is_not_the_layer_s_is_refused_and_leaves_nothing(bb, other):
    """The manifest is consistent (the exporting host's blob was replaced before the export), but
    the carried blob does not hash to its layer's digest: the importing host refuses it."""
    bb.ok("run", "--name", "job", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("job", 3)
    bb.ok("checkpoint", "job")
    [digest] = LayerStore(bb.state.layers).digests()
    LayerStore(bb.state.layers).blob_of(digest).write_bytes(make_layer({"planted": b"not the layer"}, "gzip"))
    _, full = _export(bb, "job", "--with-image")

    before = other.snapshot_of_state()
    r = other.fails(5, "import", _carry(full, other), "--start")
    assert f"layer {digest}: digest mismatch" in r.err and len(r.err.strip().splitlines()) == 1, str(r)
    after = other.snapshot_of_state()
    assert {**after, "layers": []} == {**before, "layers": []}  # the store's empty folders may be made
    assert LayerStore(other.state.layers).stored() == [] and os.listdir(other.state.layers / "tmp") == []
    bb.ok("rm", "-f", "job")


@pytest.mark.parametrize("where", ["start", "frame-header", "manifest", "second-frame", "middle", "near-end", "last"])
def test_a_flipped_byte_is_refused_and_leaves_nothing(bb, other, busybox_archives, where):
    other.import_busybox(busybox_archives["docker-archive"])
    bb.ok("run", "--name", "job", IMAGE, "sh", "-c", COUNTER)
    bb.wait_count("job", 3)
    bb.ok("checkpoint", "job")
    _, archive = _export(bb, "job")
    data = bytearray(archive.read_bytes())
    rest = zstandard.ZstdDecompressor().decompressobj()
    rest.decompress(bytes(data))
    manifest_frame = len(data) - len(rest.unused_data)  # the manifest is a zstd frame of its own
    assert 0 < manifest_frame < len(data) // 2
    at = {"start": 0, "frame-header": 4, "manifest": manifest_frame // 2, "second-frame": manifest_frame + 2,
          "middle": len(data) // 2, "near-end": len(data) - 40, "last": len(data) - 1}[where]
    data[at] ^= 0x20
    damaged = other.work / "damaged.migrate"
    damaged.write_bytes(bytes(data))

    before = other.snapshot_of_state()
    r = other.fails(5, "import", damaged, "--start")
    assert "damaged" in r.err or "not a snapshot archive" in r.err, str(r)
    assert other.snapshot_of_state() == before
    assert not list(other.state.snapshots.glob(".partial-*")) if other.state.snapshots.exists() else True
    bb.ok("rm", "-f", "job")
