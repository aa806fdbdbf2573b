"""Hostile archives against the import limits (REVIEW S3, S4): each is refused within seconds, with
bounded memory, by one line (ImageError, exit 5), and leaves nothing in the store."""

import gzip
import io
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from runtime import images, layers
from runtime.errors import ImageError
from runtime.imagebuild import build_image
from runtime.images import import_image
from runtime.layers import LayerStore, OverlayWhiteouts, tar_members

pytestmark = pytest.mark.timeout(60)
BASE = {"etc/passwd": b"root:x:0:0::/:/bin/sh\n"}


class NoWhiteouts(OverlayWhiteouts):
    def whiteout(self, dir_fd, name, member):
        pass

    def opaque(self, dir_fd, member):
        pass


@pytest.fixture
def store(tmp_path):
    return LayerStore(tmp_path / "layers", whiteouts=NoWhiteouts())


def layer_tar(members, fmt=tarfile.GNU_FORMAT) -> bytes:
    """A layer of (TarInfo, data) pairs, gzip-compressed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data else None)
    return gzip.compress(buf.getvalue(), compresslevel=1)


def files(*sizes: int) -> list:
    return [(tarfile.TarInfo(f"f{i}"), b"x" * n) for i, n in enumerate(sizes)]


def layout_with_layer(tmp_path: Path, blob: bytes) -> tuple[Path, Path]:
    """An OCI layout whose layer blob is replaced by `blob` (the limits trip before the digest is
    checked, at the end of the layer); returns the layout and the blob's path."""
    layout = tmp_path / "layout"
    built = build_image(layout, BASE, fmt="oci-layout")
    path = layout / "blobs/sha256" / built.layers[0].removeprefix("sha256:")
    path.write_bytes(blob)
    return layout, path


