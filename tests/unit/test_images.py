"""import_image over every archive format, and its refusal of broken or malicious archives."""

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from runtime.container import Runtime
from runtime.errors import ImageError, InvalidInput, NotFound
from runtime.image_catalog import Images
from runtime.imagebuild import (
    FORMATS,
    FileSpec,
    build_image,
    busybox_layer,
    digest_of,
    make_layer,
    opaque,
    whiteout,
)
from runtime.images import import_image, parse_image_name
from runtime.layers import LayerStore, OverlayWhiteouts
from runtime.paths import StateRoot

CONFIG = {"Cmd": ["sh", "-c", "echo hi"], "Entrypoint": ["/bin/env"], "Env": ["PATH=/bin", "A=1"], "WorkingDir": "/tmp"}
BASE = {
    "etc": FileSpec.directory(),
    "etc/passwd": b"root:x:0:0::/:/bin/sh\n",
    "bin": FileSpec.directory(),
    "bin/sh": b"#!",
}
TOP = {whiteout("etc/passwd"): b"", opaque("bin"): b"", "bin/new": b"new"}


class RecordingWhiteouts(OverlayWhiteouts):
    def __init__(self):
        self.calls = []

    def whiteout(self, dir_fd, name, member):
        self.calls.append(member)

    def opaque(self, dir_fd, member):
        self.calls.append(member)


@pytest.fixture
def store(tmp_path):
    return LayerStore(tmp_path / "layers", whiteouts=RecordingWhiteouts())


def assert_empty(store):
    """Nothing stored and no temporary leftovers."""
    assert store.digests() == []
    for sub in ("sha256", "blobs/sha256", "tmp"):
        assert not (store.path / sub).exists() or not any((store.path / sub).iterdir())


def oci_dir(tmp_path, **kw) -> Path:
    out = tmp_path / "layout"
    build_image(out, BASE, fmt="oci-layout", **kw)
    return out


def rewrite_blob(layout: Path, digest: str, data: bytes) -> None:
    (layout / "blobs/sha256" / digest.removeprefix("sha256:")).write_bytes(data)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_import_each_format_and_compression(tmp_path, store, fmt, compression):
    out = tmp_path / "image"
    built = build_image(out, layers=[BASE, TOP], fmt=fmt, name="busybox:1.36", config=CONFIG, compression=compression)
    img = import_image(out, store)
    assert img.name == "busybox:1.36"
    assert img.id == built.configs["linux/amd64"]
    assert img.layers == built.layers and len(img.layers) == 2
    assert (img.env, img.entrypoint, img.cmd, img.working_dir) == (
        ("PATH=/bin", "A=1"),
        ("/bin/env",),
        ("sh", "-c", "echo hi"),
        "/tmp",
    )
    assert img.size == sum(len(make_layer(layer, compression)) for layer in (BASE, TOP))
    assert store.digests() == sorted(built.layers)
    assert (store.path_of(img.layers[0]) / "etc/passwd").exists()
    assert (store.path_of(img.layers[1]) / "bin/new").read_bytes() == b"new"
    assert store._whiteouts.calls == ["etc/.wh.passwd", "bin/.wh..wh..opq"]
    for digest, layer in zip(img.layers, (BASE, TOP), strict=True):  # each blob kept as the image had it
        assert store.blob_of(digest).read_bytes() == make_layer(layer, compression)


