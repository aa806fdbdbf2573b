"""The pure part of the benchmark: pauses from the workload's own timestamps, medians, the
ratio to the by-hand baseline, the table and the JSON document. No I/O here, so it is
unit-tested (tests/unit/test_bench.py)."""

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

# the ways to move the container, in the order they alternate; -direct: with --direct (pages by plain TCP)
MOVES = ("copy", "copy-direct", "lazy", "lazy-direct", "by-hand")
LAZY_MOVES = ("lazy", "lazy-direct")
WIRES = ("ssh", "tcp")  # the same bytes, with nothing but the wire
BASELINE = "by-hand"
WORKLOADS = ("idle", "touch")
PAGES_PHASE = "pages (running)"  # lazy mode: the tool's phase from the restore to the target's last page
PAGES_WIRE = "ssh"  # the pages go through OpenSSH: their time is set against its
SCHEMA = 3  # 3: the -direct modes, "pages" rows per lazy mode; 2: "pages", lazy mode's memory after the restore


@dataclass
class Trial:
    """One measurement. Moves have a pause (seen by the workload) and a downtime (the tool's
    figure from --json; for by-hand, dump start to restore end as timed by the script);
    wires have only a total. `error` is set when it failed, and then nothing else counts."""

    size_mib: int
    mode: str
    rep: int
    workload: str | None = None
    pause_s: float | None = None
    downtime_s: float | None = None
    total_s: float | None = None
    bytes: int | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None


