"""CRIU logs of failed dumps and restores, kept where the failure's clean-up cannot reach them.

CRIU writes its log into the images folder, and a failure removes that folder: a failed
checkpoint its snapshot folder, a failed migration its outgoing folder here and its incoming
folder on the target. So the log of every failed CRIU operation is copied first to the state
root's criu-logs/ (root-only: 0700, files 0600) as NAME-OP-TIMESTAMP.log (OP: dump, restore,
lazy-pages; TIMESTAMP in UTC), and the error names that copy. The newest KEEP of each container
stay. Nothing removes them with the container: `migrate logs --criu NAME` reads them afterwards.
"""

import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from .errors import CriuError
from .paths import StateRoot

KEEP = 10  # per container
OPS = ("dump", "restore", "lazy-pages")
_STAMP = r"\d{8}T\d{6}\.\d{6}Z"  # sorts as it happened


def _pattern(name: str) -> re.Pattern:
    # op and stamp have fixed forms, so NAME is what precedes them even if it holds "-dump-"
    return re.compile(rf"{re.escape(name)}-(?:{'|'.join(map(re.escape, OPS))})-({_STAMP})\.log")


def kept(root: StateRoot, name: str) -> list[Path]:
    """The kept CRIU logs of container NAME, oldest first."""
    try:
        entries = os.listdir(root.criu_logs)
    except FileNotFoundError:
        return []
    pattern = _pattern(name)
    found = sorted((m.group(1), e) for e in entries if (m := pattern.fullmatch(e)))
    return [root.criu_logs / e for _, e in found]


def newest(root: StateRoot, name: str) -> Path | None:
    logs = kept(root, name)
    return logs[-1] if logs else None


def keep(root: StateRoot, name: str, op: str, log: Path) -> Path:
    """Copy `log` to criu-logs/NAME-OP-TIMESTAMP.log; only the newest KEEP of NAME stay."""
    if op not in OPS:
        raise ValueError(f"unknown CRIU operation {op!r}")
    folder = root.criu_logs
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    with open(log, "rb") as src:
        while True:
            dest = folder / f"{name}-{op}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.log"
            try:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # two failures in one microsecond: take the next one
                continue
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
    for old in kept(root, name)[:-KEEP]:
        old.unlink(missing_ok=True)
    return dest


def keep_failed(root: StateRoot, name: str, err: CriuError) -> CriuError:
    """The same error, naming a kept copy of its CRIU log rather than a file about to be deleted.

    An error without a log, or whose log is kept already, is returned as it is; so is one whose
    log cannot be copied (the failure itself matters more than its log).
    """
    if err.log is None or err.op not in OPS or Path(err.log).parent == root.criu_logs:
        return err
    try:
        dest = keep(root, name, err.op, Path(err.log))
    except OSError:
        return err
    return CriuError(err.detail, log=dest, op=err.op)
