"""LayerStore: verification, extraction and its refusals, without root (whiteouts are recorded)."""

import io
import os
import stat

import pytest

from runtime.errors import ImageError, InvalidInput, NotFound
from runtime.imagebuild import FileSpec, digest_of, make_layer, opaque, whiteout
from runtime import layers
from runtime.layers import LayerStore, OverlayWhiteouts, parse_digest

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


class RecordingWhiteouts(OverlayWhiteouts):
    """Records what would be done, with the inode of the directory it would be done in."""

    def __init__(self):
        self.calls = []

    def whiteout(self, dir_fd, name, member):
        self.calls.append(("whiteout", os.fstat(dir_fd).st_ino, name, member))

    def opaque(self, dir_fd, member):
        self.calls.append(("opaque", os.fstat(dir_fd).st_ino, member))


@pytest.fixture
def wh():
    return RecordingWhiteouts()


@pytest.fixture
def store(tmp_path, wh):
    return LayerStore(tmp_path / "layers", whiteouts=wh)


def add(store, files, compression="gzip", media_type=GZ, **kw):
    blob = make_layer(files, compression)
    digest = digest_of(blob)
    return digest, store.add_from_stream(digest, io.BytesIO(blob), media_type, **kw)


def assert_empty(store):
    """Nothing stored and no temporary leftovers."""
    assert store.digests() == []
    for sub in ("sha256", "blobs/sha256", "tmp"):
        assert not (store.path / sub).exists() or not any((store.path / sub).iterdir())


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_add_extracts_each_compression(store, compression):
    files = {"etc": FileSpec.directory(), "etc/hosts": b"127.0.0.1 localhost\n"}
    digest, added = add(store, files, compression)
    assert added
    assert store.has(digest)
    assert store.digests() == [digest]
    assert (store.path_of(digest) / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert store.size_of(digest) == len(make_layer(files, compression))
    assert store.path_of(digest) == store.path / "sha256" / digest.removeprefix("sha256:")
    assert store.blob_of(digest).read_bytes() == make_layer(files, compression)


def test_compression_is_sniffed_not_taken_from_media_type(store):
    digest, _ = add(store, {"a": b"x"}, compression="zstd", media_type=GZ)
    assert (store.path_of(digest) / "a").read_bytes() == b"x"


def test_adding_again_verifies_but_keeps_the_first(store):
    files = {"a": b"x"}
    digest, _ = add(store, files)
    assert add(store, files) == (digest, False)
    with pytest.raises(ImageError, match="digest mismatch"):
        store.add_from_stream(digest, io.BytesIO(b"other"), GZ)
    assert (store.path_of(digest) / "a").read_bytes() == b"x"


def test_bad_digest_leaves_nothing(store):
    blob = make_layer({"a": b"x"}, "gzip")
    with pytest.raises(ImageError, match="digest mismatch"):
        store.add_from_stream(digest_of(b"something else"), io.BytesIO(blob), GZ)
    assert_empty(store)


def test_wrong_size_and_diff_id_refused(store):
    blob = make_layer({"a": b"x"}, "gzip")
    with pytest.raises(ImageError, match="bytes, the manifest says"):
        store.add_from_stream(digest_of(blob), io.BytesIO(blob), GZ, size=len(blob) + 1)
    with pytest.raises(ImageError, match="the config says"):
        store.add_from_stream(digest_of(blob), io.BytesIO(blob), GZ, diff_id=digest_of(b"no"))
    assert_empty(store)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_truncated_blob_refused(store, compression):
    blob = make_layer({"a": os.urandom(50000)}, compression)
    blob = blob[: len(blob) // 2]
    with pytest.raises(ImageError, match="corrupt or truncated|digest mismatch"):
        store.add_from_stream(digest_of(blob), io.BytesIO(blob), None)
    assert_empty(store)


def test_unknown_media_type_and_bad_digest_string(store):
    with pytest.raises(ImageError, match="unsupported media type"):
        add(store, {"a": b"x"}, media_type="application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
    with pytest.raises(InvalidInput):
        store.has("md5:abc")
    with pytest.raises(NotFound):
        store.path_of("sha256:" + "0" * 64)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda out: {"../evil": b"x"}, r"member '\.\./evil' has a '\.\.' component"),
        (lambda out: {"a/../../evil": b"x"}, "'..' component"),
        (lambda out: {"/etc/evil": b"x"}, "member '/etc/evil' has an absolute path"),
        (lambda out: {"d": FileSpec.symlink(str(out)), "d/evil": b"x"}, "member 'd/evil' would be written through 'd'"),
        (lambda out: {"d": FileSpec.symlink("../.."), "d/evil": b"x"}, "would be written through 'd'"),
        (lambda out: {"d/e": FileSpec.symlink("/"), "d/e/f/evil": b"x"}, "written through 'd/e'"),
        (lambda out: {"h": FileSpec.hardlink("../../outside/secret")}, "'..' component"),
        (lambda out: {"h": FileSpec.hardlink(f"{out}/secret")}, "absolute path"),
        (lambda out: {"h": FileSpec.hardlink("later"), "later": b"x"}, "does not link to a file extracted before it"),
        (lambda out: {"d": FileSpec.directory(), "h": FileSpec.hardlink("d")}, "does not link to a file extracted"),
        (lambda out: {"d": FileSpec.directory(), "./d": b"x"}, "would replace a directory"),
        (lambda out: {"a/.wh.": b""}, "whiteout of nothing"),
    ],
)
def test_malicious_layers_refused(store, tmp_path, make, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    with pytest.raises(ImageError, match=message):
        add(store, make(outside))
    assert_empty(store)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (tmp_path / "evil").exists() and not (tmp_path / "layers/evil").exists()


def test_error_message_is_one_line(store):
    with pytest.raises(ImageError) as e:
        add(store, {"../a\nb": b"x"})
    assert "\n" not in str(e.value)


def test_symlinks_may_point_anywhere_and_are_not_followed(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    files = {
        "up": FileSpec.symlink("../../.."),
        "abs": FileSpec.symlink(str(outside / "file")),
        "./abs": b"replaced",
        "dir": FileSpec.symlink(str(outside)),
        "./dir/": FileSpec.directory(),
        "dir/file": b"inside",
    }
    digest, _ = add(store, files)
    layer = store.path_of(digest)
    assert os.readlink(layer / "up") == "../../.."
    assert (layer / "abs").read_bytes() == b"replaced"  # symlinks are replaced, never written through
    assert (layer / "dir/file").read_bytes() == b"inside" and not (layer / "dir").is_symlink()
    assert list(outside.iterdir()) == []


def test_metadata_is_preserved(store):
    files = {
        "bin": FileSpec.directory(0o711, mtime=1000),
        "bin/tool": FileSpec(data=b"#!", mode=0o4755, mtime=2000),
        "bin/link": FileSpec.hardlink("./bin/tool"),
        "bin/sym": FileSpec.symlink("tool", mtime=3000),
        "ro": FileSpec.directory(0o555, mtime=4000),
        "ro/file": FileSpec(data=b"", mode=0o600),
        "pipe": FileSpec("fifo", mode=0o620, mtime=5000),
        "implied/deep/file": b"",
    }
    digest, _ = add(store, files)
    layer = store.path_of(digest)
    st = (layer / "bin").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o711, 1000)
    st = (layer / "bin/tool").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime, st.st_nlink) == (0o4755, 2000, 2)
    assert (layer / "bin/link").stat().st_ino == st.st_ino
    assert os.lstat(layer / "bin/sym").st_mtime == 3000
    st = (layer / "ro").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o555, 4000)  # set after its content
    st = os.lstat(layer / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620 and st.st_mtime == 5000
    assert stat.S_IMODE((layer / "implied").stat().st_mode) == 0o755
    assert stat.S_IMODE(layer.stat().st_mode) == 0o755


def test_whiteouts_are_converted_where_they_are(store, wh):
    files = {
        "etc": FileSpec.directory(),
        "etc/mine": b"",
        whiteout("etc/passwd"): b"",
        whiteout("etc/mine"): b"",  # hides nothing: the layer's own files stay
        opaque("var/cache"): b"",
        whiteout("top"): b"",
        "etc/.wh..wh.plnk": b"",  # AUFS bookkeeping, ignored
    }
    digest, _ = add(store, files)
    layer = store.path_of(digest)
    assert wh.calls == [
        ("whiteout", (layer / "etc").stat().st_ino, "passwd", "etc/.wh.passwd"),
        ("opaque", (layer / "var/cache").stat().st_ino, "var/cache/.wh..wh..opq"),
        ("whiteout", layer.stat().st_ino, "top", ".wh.top"),
    ]
    assert sorted(os.listdir(layer / "etc")) == ["mine"]


def test_remove(store):
    digest, _ = add(store, {"ro": FileSpec.directory(0o500), "ro/f": FileSpec(data=b"x", mode=0o400)})
    blob = store.blob_of(digest)
    store.remove(digest)
    assert not store.has(digest) and not blob.exists()
    assert_empty(store)
    with pytest.raises(NotFound):
        store.remove(digest)
    with pytest.raises(NotFound):
        store.size_of(digest)


def test_remove_unused_keeps_a_layer_in_use(store):
    used, _ = add(store, {"a": b"used"})
    unused, _ = add(store, {"ro": FileSpec.directory(0o500), "ro/f": FileSpec(data=b"x", mode=0o400)})
    in_use = {used, "sha256:" + "0" * 64}
    assert store.remove_unused(used, in_use) is False
    assert store.remove_unused(unused, in_use) is True
    assert store.digests() == [used]
    assert (store.path_of(used) / "a").read_bytes() == b"used" and store.size_of(used) > 0
    assert not store.path_of(used).with_name(parse_digest(unused) + ".json").exists()
    assert store.remove_unused(unused, in_use) is False  # gone already: nothing to do
    store.remove_unused(used, set())
    assert_empty(store)


def stage(staging, digest, blob):
    """A blob as another host's rsync leaves it in staging, by blob_of's name."""
    staging.mkdir(exist_ok=True)
    (staging / parse_digest(digest)).write_bytes(blob)


FILES = {"etc": FileSpec.directory(), "etc/hosts": b"genuine\n"}


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_a_received_blob_that_hashes_to_its_name_is_extracted_and_adopted(store, tmp_path, compression):
    blob = make_layer(FILES, compression)
    digest = digest_of(blob)
    stage(tmp_path / "staging", digest, blob)
    assert store.adopt(digest, tmp_path / "staging")
    assert store.path_of(digest) == store.path / "sha256" / parse_digest(digest)
    assert (store.path_of(digest) / "etc/hosts").read_bytes() == b"genuine\n"
    assert store.blob_of(digest).read_bytes() == blob and store.size_of(digest) == len(blob)
    assert list((tmp_path / "staging").iterdir()) == []  # consumed


def test_a_received_blob_is_extracted_inside_its_staging_folder(store, tmp_path, monkeypatch):
    """An agent that dies while extracting leaves the half-made tree in its staging folder, which
    the next command on that host removes (runtime/reconcile.py), not in the store's tmp."""
    blob = make_layer(FILES, "gzip")
    stage(tmp_path / "staging", digest_of(blob), blob)
    roots, run = [], layers._Extractor.run
    monkeypatch.setattr(layers._Extractor, "run", lambda self, stream: roots.append(self._root) or run(self, stream))
    assert store.adopt(digest_of(blob), tmp_path / "staging")
    assert [r.parent.parent for r in roots] == [tmp_path / "staging"]


def flip_a_byte(blob: bytes) -> bytes:
    return blob[:-9] + bytes([blob[-9] ^ 1]) + blob[-8:]


@pytest.mark.parametrize("forge", [
    lambda blob: make_layer({"etc": FileSpec.directory(), "etc/hosts": b"planted\n"}, "gzip"),  # another layer
    lambda blob: flip_a_byte(blob),
    lambda blob: blob + b"\0",
])
def test_a_received_blob_under_a_wrong_digest_is_refused_and_leaves_nothing(store, tmp_path, forge):
    blob = make_layer(FILES, "gzip")
    digest = digest_of(blob)
    stage(tmp_path / "staging", digest, forge(blob))
    with pytest.raises(ImageError, match=f"^layer {digest}: digest mismatch, the blob hashes to sha256:") as e:
        store.adopt(digest, tmp_path / "staging")
    assert "\n" not in str(e.value)
    assert_empty(store)
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_layer_extracted_meanwhile_by_another_import_is_not_an_error(store):
    """Two moves of the same image to one host (a drain with --parallel) both receive the layer;
    the one whose tree comes second finds the other's in place."""
    blob = make_layer(FILES, "gzip")
    digest = digest_of(blob)

    class Meanwhile(io.BytesIO):
        def read(self, n=-1):
            if self.tell() == 0:  # the other finishes while this one has only begun
                assert store.add_from_stream(digest, io.BytesIO(blob), GZ)
            return super().read(n)

    assert store.add_from_stream(digest, Meanwhile(blob), GZ) is False
    assert store.digests() == [digest] and store.blob_of(digest).read_bytes() == blob
    assert not any((store.path / "tmp").iterdir())


def test_a_layer_held_already_is_not_adopted_again(store, tmp_path):
    digest, _ = add(store, FILES)
    stage(tmp_path / "staging", digest, make_layer(FILES, "gzip"))
    assert store.adopt(digest, tmp_path / "staging") is False
    assert list((tmp_path / "staging").iterdir()) == []


def _symlinked(staging, digest, blob):
    stage(staging, digest, blob)  # the right blob, but reached through a symlink: never followed
    (staging / parse_digest(digest)).rename(staging / "elsewhere")
    (staging / parse_digest(digest)).symlink_to(staging / "elsewhere")


@pytest.mark.parametrize("make,message", [
    (lambda s, d, b: s.mkdir(), "did not arrive"),
    (lambda s, d, b: (s / parse_digest(d)).mkdir(parents=True), "did not arrive as a plain file"),
    (lambda s, d, b: s.mkdir() or os.mkfifo(s / parse_digest(d)), "did not arrive as a plain file"),
    (_symlinked, "did not arrive"),
])
def test_a_staged_blob_that_is_not_a_plain_file_is_refused(store, tmp_path, make, message):
    blob = make_layer(FILES, "gzip")
    digest = digest_of(blob)
    make(tmp_path / "staging", digest, blob)
    with pytest.raises(ImageError, match=f"^layer {digest} {message}") as e:
        store.adopt(digest, tmp_path / "staging")
    assert "\n" not in str(e.value)
    assert_empty(store)


def test_a_layer_imported_before_blobs_were_kept_cannot_be_sent_until_imported_again(store):
    digest, _ = add(store, FILES)
    store.blob_of(digest).unlink()  # as a store made before this version holds it
    assert store.has(digest) and not store.has_blob(digest)
    with pytest.raises(NotFound, match="no blob here .* import its image again"):
        store.blob_of(digest)
    with pytest.raises(ImageError, match="digest mismatch"):
        store.add_from_stream(digest, io.BytesIO(flip_a_byte(make_layer(FILES, "gzip"))), GZ)
    assert not store.has_blob(digest) and not any((store.path / "tmp").iterdir())
    assert add(store, FILES) == (digest, False)  # verified against the name, and kept
    assert store.blob_of(digest).read_bytes() == make_layer(FILES, "gzip")