def test_gzip_compressed_outer_archive(tmp_path, store):
    built = build_image(tmp_path / "image.tar", BASE, fmt="oci-archive")
    with open(tmp_path / "image.tar", "rb") as f, gzip.open(tmp_path / "image.tar.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    assert import_image(tmp_path / "image.tar.gz", store).id == built.configs["linux/amd64"]


def test_empty_config_gives_empty_fields(tmp_path, store):
    build_image(tmp_path / "image", BASE, fmt="oci-layout", config=None)
    img = import_image(tmp_path / "image", store)
    assert (img.env, img.entrypoint, img.cmd, img.working_dir) == ((), (), (), "")


def test_picks_linux_amd64_from_a_nested_index(tmp_path, store):
    built = build_image(
        tmp_path / "image", BASE, fmt="oci-archive", platforms=("linux/arm64", "linux/amd64", "linux/s390x")
    )
    assert import_image(tmp_path / "image", store).id == built.configs["linux/amd64"]


def test_index_without_linux_amd64_refused(tmp_path, store):
    build_image(tmp_path / "image", BASE, fmt="oci-archive", platforms=("linux/arm64", "linux/s390x"))
    with pytest.raises(ImageError, match="0 of them for linux/amd64"):
        import_image(tmp_path / "image", store)
    assert_empty(store)


def test_same_layer_twice_is_stored_once(tmp_path, store):
    built = build_image(tmp_path / "image", layers=[BASE, TOP, BASE], fmt="oci-archive")
    img = import_image(tmp_path / "image", store)
    assert img.layers == built.layers and img.layers[0] == img.layers[2]
    assert len(store.digests()) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_name_override_and_missing_name(tmp_path, store, fmt):
    build_image(tmp_path / "image", BASE, fmt=fmt, name=None)
    with pytest.raises(InvalidInput, match="--name"):
        import_image(tmp_path / "image", store)
    assert import_image(tmp_path / "image", store, name="mine").name == "mine:latest"
    with pytest.raises(InvalidInput):
        import_image(tmp_path / "image", store, name="Bad Name")


def test_ref_name_forms(tmp_path, store):
    layout = oci_dir(tmp_path, name=None)
    index = json.loads((layout / "index.json").read_text())
    for annotations, expected in [
        ({"org.opencontainers.image.ref.name": "alpine"}, "alpine:latest"),
        ({"org.opencontainers.image.ref.name": "reg.io/a/b:3.1"}, "reg.io/a/b:3.1"),
        (
            {"org.opencontainers.image.ref.name": "3.1", "io.containerd.image.name": "docker.io/x/y:3.1"},
            "docker.io/x/y:3.1",
        ),
    ]:
        index["manifests"][0]["annotations"] = annotations
        (layout / "index.json").write_text(json.dumps(index))
        assert import_image(layout, store).name == expected


def test_bad_layer_digest_leaves_nothing(tmp_path, store):
    layout = tmp_path / "layout"
    built = build_image(layout, layers=[BASE, TOP], fmt="oci-layout")
    good = make_layer(TOP, "gzip")
    rewrite_blob(layout, built.layers[1], good[:-12] + bytes(12))  # same size, other bytes
    with pytest.raises(ImageError, match=f"layer {built.layers[1]}: .*(digest mismatch|corrupt)"):
        import_image(layout, store)
    assert_empty(store)  # the first layer, added before the failure, is gone again


def test_failed_import_keeps_layers_that_were_already_there(tmp_path, store):
    first = build_image(tmp_path / "one", BASE, fmt="oci-layout")
    import_image(tmp_path / "one", store)
    built = build_image(tmp_path / "two", layers=[BASE, TOP, {"x": b"x"}], fmt="oci-layout")
    rewrite_blob(tmp_path / "two", built.layers[2], b"garbage")
    with pytest.raises(ImageError):
        import_image(tmp_path / "two", store)
    assert store.digests() == list(first.layers)


@pytest.mark.parametrize("what", ["manifest", "config"])
def test_bad_manifest_or_config_digest(tmp_path, store, what):
    layout = oci_dir(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest[7:]).read_text())
    digest = manifest_digest if what == "manifest" else manifest["config"]["digest"]
    path = layout / "blobs/sha256" / digest[7:]
    path.write_bytes(path.read_bytes().replace(b"}", b" }", 1))
    with pytest.raises(ImageError, match=f"{what} {digest}: (digest mismatch|blob is)"):
        import_image(layout, store)
    assert_empty(store)


def test_wrong_size_in_descriptor(tmp_path, store):
    layout = oci_dir(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["size"] += 1
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="the descriptor says"):
        import_image(layout, store)


def test_legacy_docker_layer_swapped_is_caught_by_diff_id(tmp_path, store):
    archive = tmp_path / "image.tar"
    build_image(archive, BASE, fmt="docker-archive-legacy", compression="none")
    with tarfile.open(archive) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    layer = next(n for n in members if n.endswith("/layer.tar"))
    members[layer] = make_layer({"other": b"content"})
    with tarfile.open(archive, "w") as t:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match="the config says"):
        import_image(archive, store)
    assert_empty(store)


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive", "docker-archive-legacy"])
def test_truncated_archive(tmp_path, store, fmt):
    archive = tmp_path / "image.tar"
    build_image(archive, layers=[BASE, {"big": os.urandom(200_000)}], fmt=fmt)
    data = archive.read_bytes()
    for cut in (len(data) // 2, len(data) - 12_000):
        archive.write_bytes(data[:cut])
        with pytest.raises(ImageError):
            import_image(archive, store)
        assert_empty(store)


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"../evil": b"x"}, r"member '\.\./evil' has a '\.\.' component"),
        ({"/evil": b"x"}, "member '/evil' has an absolute path"),
        ({"lib": FileSpec.symlink("/tmp"), "lib/evil": b"x"}, "member 'lib/evil' would be written through 'lib'"),
        ({"h": FileSpec.hardlink("../../../etc/passwd")}, "hard link to '../../../etc/passwd'"),
    ],
)
@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive-legacy"])
def test_malicious_layer_refused(tmp_path, store, layer, message, fmt):
    build_image(tmp_path / "image.tar", layers=[BASE, layer], fmt=fmt)
    with pytest.raises(ImageError, match=message) as e:
        import_image(tmp_path / "image.tar", store)
    assert "\n" not in str(e.value)
    assert_empty(store)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_outer_archive_paths_cannot_escape(tmp_path, store):
    (tmp_path / "secret.json").write_text("{}")
    archive = tmp_path / "image.tar"
    build_image(archive, BASE, fmt="docker-archive-legacy")
    with tarfile.open(archive) as t:
        manifest = json.loads(t.extractfile("manifest.json").read())
    manifest[0]["Config"] = "../secret.json"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(archive, "a") as t:
        t.add(tmp_path / "manifest.json", "manifest.json")  # the later member wins
    with pytest.raises(ImageError, match="no file '../secret.json'"):
        import_image(archive, store)


