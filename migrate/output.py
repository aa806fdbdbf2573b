"""How results reach the user: rich tables for people, JSON for scripts."""

import errno
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich's own answer (SystemExit(1) wherever the print was) is replaced by the error
        itself: the CLI tells a reader that stopped reading (`migrate ps | head`) from a bug."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)

# Terminal escapes whole (CSI, OSC, DCS/SOS/PM/APC strings, two-byte ESC sequences, 8-bit CSI/OSC),
# then any other C0 or C1 control but tab and newline. rich strips only a few of them (REVIEW S7).
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def printable(text: str) -> str:
    """TEXT without terminal escapes or control characters (tab and newline kept): what reaches
    the terminal from another host (an agent's error, a remote stderr line) must not move the
    cursor, retitle the window, rewrite what was printed before or plant a clickable link."""
    return _ESCAPES.sub("", text)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_age(ts: float | None) -> str:
    if ts is None:
        return "-"
    secs = max(0, int(time.time() - ts))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def human_duration(seconds: float | None) -> str:
    """0.25 -> '250ms', 90 -> '1m30s', 7200 -> '2h'."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    text = ""
    rest = int(round(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if rest >= size:
            text += f"{rest // size}{unit}"
            rest %= size
    return text


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(Text("-" if v is None else printable(str(v))) for v in r))  # cells may come from a peer
    out.print(table)


def print_error(text: str) -> None:
    err.print(f"migrate: error: {printable(text)}", markup=False)


def print_note(text: str) -> None:
    err.print(f"migrate: note: {printable(text)}", markup=False)