def refused(source: Path, store: LayerStore, message: str) -> str:
    """Import `source`: it must fail within seconds, in little memory, with one line matching
    `message`, and leave no layer, sidecar or temporary file in the store."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ImageError, match=message) as e:
            import_image(source, store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 20
    assert peak < 24 << 20, f"peak memory {peak} bytes"
    assert "\n" not in str(e.value) and e.value.exit_code == 5
    assert store.digests() == []
    for sub in ("sha256", "tmp"):
        assert not (store.path / sub).exists() or not any((store.path / sub).iterdir())
    return str(e.value)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_tar_bomb_of_long_names(tmp_path, store, fmt):
    bomb = [(tarfile.TarInfo("a" * (64 << 20)), b"")]  # a 64 MiB GNU long-name or pax header
    layout, _ = layout_with_layer(tmp_path, layer_tar(bomb, fmt))
    refused(layout, store, "a tar header is larger than")


def test_a_long_name_bomb_in_a_compressed_outer_archive(tmp_path, store):
    (tmp_path / "image.tar.gz").write_bytes(layer_tar([(tarfile.TarInfo("a" * (64 << 20)), b"")]))
    refused(tmp_path / "image.tar.gz", store, "a tar header is larger than")


def test_a_sparse_member_counts_at_the_size_it_expands_to(tmp_path, store):
    sparse = tarfile.TarInfo("holes")
    sparse.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(1 << 40)}  # 1 TiB of zeros
    layout, _ = layout_with_layer(tmp_path, layer_tar([(sparse, b"")], tarfile.PAX_FORMAT))
    refused(layout, store, rf"'holes' is {1 << 40} bytes \(sparse\), more than the")


def test_a_million_empty_members(tmp_path, store, monkeypatch):
    monkeypatch.setattr(layers, "MAX_MEMBERS", 1000)
    layout, _ = layout_with_layer(tmp_path, layer_tar(files(*[0] * 1001)))
    refused(layout, store, "more than 1000 members")


class RepeatedHeaders:
    """A tar stream of `count` empty members, made up as it is read: no file holds it."""

    def __init__(self, count: int):
        self._header = tarfile.TarInfo("f").tobuf()
        self._left = count
        self._tail = bytes(1024)

    def read(self, n: int) -> bytes:
        take = min(n // 512, self._left)
        self._left -= take
        if take:
            return self._header * take
        tail, self._tail = self._tail[:n], self._tail[n:]
        return tail


def test_the_default_member_bound_is_a_million():
    with pytest.raises(ImageError, match="more than 1000000 members"):
        for _ in tar_members(RepeatedHeaders(layers.MAX_MEMBERS + 1), "stream"):
            pass


def test_a_symlinked_blob_in_a_layout(tmp_path, store):
    layout, blob = layout_with_layer(tmp_path, b"")
    blob.unlink()
    blob.symlink_to("/dev/zero")
    refused(layout, store, "is a symlink or lies under a symlink")


def test_a_symlinked_blobs_directory_in_a_layout(tmp_path, store):
    layout, _ = layout_with_layer(tmp_path, b"")
    os.rename(layout / "blobs", tmp_path / "elsewhere")
    (layout / "blobs").symlink_to(tmp_path / "elsewhere")
    refused(layout, store, "is a symlink or lies under a symlink")


def test_a_blob_that_is_a_fifo(tmp_path, store):
    layout, blob = layout_with_layer(tmp_path, b"")
    blob.unlink()
    os.mkfifo(blob)
    refused(layout, store, "is not a regular file")


@pytest.mark.parametrize("cap, sizes, message", [
    ("MAX_MEMBER_BYTES", (2000,), "'f0' is 2000 bytes, more than the 1500 a file may have"),
    ("MAX_IMPORT_BYTES", (1000, 1000), "the image expands to more than 1500 bytes"),
])
def test_a_member_or_the_total_beyond_the_caps(tmp_path, store, monkeypatch, cap, sizes, message):
    monkeypatch.setattr(layers, cap, 1500)
    layout, _ = layout_with_layer(tmp_path, layer_tar(files(*sizes)))
    refused(layout, store, message)


@pytest.mark.parametrize("free", [(1500, None), (1 << 40, 2)])  # what an import may use, the reserve left
def test_not_enough_free_space(tmp_path, store, monkeypatch, free):
    monkeypatch.setattr(layers, "free_space", lambda path: free)
    layout, _ = layout_with_layer(tmp_path, layer_tar(files(1000, 1000, 0)))
    refused(layout, store, "not enough free space in .*an import leaves")


def test_a_compressed_outer_archive_counts_against_free_space(tmp_path, store, monkeypatch):
    build_image(tmp_path / "image.tar", BASE, fmt="oci-archive")
    (tmp_path / "image.tar.gz").write_bytes(gzip.compress((tmp_path / "image.tar").read_bytes()))
    monkeypatch.setattr(layers, "free_space", lambda path: (1000, None))
    refused(tmp_path / "image.tar.gz", store, "the decompressed archive: not enough free space")


def test_a_compressed_outer_archive_is_decompressed_once(tmp_path, store, monkeypatch):
    archive = tmp_path / "image.tar"
    build_image(archive, layers=[BASE, {"a": os.urandom(300_000)}, {"b": os.urandom(300_000)}], fmt="oci-archive")
    (tmp_path / "image.tar.gz").write_bytes(gzip.compress(archive.read_bytes()))
    decompressed = []

    def counting_open(f):
        z = gzip.open(f)
        read = z.read
        z.read = lambda n=-1: decompressed.append(len(data := read(n))) or data
        return z

    monkeypatch.setitem(images._OUTER_CODECS, b"\x1f\x8b", counting_open)
    assert len(import_image(tmp_path / "image.tar.gz", store).layers) == 3
    assert sum(decompressed) == archive.stat().st_size
    assert not any((store.path / "tmp").iterdir())


def test_the_reserve_is_a_share_of_a_small_disk_and_at_most_its_cap(tmp_path, monkeypatch):
    class Vfs:
        f_frsize, f_files = 4096, 1_000_000

        def __init__(self, blocks: int, avail: int, favail: int):
            self.f_blocks, self.f_bavail, self.f_favail = blocks, avail, favail

    small = Vfs(blocks=6144, avail=3000, favail=900_000)  # 24 MiB: 5% is about 1.2 MiB
    monkeypatch.setattr(os, "statvfs", lambda path: small)
    assert layers.free_space(tmp_path) == (3000 * 4096 - 6144 * 4096 // 20, 900_000 - 10_000)
    big = Vfs(blocks=100 << 20, avail=50 << 20, favail=5)  # 400 GiB: 1 GiB kept; inodes nearly gone
    monkeypatch.setattr(os, "statvfs", lambda path: big)
    assert layers.free_space(tmp_path) == ((50 << 20) * 4096 - (1 << 30), 0)
