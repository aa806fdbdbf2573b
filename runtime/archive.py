"""Snapshot archives: one file that carries a snapshot (and, if asked, its image) to another host.

The file is a pax tar compressed with zstd (content checksums; the first member is a frame of
its own). Its first member,
manifest.json, says what a restore needs (the CRIU that dumped it, the architecture and CPU it
ran on, the image) and lists every other member with its size and sha256; it carries its own
sha256 too. So an import can refuse an incompatible host before it writes a byte, and refuse a
damaged archive before anything becomes visible: members are extracted into a snapshot's
unfinished folder (swept if the import dies) while they are hashed, and published by one
rename and the catalog row only when every digest matched and the stream ended cleanly.
The format is described in docs/archive.md.
"""

import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

from . import linux, states
from .criu import Criu, version_tuple
from .errors import Conflict, CriuError, ImageError, InvalidInput, MigrateError, NotFound
from .facts import cpuinfo_check, cpuinfo_dump
from .images import parse_image_name
from .layers import CORRUPT, Digesting, drain, extract_native_tree, native_tree_tar, parse_digest, tar_members
from .paths import CHECKPOINT_META, SNAPSHOT_META
from .reconcile import OWNER_FILE, adopt_snapshot, write_owner
from .snapshots import SPEC_FILE, Snapshots, tree_size
from .spec import ContainerSpec, validate_name
from .store import ImageRecord, SnapshotRecord

FORMAT = "migrate-snapshot-archive"
VERSION = 2  # 2: a carried layer is its blob, verified against its digest and extracted on import
READS = (1, 2)  # a version-1 archive is read unless it carries layers (as trees, which cannot be verified)
MANIFEST = "manifest.json"
MAX_MANIFEST = 4 << 20
ZSTD_LEVEL = 3
DISK_HEADROOM = 1.1  # over the members' bytes: file-system overhead of what is extracted
UPPER = "snapshot/upper.tar"
_FILES = (SPEC_FILE, CHECKPOINT_META, "container.log")  # beside the images in a snapshot folder
_IMAGE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}")
_LAYER = re.compile(r"layers/([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    sha256: str


# --- the manifest: pure functions --------------------------------------------------------------


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: dict) -> bytes:
    """The manifest as stored: canonical JSON with the sha256 of the rest of it inside."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return _canonical({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()})


def member_kind(name: str) -> tuple[str, str]:
    """What a member is and where it goes: ("file", path in the snapshot folder), ("upper", ""),
    ("layer", digest). Any other name is refused: a member never chooses its own path."""
    if name == UPPER:
        return "upper", ""
    head, _, rest = name.partition("/")
    if head == "snapshot" and rest in _FILES:
        return "file", rest
    if head == "snapshot" and rest.startswith("images/") and _IMAGE_FILE.fullmatch(rest[len("images/"):]):
        return "file", rest
    m = _LAYER.fullmatch(name)
    if m:
        return "layer", f"sha256:{m.group(1)}"
    raise ImageError(f"unexpected member {name!r}")


def parse_manifest(data: bytes) -> dict:
    """The manifest, checked: its own digest, its format, every field an import relies on."""
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise ImageError(f"the manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ImageError("not a snapshot archive of migrate (no manifest)")
    if manifest.get("version") not in READS:
        raise ImageError(f"archive format version {manifest.get('version')!r}; this migrate reads {VERSION}")
    if manifest["version"] == 1 and manifest.get("layers"):
        raise ImageError("a version-1 archive carries its layers as trees, which cannot be verified against their "
                         "digests: import the image here first, or export the snapshot again with this version")
    if seal(manifest) != data:
        raise ImageError("the manifest is damaged: it does not match its own sha256")
    try:
        snap, host, image = manifest["snapshot"], manifest["host"], manifest["image"]
        spec = ContainerSpec.from_json(json.dumps(snap["spec"]))
        validate_name(snap["container"])
        strings = (snap["id"], snap["criu_version"], host["arch"], host["kernel"], host["hostname"], image["name"],
                   image["id"])
        if not all(isinstance(v, str) for v in strings) or not isinstance(snap["created"], (int, float)) \
                or not isinstance(host["cpu_flags"], list) or not isinstance(image.get("config", {}), dict):
            raise TypeError("a field has the wrong type")
        if snap["tag"] is not None:
            validate_name(snap["tag"], "tag")
        if "config" in image:  # the image's catalog row, registered with carried layers
            parse_image_name(image["name"])
            parse_digest(image["id"])
        members = [Member(m["name"], m["size"], m["sha256"]) for m in manifest["members"]]
    except (KeyError, TypeError, AttributeError, ValueError, InvalidInput) as e:
        raise ImageError(f"the manifest lacks or garbles a field ({type(e).__name__}: {e})") from None
    names = set()
    for m in members:
        member_kind(m.name)
        if m.name in names or not isinstance(m.size, int) or m.size < 0 or not _HEX.fullmatch(str(m.sha256)):
            raise ImageError(f"the manifest lists member {m.name!r} twice or with a bad size or sha256")
        names.add(m.name)
    if not {f"snapshot/{SPEC_FILE}", UPPER} <= names:
        raise ImageError("the manifest lists no spec or no upper dir")
    layers = manifest.get("layers", {})
    carried = {member_kind(n)[1] for n in names if n.startswith("layers/")}
    if not isinstance(layers, dict) or set(layers) != carried or not carried <= set(spec.layers):
        raise ImageError("the manifest's layers do not match the layer members")
    for digest, meta in layers.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
            raise ImageError(f"the manifest garbles layer {digest}")
        parse_digest(meta.get("diff_id", ""))
    return manifest


def cpu_flags(cpuinfo: str) -> list[str]:
    """The CPU feature flags /proc/cpuinfo lists for its first CPU."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return sorted(value.split())
    return []