def test_not_an_archive_and_missing_path(tmp_path, store):
    (tmp_path / "junk").write_bytes(b"hello" * 1000)
    with pytest.raises(ImageError, match="not a tar archive"):
        import_image(tmp_path / "junk", store)
    with pytest.raises(NotFound):
        import_image(tmp_path / "nothing", store)
    with tarfile.open(tmp_path / "empty.tar", "w") as t:
        t.addfile(tarfile.TarInfo("readme"))
    with pytest.raises(ImageError, match="neither manifest.json nor oci-layout"):
        import_image(tmp_path / "empty.tar", store)


@pytest.mark.parametrize(
    "s, expected",
    [
        ("busybox", ("busybox", "latest")),
        ("busybox:1.36", ("busybox", "1.36")),
        ("docker.io/library/busybox:1.36.1-musl", ("docker.io/library/busybox", "1.36.1-musl")),
        ("my_repo/x-y.z:V_1", ("my_repo/x-y.z", "V_1")),
    ],
)
def test_parse_image_name(s, expected):
    assert parse_image_name(s) == expected


@pytest.mark.parametrize(
    "s",
    [
        "",
        "Busybox",
        "busybox:",
        "a b",
        "busybox:t@x",
        "busybox:" + "t" * 129,
        "/abs",
        "a//b",
        "../x",
        "a/./b",
        "x@sha256:00",
    ],
)
def test_parse_image_name_refuses(s):
    with pytest.raises(InvalidInput):
        parse_image_name(s)


def test_busybox_layer_from_a_fake_busybox(tmp_path, store):
    fake = tmp_path / "busybox"
    fake.write_text("#!/bin/sh\nprintf 'busybox\\ncat\\necho\\nsh\\nsleep\\nls\\n'\n")
    fake.chmod(0o755)
    layer = busybox_layer(fake)
    build_image(tmp_path / "image.tar", layer, fmt="oci-archive", config={"Cmd": ["sh"]})
    img = import_image(tmp_path / "image.tar", store)
    root = store.path_of(img.layers[0])
    assert (root / "bin/busybox").read_bytes() == fake.read_bytes()
    assert os.access(root / "bin/busybox", os.X_OK)
    assert sorted(os.listdir(root / "bin")) == ["busybox", "cat", "echo", "ls", "sh", "sleep"]
    assert os.readlink(root / "bin/sh") == "busybox"
    assert (root / "etc/passwd").read_text().startswith("root:x:0:0:")
    assert oct((root / "tmp").stat().st_mode & 0o7777) == oct(0o1777)
    assert all((root / d).is_dir() for d in ("proc", "sys", "dev"))


def test_docker_archive_with_several_images_needs_a_name(tmp_path, store):
    archive = tmp_path / "image.tar"
    build_image(archive, BASE, fmt="docker-archive", name="a:1")
    with tarfile.open(archive) as t:
        manifest = json.loads(t.extractfile("manifest.json").read())
    manifest.append(dict(manifest[0], RepoTags=["b:2"]))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(archive, "a") as t:
        t.add(tmp_path / "manifest.json", "manifest.json")
    with pytest.raises(ImageError, match="holds 2 images; pass --name"):
        import_image(archive, store)
    assert import_image(archive, store, name="b:2").name == "b:2"


def test_removing_an_image_removes_its_layers_with_their_blobs_and_blobs_left_alone(tmp_path):
    rt = Runtime(StateRoot(tmp_path / "root"))
    try:
        images = Images(rt)
        build_image(tmp_path / "image.tar", layers=[BASE, {"a": b"x"}], fmt="oci-archive", name="img:1")
        rec = images.import_(tmp_path / "image.tar")
        assert [rt.layers.has_blob(d) for d in rec.layers] == [True, True]
        orphan = make_layer({"b": b"y"}, "gzip")  # an import that died between its blob and its tree
        (rt.layers.path / "blobs/sha256" / digest_of(orphan).removeprefix("sha256:")).write_bytes(orphan)
        assert rt.layers.digests() == sorted(rec.layers) and digest_of(orphan) in rt.layers.stored()
        images.remove("img:1")
        assert rt.layers.stored() == [] and not any((rt.layers.path / "blobs/sha256").iterdir())
    finally:
        rt.close()