def parse_ticks(text: str) -> list[float]:
    """The REALTIME column of the workload's /ticks ("MONO REAL" per line), in file order.
    A torn last line (read while being written) is dropped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out.append(float(parts[1]))
            except ValueError:
                continue
    return out


def largest_gap(stamps: Sequence[float], start: float, end: float) -> tuple[float, float] | None:
    """(gap, where it began): the largest gap between consecutive timestamps whose interval
    overlaps [start, end], the window of the move. None if no interval overlaps it (the
    workload wrote nothing around the move). Out-of-order stamps (a clock step) count as 0."""
    best: tuple[float, float] | None = None
    for a, b in zip(stamps, stamps[1:], strict=False):
        if b < start or a > end:
            continue
        gap = max(0.0, b - a)
        if best is None or gap > best[0]:
            best = (gap, a)
    return best


def ticked_after(stamps: Sequence[float], moment: float) -> int:
    """How many timestamps were written after MOMENT: proof the workload runs on after a move."""
    return sum(1 for s in stamps if s > moment)


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


@dataclass(frozen=True)
class Row:
    size_mib: int
    workload: str  # "-" for the wires
    mode: str
    n: int
    failed: int
    pause_s: float | None
    downtime_s: float | None
    total_s: float | None
    ratio: float | None  # pause (a wire: its total) / the by-hand pause, same size and workload


def summarize(trials: Iterable[Trial]) -> list[Row]:
    """Median per (size, workload, mode); each move's pause against the by-hand baseline's, and
    each wire's time against the by-hand pause of the idle workload (the floor a copy could
    reach if the freeze moved only memory)."""
    trials = list(trials)
    groups: dict[tuple[int, str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.size_mib, t.workload or "-", t.mode), []).append(t)

    def med(key, attr):
        return median(getattr(t, attr) for t in groups.get(key, []) if t.error is None)

    order = {m: i for i, m in enumerate((*MOVES, *WIRES))}
    rows = []
    for size, workload, mode in sorted(groups, key=lambda k: (k[0], k[1] == "-", k[1], order.get(k[2], 99))):
        key = (size, workload, mode)
        ok = [t for t in groups[key] if t.error is None]
        base = med((size, workload if workload != "-" else "idle", BASELINE), "pause_s")
        mine = med(key, "pause_s") if mode in MOVES else med(key, "total_s")
        rows.append(Row(size, workload, mode, len(ok), len(groups[key]) - len(ok), med(key, "pause_s"),
                        med(key, "downtime_s"), med(key, "total_s"),
                        mine / base if mine is not None and base else None))
    return rows


@dataclass(frozen=True)
class PagesRow:
    """Lazy mode: how long after the restore the target had every page, against the same bytes
    through ssh in the same run (the issue's bar: within 1.3x)."""

    size_mib: int
    workload: str
    mode: str
    n: int
    pages_s: float | None
    wire_s: float | None
    ratio: float | None


def summarize_pages(trials: Iterable[Trial]) -> list[PagesRow]:
    """Median per (size, workload, lazy mode) of PAGES_PHASE, and of the PAGES_WIRE transfer."""
    trials = [t for t in trials if t.error is None]
    rows = []
    order = {m: i for i, m in enumerate(LAZY_MOVES)}
    for size, workload, mode in sorted({(t.size_mib, t.workload, t.mode) for t in trials if t.mode in LAZY_MOVES},
                                       key=lambda k: (k[0], k[1], order[k[2]])):
        pages = [t.detail.get("phases_s", {}).get(PAGES_PHASE) for t in trials
                 if (t.size_mib, t.workload, t.mode) == (size, workload, mode)]
        pages_s = median(pages)
        wire_s = median(t.total_s for t in trials if (t.size_mib, t.mode) == (size, PAGES_WIRE))
        rows.append(PagesRow(size, workload, mode, sum(1 for p in pages if p is not None), pages_s, wire_s,
                             pages_s / wire_s if pages_s is not None and wire_s else None))
    return rows


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(rows: Sequence[Row], machine: dict) -> str:
    """A Markdown table of the medians, headed by the machine it ran on."""
    head = [f"# migrate bench, {machine.get('date', '?')}", "",
            f"machine: {machine.get('hostname', '?')}, {machine.get('nproc', '?')} CPUs, "
            f"{_num(machine.get('mem_gib'), '{:.1f}')} GiB, kernel {machine.get('kernel', '?')}, "
            f"CRIU {machine.get('criu', '?')}, load {machine.get('load_start', '?')} at start, "
            f"{machine.get('load_end', '?')} at end", "",
            "Medians. pause: largest gap between the workload's own 5 ms timestamps around the move; "
            "downtime: the tool's --json figure (by-hand: dump start to restore end); total: the whole "
            "command (by-hand: from the running pre-sync of the upper dir to the restore; wires: the "
            "transfer of the memory's size); ratio: pause (wires: total) / by-hand pause.", "",
            "| MiB | workload | mode | n | failed | pause s | downtime s | total s | ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    body = [f"| {r.size_mib} | {r.workload} | {r.mode} | {r.n} | {r.failed} | {_num(r.pause_s)} | "
            f"{_num(r.downtime_s)} | {_num(r.total_s)} | {_num(r.ratio, '{:.2f}x')} |" for r in rows]
    return "\n".join(head + body) + "\n"


def format_pages_table(rows: Sequence[PagesRow]) -> str:
    """Lazy mode's memory after the restore, as a Markdown table."""
    head = ["Lazy mode's memory after the restore (medians): pages s, from the restore until the target "
            f"had every page (the tool's \"{PAGES_PHASE}\" phase); {PAGES_WIRE} s, the same bytes through "
            f"{PAGES_WIRE} in this run; ratio: pages / {PAGES_WIRE}.", "",
            f"| MiB | workload | mode | n | pages s | {PAGES_WIRE} s | ratio |", "|---|---|---|---|---|---|---|"]
    body = [f"| {r.size_mib} | {r.workload} | {r.mode} | {r.n} | {_num(r.pages_s)} | {_num(r.wire_s)} | "
            f"{_num(r.ratio, '{:.2f}x')} |" for r in rows]
    return "\n".join(head + body) + "\n"


def document(trials: Sequence[Trial], machine: dict, settings: dict) -> dict:
    """The JSON written next to the table: everything measured, and the medians made of it."""
    return {"schema": SCHEMA, "machine": machine, "settings": settings,
            "trials": [asdict(t) for t in trials],
            "medians": [asdict(r) for r in summarize(trials)],
            "pages": [asdict(r) for r in summarize_pages(trials)]}


def parse_sizes(text: str) -> list[int]:
    """"64M,256M,1G" -> [64, 256, 1024] (MiB); a bare number is MiB."""
    out = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("IB").removesuffix("B")
        scale = 1024 if part.endswith("G") else 1
        number = part.rstrip("GM")
        if not number.isdigit() or int(number) <= 0:
            raise ValueError(f"not a memory size: {text!r} (say 64M, 512M, 1G)")
        out.append(int(number) * scale)
    return out
