"""Can this container move to that host, and how? Pure comparisons of the two hosts' facts.

Everything here runs before anything is frozen, so a refusal changes nothing.
"""

from dataclasses import dataclass

from runtime.facts import LAZY_PIPE_SIZE

from .output import human_size

MODES = ("auto", "copy", "lazy")
DISK_HEADROOM = 1.2


@dataclass(frozen=True)
class Verdict:
    mode: str
    problems: tuple[str, ...]


def version_tuple(version: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (version or "").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


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
    lazy_possible = lazy_implemented and bool(remote.get("lazy_pages")) and bool(local.get("lazy_pages"))
    if mode == "lazy" and not lazy_possible:
        why = "this build" if not lazy_implemented else (host if not remote.get("lazy_pages") else "this host")
        problems.append("lazy mode needs userfaultfd (criu check --feature uffd-noncoop) "
                        f"and is not available on {why}")
    chosen = mode if mode != "auto" else ("lazy" if lazy_possible else "copy")
    return Verdict(chosen, tuple(problems))


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