def judge(manifest: dict, local: dict, cpu: tuple[bool, str] | None) -> list[str]:
    """Every reason the snapshot cannot be restored on this host (empty when it can). `local`:
    this host's arch, criu_version and cpu_flags; `cpu`: CRIU's `cpuinfo check` of the archive's
    CPU here, None when the archive recorded no CRIU cpuinfo."""
    host, snap = manifest["host"], manifest["snapshot"]
    there = host.get("hostname") or "the exporting host"
    problems = []
    if host["arch"] != local["arch"]:
        problems.append(f"it was dumped on {host['arch']} and this host is {local['arch']}")
    if version_tuple(local["criu_version"]) < version_tuple(snap["criu_version"]):
        problems.append(f"it was dumped by CRIU {snap['criu_version']} and this host has the older "
                        f"{local['criu_version']}, which cannot read its images (install the same or a newer CRIU)")
    if cpu is not None and not cpu[0]:
        lacking = sorted(set(host["cpu_flags"]) - set(local["cpu_flags"]))
        why = f"this CPU lacks {', '.join(lacking[:12])}" if lacking else (cpu[1] or "criu cpuinfo check failed")
        problems.append(f"its processes ran on a CPU of {there} that this one cannot stand in for: {why}")
    return problems


def local_facts() -> dict:
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        flags = []
    return {"arch": platform.machine(), "kernel": platform.release(), "hostname": platform.node(),
            "cpu_flags": flags}


# --- export ----------------------------------------------------------------------------------


def resolve(snapshots: Snapshots, ref: str, tag: str | None = None) -> tuple[SnapshotRecord, str | None]:
    """The snapshot `export REF` means, and a note when it had to take one: a snapshot id, or
    the newest snapshot of container REF (with `tag`, the one so tagged); a running container
    without any gets a leave-running checkpoint."""
    catalog = snapshots.catalog
    if tag is not None:
        return catalog.snapshot(tag, container=ref), None
    with contextlib.suppress(NotFound):
        return catalog.snapshot(ref), None
    snaps = catalog.snapshots(ref)
    if snaps:
        return snaps[-1], None
    rec = catalog.find_container(ref)
    if rec is None:
        raise NotFound(f"no container or snapshot {ref}")
    if rec.state != states.RUNNING:
        raise NotFound(f"{ref} has no snapshot, and it is {rec.state}: checkpoint it first")
    snap = snapshots.checkpoint(ref, leave_running=True)
    return snap, f"{ref} had no snapshot: took {snap.id} while it runs on (a leave-running checkpoint)"


def export(snapshots: Snapshots, snap: SnapshotRecord, out: Path, with_image: bool) -> int:
    """Write snapshot `snap` (and with_image its image's layers) as an archive at `out`, made
    aside and renamed into place once on disk, root-only. Returns its size."""
    rt = snapshots.rt
    sdir = rt.root.snapshot_dir(snap.id)
    out = out.absolute()
    if out.is_dir():
        raise InvalidInput(f"{out} is a folder: give the archive's file name")
    rt.root.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(dir=rt.root.tmp, prefix="export-"))
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        sources, layers = _sources(rt, sdir, snap.spec, with_image, work)
        members = [Member(name, path.stat().st_size, _sha256(path)) for name, path in sources]
        manifest = seal({
            "format": FORMAT, "version": VERSION, "created": time.time(),
            "snapshot": {"id": snap.id, "container": snap.container, "tag": snap.tag, "created": snap.created,
                         "criu_version": snap.criu_version, "spec": json.loads(snap.spec.to_json())},
            "host": {**local_facts(), "criu_version": Criu().version(), "cpuinfo": _cpuinfo()},
            "image": _image_row(rt, snap.spec),
            "layers": layers,
            "members": [m.__dict__ for m in members],
        })
        _write(tmp, manifest, sources)
        os.rename(tmp, out)
        linux.fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out.stat().st_size


