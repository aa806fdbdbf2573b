"""LayerStore: verification, extraction and its refusals, without root (whiteouts are recorded)."""

import io
import os
import stat

import pytest

from runtime.errors import ImageError, InvalidInput, NotFound
from runtime.imagebuild import FileSpec, digest_of, make_layer, opaque, whiteout
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
    for sub in ("sha256", "tmp"):
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
    store.remove(digest)
    assert not store.has(digest)
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


def test_a_layer_adopted_meanwhile_by_another_move_is_not_an_error(store, tmp_path):
    """Two moves of the same image to one host (a drain with --parallel) both stage the layer;
    the second to adopt it finds it there once its own rename fails."""
    digest = "sha256:" + "ab" * 32
    hex_ = parse_digest(digest)
    for copy in ("one", "two"):
        staged = tmp_path / copy
        (staged / hex_ / "etc").mkdir(parents=True)
        (staged / hex_ / "etc" / "hostname").write_text(copy)
        (staged / f"{hex_}.json").write_text(f'{{"size": 1, "diff_id": "{digest}"}}')
    assert store.adopt(digest, tmp_path / "one")
    real_has, looks = store.has, []
    store.has = lambda d: bool(looks.append(d) or len(looks) > 1) and real_has(d)  # not there at its first look
    assert store.adopt(digest, tmp_path / "two") is False
    assert (store.path_of(digest) / "etc" / "hostname").read_text() == "one"
    assert len(looks) == 2


def stage(staged, digest, files=None, sidecar=None):
    """A layer as another host's rsync leaves it in staging: the tree and its sidecar."""
    hex_ = parse_digest(digest)
    (staged / hex_).mkdir(parents=True)
    for name, data in (files or {"planted": b"from the other host"}).items():
        (staged / hex_ / name).write_bytes(data)
    (staged / f"{hex_}.json").write_text(sidecar if sidecar is not None else f'{{"size": 1, "diff_id": "{digest}"}}')


def test_an_adopted_tree_is_foreign_and_an_import_extracts_its_own_blob(store, tmp_path):
    """Another host sends a tree under the digest of a real layer: it is kept apart, and a later
    import of that layer here verifies its blob and extracts it instead of trusting the tree."""
    files = {"etc": FileSpec.directory(), "etc/hosts": b"genuine\n"}
    blob = make_layer(files, "gzip")
    digest = digest_of(blob)
    stage(tmp_path / "staging", digest)
    assert store.adopt(digest, tmp_path / "staging")
    assert store.path_of(digest) == store.path / "foreign" / "sha256" / parse_digest(digest)
    assert store.digests() == [digest]
    assert store.add_from_stream(digest, io.BytesIO(blob), GZ)  # stored: the foreign tree is not "present"
    layer = store.path_of(digest)
    assert layer == store.path / "sha256" / parse_digest(digest)
    assert (layer / "etc/hosts").read_bytes() == b"genuine\n" and not (layer / "planted").exists()
    assert store.digests() == [digest] and store.size_of(digest) == len(blob)
    assert store.add_from_stream(digest, io.BytesIO(blob), GZ) is False  # now present, and verified
    store.remove(digest)
    assert not store.has(digest) and not any((store.path / "foreign" / "sha256").iterdir())


def test_a_layer_held_in_either_form_is_not_adopted_again(store, tmp_path):
    digest, _ = add(store, {"a": b"mine"})
    stage(tmp_path / "staging", digest)
    assert store.adopt(digest, tmp_path / "staging") is False
    assert (store.path_of(digest) / "a").read_bytes() == b"mine"


def _symlinked_tree(staged, digest):
    stage(staged, digest)
    real = staged / "elsewhere"
    (staged / parse_digest(digest)).rename(real)
    (staged / parse_digest(digest)).symlink_to(real)


def _symlinked_sidecar(staged, digest):
    stage(staged, digest)
    side = staged / f"{parse_digest(digest)}.json"
    side.rename(staged / "side")
    side.symlink_to(staged / "side")


@pytest.mark.parametrize("make,message", [
    (lambda s, d: (s / parse_digest(d)).mkdir(parents=True), "did not arrive complete"),
    (_symlinked_tree, "did not arrive complete"),
    (_symlinked_sidecar, "did not arrive complete"),
    (lambda s, d: stage(s, d, sidecar="not json"), "did not arrive complete"),
    (lambda s, d: stage(s, d, sidecar='{"size": -1, "diff_id": "sha256:00"}'), "garbled sidecar"),
    (lambda s, d: stage(s, d, sidecar='{"size": 1, "diff_id": "../../x"}'), "garbled sidecar"),
])
def test_a_staged_layer_not_in_a_store_s_form_is_refused(store, tmp_path, make, message):
    digest = "sha256:" + "cd" * 32
    make(tmp_path / "staging", digest)
    with pytest.raises(ImageError, match=message) as e:
        store.adopt(digest, tmp_path / "staging")
    assert "\n" not in str(e.value)
    assert_empty(store)
