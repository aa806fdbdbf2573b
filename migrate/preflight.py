"""Can this container move to that host, and how? Pure comparisons of the two hosts' facts.

Everything here runs before anything is frozen, so a refusal changes nothing.
"""

from dataclasses import dataclass

from runtime.criu import version_tuple
from runtime.facts import LAZY_PIPE_SIZE

from .output import human_size

MODES = ("auto", "copy", "lazy", "precopy")
PRE_DUMP_SINCE = (3, 17)  # one pre-dump per CRIU session (SINGLE_PRE_DUMP)
DISK_HEADROOM = 1.2


PAGE_WIRE_CHANGE = (4, 2)  # CRIU 4.2 widened its page-server messages (commit 7e0da4d97): no pairing across it


@dataclass(frozen=True)
class Verdict:
    mode: str
    problems: tuple[str, ...]
    why: str = ""  # how `auto` chose its mode
    # copy and pre-copy: the final dump writes the memory straight to a page server on the target,
    # where both CRIUs speak the same page-server wire; else (copy) to disk, and rsync copies it
    stream: bool = False


def judge(local: dict, remote: dict, name: str, need_bytes: int, mode: str, lazy_implemented: bool = True) -> Verdict:
    """The mode to use and every reason the migration cannot go ahead (empty when it can)."""
    host = remote.get("hostname", "the target")
    problems = []
    if not remote.get("criu_ok"):
        problems.append(f"criu does not work on {host}: {remote.get('criu_message') or 'criu check failed'}")
    elif version_tuple(remote.get("criu_version")) < version_tuple(local.get("criu_version")):
        problems.append(f"{host} has CRIU {remote.get('criu_version')}, older than {local.get('criu_version')} "
                        "here: its restore cannot read these images (install the same or a newer CRIU there)")
    if name in remote.get("containers", ()):
        problems.append(f"a container named {name} already exists on {host}")
    free = remote.get("free_bytes", 0)
    if free < need_bytes * DISK_HEADROOM:
        problems.append(f"{host} has {human_size(free)} free under {remote.get('root')}, "
                        f"the migration needs about {human_size(int(need_bytes * DISK_HEADROOM))}")
    here, there = local.get("criu_version"), remote.get("criu_version")
    same_wire = (version_tuple(here) >= PAGE_WIRE_CHANGE) == (version_tuple(there) >= PAGE_WIRE_CHANGE)
    wire = (f"CRIU changed how its page server talks in 4.2, and this host has {here}, {host} {there}: "
            "use --mode copy, or the same side of CRIU 4.2 on both hosts")
    uffd = lazy_implemented and bool(remote.get("lazy_pages")) and bool(local.get("lazy_pages"))
    dirty = bool(remote.get("dirty_tracking")) and bool(local.get("dirty_tracking"))
    old_criu = min(version_tuple(here), version_tuple(there)) < PRE_DUMP_SINCE
    if mode == "lazy":
        if not uffd:
            where = "this build" if not lazy_implemented else (host if not remote.get("lazy_pages") else "this host")
            problems.append("lazy mode needs userfaultfd (criu check --feature uffd-noncoop) "
                            f"and is not available on {where}")
        elif not same_wire:
            problems.append("lazy mode streams memory between the two CRIUs; " + wire)
    if mode == "precopy":
        if not dirty:
            where = host if not remote.get("dirty_tracking") else "this host"
            problems.append("pre-copy needs soft-dirty memory tracking (criu check --feature mem_dirty_track), "
                            f"which the kernel of {where} lacks")
        elif old_criu:
            problems.append(f"pre-copy needs CRIU 3.17 or later on both hosts ({here} here, {there} on {host})")
        elif not same_wire:
            problems.append("pre-copy streams memory between the two CRIUs; " + wire)
    why = ""  # how `auto` chose its mode
    if mode == "auto":
        if dirty and not old_criu and same_wire:
            mode, why = "precopy", "pre-copy: both hosts track dirtied memory"
        elif uffd and same_wire:
            mode, why = "lazy", "lazy: both hosts have userfaultfd" + (
                "" if dirty else " (no soft-dirty tracking for pre-copy)")
        elif not same_wire and (uffd or dirty):
            mode, why = "copy", (f"copy: CRIU {here} here and {there} on {host} cannot stream memory to each other "
                                 "(changed in 4.2)")
        else:
            mode, why = "copy", "copy: neither soft-dirty tracking (pre-copy) nor userfaultfd (lazy) on both hosts"
    # lazy mode's memory moves after the dump; every other mode's final dump writes it to the target
    return Verdict(mode, tuple(problems), why, stream=same_wire and mode != "lazy")


def limits_verdict(name: str, limits, remote: dict) -> list[str]:
    """The container's limits need controllers the target has (else its restore there would
    fail inside the freeze). A target that does not say (an older agent) is not judged."""
    have = remote.get("cgroup_controllers")
    if have is None:
        return []
    need = [c for c, v in (("memory", limits.memory_bytes), ("cpu", limits.cpus), ("pids", limits.pids)) if v]
    lacking = [c for c in need if c not in have]
    if not lacking:
        return []
    return [f"{remote.get('hostname', 'the target')} cannot apply the limits of {name}: it has no "
            f"{', '.join(lacking)} cgroup controller for containers"]


def blobs_verdict(image: str, lacking: list[str]) -> list[str]:
    """Layers the target lacks go as their blobs, which it verifies against their digests; a layer
    imported here before the store kept blobs has none (a tree cannot be verified there)."""
    if not lacking:
        return []
    return [f"{len(lacking)} layer(s) of image {image} that the target lacks ({', '.join(d[:19] for d in lacking)}) "
            "have no blob here, as they were imported before the layer store kept blobs: import the image "
            "again on this host (migrate image import), which keeps them"]


def needs_pipe_size(local: dict) -> bool:
    """Lazy dumps need big pipes on the source (else `page-pipe: tee: ... Operation not permitted`)."""
    return local.get("pipe_max_size", 0) < LAZY_PIPE_SIZE


def holdings_verdict(name: str, host: str, blocker: str | None, outside: list, databases: list[str],
                     tcp_close: bool, allow_new_inodes: bool,
                     taken: list[str] = ()) -> tuple[list[str], list[str]]:
    """(problems, notes) about what the container holds: what CRIU cannot dump here, ports
    something holds there, connections whose other end stays behind, SQLite databases whose
    files get new inode numbers there."""
    problems, notes = [], []
    if blocker:
        problems.append(blocker)
    if taken:
        problems.append(f"ports of {name} are taken on {host}: {', '.join(taken)} (the container shares its "
                        "host's network and keeps its ports)")
    if outside:
        listed = ", ".join(str(c) for c in outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        if tcp_close:
            notes.append(f"closed on {host} (--tcp-close): {listed}")
        else:
            problems.append(f"{name} has {len(outside)} TCP connection(s) to outside the container, which cannot "
                            f"follow it to {host}: {listed}; end them first, or move with --tcp-close to have "
                            "them closed there")
    if databases:
        listed = ", ".join(databases[:5])
        if allow_new_inodes:
            notes.append(f"SQLite databases open for writing get new inode numbers on {host} "
                         f"(--allow-new-inodes): {listed}")
        else:
            problems.append(f"{name} has SQLite databases open for writing in its own filesystem ({listed}); their "
                            f"files get new inode numbers on {host}, and SQLite then refuses to write "
                            "(SQLITE_READONLY_DBMOVED): close them first, keep them in a volume, or move with "
                            "--allow-new-inodes (docs/filesystem-identity.md)")
    return problems, notes