def _sources(rt, sdir: Path, spec: ContainerSpec, with_image: bool, work: Path) -> tuple[list, dict]:
    """(member name, file) of everything the archive carries, and the carried layers' metadata.
    A layer goes as its blob, which the importing host verifies; the upper dir is made into a tar
    file in `work` first: a tar member's size comes before its data."""
    sources = [(f"snapshot/{f}", sdir / f) for f in _FILES if (sdir / f).is_file()]
    for f in sorted((sdir / "images").iterdir()):
        if not stat.S_ISREG(f.lstat().st_mode) or not _IMAGE_FILE.fullmatch(f.name):
            raise MigrateError(f"{f} is not a plain CRIU image file: this snapshot cannot be exported")
        sources.append((f"snapshot/images/{f.name}", f))
    sources.append((UPPER, _tree_tar(sdir / "upper", work / "upper.tar")))
    layers = {}
    for digest in dict.fromkeys(spec.layers) if with_image else ():
        sources.append((f"layers/{parse_digest(digest)}", rt.layers.blob_of(digest)))
        layers[digest] = rt.layers.meta(digest)
    return sources, layers


def _tree_tar(tree: Path, dest: Path) -> Path:
    with open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        native_tree_tar(tree, f)
    return dest


def _image_row(rt, spec: ContainerSpec) -> dict:
    """The image as the catalog has it (so the importer can list it), else what the spec says."""
    row = {"name": spec.image, "id": spec.image_id, "layers": list(spec.layers)}
    with contextlib.suppress(NotFound):
        img = rt.catalog.image(spec.image)
        if img.id == spec.image_id:
            row.update(config=img.config, size=img.size)
    return row


def _cpuinfo() -> str | None:
    """CRIU's description of this CPU (cpuinfo.img), base64; None if CRIU cannot make one."""
    try:
        return base64.b64encode(cpuinfo_dump(Criu())).decode()
    except CriuError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write(tmp: Path, manifest: bytes, sources: list) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as raw:
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
        now = int(time.time())
        with cctx.stream_writer(raw, closefd=False) as z:
            # the manifest's tar member is a zstd frame of its own: its checksum is checked before
            # anything else is read, and its bytes in the file are known (docs/archive.md)
            header = _info(MANIFEST, len(manifest), now).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            z.write(header + manifest + bytes(-len(manifest) % tarfile.BLOCKSIZE))
            z.flush(zstandard.FLUSH_FRAME)
            with tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name, path in sources:
                    with open(path, "rb") as f:
                        tar.addfile(_info(name, os.fstat(f.fileno()).st_size, now), f)
        raw.flush()
        os.fsync(raw.fileno())


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, mtime
    return info


# --- import ----------------------------------------------------------------------------------


def import_(snapshots: Snapshots, path: Path, new_name: str | None = None) -> SnapshotRecord:
    """Register the snapshot in the archive at `path` (as a snapshot of `new_name` if given).
    Nothing is written before the manifest is proven and this host judged able to restore it;
    nothing becomes visible before every member matched its digest."""
    rt = snapshots.rt
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidInput(f"{path} is not a regular file")
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=False)
        try:
            members = tar_members(reader, str(path))
            manifest = _read_manifest(members)
            name = validate_name(new_name or manifest["snapshot"]["container"])
            _refuse(rt, manifest, name)
            return _extract_and_publish(rt, manifest, name, members, reader)
        except CORRUPT as e:
            raise ImageError(f"{path} is damaged or truncated ({e}); nothing was imported") from None
        except ImageError as e:
            raise ImageError(f"{path}: {e}; nothing was imported") from None
        except OSError as e:
            raise MigrateError(f"importing {path} failed: {e}; nothing was imported") from None


def _read_manifest(members) -> dict:
    first = next(members, None)
    if first is None or first[1].name != MANIFEST or not first[1].isreg() or first[1].size > MAX_MANIFEST:
        raise ImageError("not a snapshot archive of migrate: it does not begin with its manifest")
    tar, member = first
    return parse_manifest(tar.extractfile(member).read())


def _refuse(rt, manifest: dict, name: str) -> None:
    """Every reason not to begin, before anything is written."""
    if rt.catalog.find_container(name) is not None:
        raise Conflict(f"a container named {name} exists here: import the snapshot under another name (--name NEW)")
    criu = Criu()
    cpu = None
    if manifest["host"].get("cpuinfo"):
        cpu = cpuinfo_check(criu, base64.b64decode(manifest["host"]["cpuinfo"]))
    problems = judge(manifest, {**local_facts(), "criu_version": criu.version()}, cpu)
    if problems:
        raise CriuError(f"cannot restore this snapshot of {manifest['snapshot']['container']} here: "
                        + "; ".join(problems))
    image = manifest["image"]
    missing = [d for d in manifest["snapshot"]["spec"]["layers"] if not rt.layers.has(d)]
    if any(d not in manifest["layers"] for d in missing):
        raise NotFound(f"this host lacks the image {image['name']} ({image['id']}) of the snapshot and the archive "
                       "does not carry it: import the image first (migrate image import), or export with --with-image")
    need = sum(m["size"] for m in manifest["members"]
               if not (m["name"].startswith("layers/") and member_kind(m["name"])[1] not in missing))
    st = os.statvfs(rt.root.root)
    if st.f_bavail * st.f_frsize < need * DISK_HEADROOM:
        raise MigrateError(f"not enough space under {rt.root.root}: the snapshot needs about "
                           f"{int(need * DISK_HEADROOM) >> 20} MiB, {st.f_bavail * st.f_frsize >> 20} MiB are free")


def _extract_and_publish(rt, manifest: dict, name: str, members, reader) -> SnapshotRecord:
    snapshot_id = secrets.token_hex(6)
    rt.root.snapshots.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial, final = rt.root.partial_snapshot_dir(snapshot_id), rt.root.snapshot_dir(snapshot_id)
    partial.mkdir(mode=0o700)
    adopted: list[str] = []
    try:
        write_owner(partial / OWNER_FILE)  # an import that dies leaves an unfinished folder, swept
        (partial / "images").mkdir(mode=0o700)
        _extract(rt, manifest, members, reader, partial, adopted)
        spec = ContainerSpec.from_json((partial / SPEC_FILE).read_text())
        if spec.layers != tuple(manifest["snapshot"]["spec"]["layers"]):
            raise ImageError("its spec and its manifest name different layers")
        (partial / SPEC_FILE).write_text(spec.renamed(name).to_json())
        snap = manifest["snapshot"]
        (partial / SNAPSHOT_META).write_text(json.dumps({
            "id": snapshot_id, "container": name, "tag": snap["tag"], "created": snap["created"],
            "criu_version": snap["criu_version"], "spec": json.loads(spec.renamed(name).to_json()),
            "size": tree_size(partial),
            "imported": {"id": snap["id"], "container": snap["container"], "host": manifest["host"]["hostname"],
                         "at": time.time()}}))
        linux.fsync_tree(partial)
        os.rename(partial, final)
        linux.fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if adopted:
            used = rt.catalog.layers_in_use()
            for digest in adopted:
                with contextlib.suppress(MigrateError, OSError):
                    rt.layers.remove_unused(digest, used)
        raise
    _register_image(rt, manifest)
    return adopt_snapshot(rt.catalog, final)


def _extract(rt, manifest: dict, members, reader, partial: Path, adopted: list[str]) -> None:
    """Every member into the unfinished folder while it is hashed; each must be listed, once,
    with its size and digest, every listed one must come, and the zstd frame must end well.
    A carried layer's blob goes into the store as an import's does, verified against its digest
    (ADOPTED lists those added, for the caller to remove if the import fails)."""
    expected = {m["name"]: m for m in manifest["members"]}
    budget = rt.layers.import_budget() if manifest["layers"] else None
    for tar, member in members:
        m = expected.pop(member.name, None)
        if m is None or not member.isreg() or member.size != m["size"]:
            raise ImageError(f"member {member.name!r} is not in the manifest as it is here: damaged")
        data = Digesting(tar.extractfile(member))
        kind, where = member_kind(member.name)
        label = f"member {member.name}"
        if kind == "file":
            with open(os.open(partial / where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
                while chunk := data.read(_CHUNK):
                    f.write(chunk)
        elif kind == "upper":
            (partial / "upper").mkdir(mode=0o700)
            extract_native_tree(data, partial / "upper", label)
        else:
            meta = manifest["layers"][where]
            if rt.layers.add_from_stream(where, data, None, size=meta["size"], diff_id=meta["diff_id"], budget=budget):
                adopted.append(where)
        drain(data)
        if data.hexdigest() != m["sha256"]:
            raise ImageError(f"member {member.name} is damaged: its sha256 is {data.hexdigest()}, "
                             f"the manifest says {m['sha256']}")
    drain(reader)  # to the end of the zstd frame: its checksum is checked there
    if expected:
        raise ImageError(f"damaged or truncated: its members end before {', '.join(sorted(expected)[:3])}")


def _register_image(rt, manifest: dict) -> None:
    """The carried image, listed by `image ls` like an imported one, unless the name is taken."""
    image = manifest["image"]
    if not manifest["layers"] or "config" not in image:
        return
    with contextlib.suppress(NotFound):
        rt.catalog.image(image["name"])
        return
    rt.catalog.add_image(ImageRecord(image["name"], image["id"], tuple(image["layers"]), image["config"],
                                     int(image.get("size", 0)), time.time()))
