"""The benchmark behind ./scripts/bench: on two local test hosts, a container holding SIZE of
memory and a 100 MB upper dir (5,000 files) is moved from host-a to host-b by the tool in copy
mode and in lazy mode (each through SSH, and with --direct: pages by plain TCP), and by hand
(criu dump, rsync over ssh, criu restore: see
scripts/benchkit/moves.py for exactly what), with a workload that only ticks and one that
rewrites all its memory every 250 ms; the same bytes also go through ssh and plain TCP. The
pause is what the workload saw: the largest gap between its own 5 ms timestamps. Modes
alternate within each repetition. Prints the medians and the ratio to the by-hand baseline,
and how long lazy mode's memory took after the restore against ssh, and writes bench.md,
results.json and bench.png into --out."""

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import moves, plot, results, wire, workload
from benchkit.moves import MIGRATE, SOURCE, TARGET, BenchError, ByHand
from benchkit.results import MOVES, WIRES, WORKLOADS, Trial
from migrate.testhosts import TestHosts
from runtime.criu import Criu

REPO = Path(__file__).resolve().parents[1]
SETTLE_BEFORE = 1.0  # the workload runs this long after its first ticks before it is moved
SETTLE_AFTER = 1.0  # and this long on host-b before its timestamps are read


def machine_info(criu: Criu) -> dict:
    """What the numbers were measured on (a shared machine's load included)."""
    with open("/proc/meminfo") as f:
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return {"hostname": socket.gethostname(), "nproc": len(os.sched_getaffinity(0)), "mem_gib": mem_kib / 2**20,
            "kernel": os.uname().release, "criu": criu.version(), "criu_binary": criu.binary, "openssh": ssh,
            "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def move_trial(hosts: TestHosts, criu: Criu, size: int, load: str, mode: str, rep: int) -> Trial:
    """Start the workload on host-a, move it to host-b, read the pause from its timestamps."""
    trial = Trial(size, mode, rep, load)
    name = f"bench-{size}m-{load}-{mode}-{rep}"
    by_hand = ByHand(hosts, name, criu.binary) if mode == "by-hand" else None
    try:
        moves.start(hosts, name, size, touch=load == "touch")
        time.sleep(SETTLE_BEFORE)
        began = time.time()
        if by_hand is not None:
            stats, ticks = by_hand.move(), by_hand.ticks
            trial.bytes = stats["bytes"]
        else:
            stats, ticks = moves.move_tool(hosts, name, mode), moves.tool_ticks(hosts, TARGET, name)
            trial.bytes = stats["bytes_total"]
        ended = time.time()
        time.sleep(SETTLE_AFTER)
        stamps = results.parse_ticks(ticks.read_text())
        gap = results.largest_gap(stamps, began, time.time())
        if gap is None or results.ticked_after(stamps, ended) < 10:
            raise BenchError(f"the workload did not tick on host-b after the move ({len(stamps)} timestamps)")
        trial.pause_s = gap[0]
        trial.downtime_s, trial.total_s = stats["downtime_s"], stats["total_s"]
        trial.detail = {"phases_s": stats["phases_s"], "pause_began_s": gap[1] - began,
                        "move_began": began, "move_ended": ended}
    except (BenchError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
        trial.error = str(e)[-1500:]
    finally:
        if by_hand is not None:
            by_hand.clean()
        else:
            moves.remove_tool(hosts, name)
    return trial


def wire_trial(hosts: TestHosts, data: Path, size: int, mode: str, rep: int) -> Trial:
    trial = Trial(size, mode, rep, bytes=data.stat().st_size)
    try:
        trial.total_s = (wire.through_ssh if mode == "ssh" else wire.through_tcp)(hosts, data)
    except (BenchError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        trial.error = str(e)[-1500:]
    return trial


def report(t: Trial, done: int, planned: int, started: float) -> None:
    what = (f"bench: [{done}/{planned} {time.monotonic() - started:.0f}s] {t.size_mib} MiB "
            f"{t.workload + ' ' if t.workload else ''}{t.mode} #{t.rep}")
    if t.error:
        print(f"{what}: FAILED: {t.error}", file=sys.stderr, flush=True)
    elif t.mode in WIRES:
        print(f"{what}: {t.total_s:.3f} s", flush=True)
    else:
        print(f"{what}: pause {t.pause_s:.3f} s, downtime {t.downtime_s:.3f} s, total {t.total_s:.3f} s", flush=True)


def _interrupted(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    # Ctrl-C, SIGTERM and SIGHUP all unwind: the trial's container is removed, the test hosts
    # torn down (SIGINT too when a shell started us in the background with it ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64M,256M,512M,1G", help="memory sizes (default 64M,256M,512M,1G)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each mode (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 64M only, 1 repetition, written to a temporary folder unless --out")
    ap.add_argument("--out", type=Path, help="where to write bench.md, results.json, bench.png (default docs/bench)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (containers, namespaces and CRIU need it)")
    sizes = [64] if a.quick else results.parse_sizes(a.sizes)
    reps = 1 if a.quick else a.reps
    if reps < 1:
        raise SystemExit("bench: --reps must be at least 1")
    out = a.out or (Path(tempfile.mkdtemp(prefix="migrate-bench-quick-")) if a.quick else REPO / "docs" / "bench")
    criu = Criu()
    machine = machine_info(criu)
    planned = len(sizes) * reps * (len(WORKLOADS) * len(MOVES) + len(WIRES))
    print(f"bench: sizes {', '.join(f'{s} MiB' for s in sizes)}, {reps} repetition(s), {planned} trials; "
          f"{machine['nproc']} CPUs, load {machine['load_start']}, CRIU {machine['criu']}", flush=True)
    started = time.monotonic()
    trials: list[Trial] = []
    with TestHosts(2, remote_command=MIGRATE) as hosts:
        image = workload.build(hosts.base / "benchload.tar")
        for host in (SOURCE, TARGET):  # on both, as if pulled: no trial moves layers
            moves.migrate(hosts, host, "image", "import", str(image))
        for size in sizes:
            data = wire.payload(hosts.base, size)
            for rep in range(1, reps + 1):
                for load in WORKLOADS:
                    for mode in MOVES:
                        trials.append(move_trial(hosts, criu, size, load, mode, rep))
                        report(trials[-1], len(trials), planned, started)
                for mode in WIRES:
                    trials.append(wire_trial(hosts, data, size, mode, rep))
                    report(trials[-1], len(trials), planned, started)
            data.unlink()
    machine["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["seconds"] = round(time.monotonic() - started, 1)
    settings = {"sizes_mib": sizes, "reps": reps, "quick": a.quick, "tick_s": workload.TICK_S,
                "touch_every_s": workload.TOUCH_S, "upper_files": workload.NFILES,
                "upper_file_bytes": workload.FILE_BYTES, "order": "per size and repetition: "
                f"for each workload {', '.join(MOVES)}; then {', '.join(WIRES)}"}
    rows = results.summarize(trials)
    table = results.format_table(rows, machine) + "\n" + results.format_pages_table(results.summarize_pages(trials))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(table + "\n![pause and total time against memory size](bench.png)\n")
    (out / "results.json").write_text(json.dumps(results.document(trials, machine, settings), indent=2) + "\n")
    plot.plot(rows, f"migrate bench, {machine['date']}, {machine['hostname']}, {machine['nproc']} CPUs, "
              f"kernel {machine['kernel']}, CRIU {machine['criu']}", out / "bench.png")
    print(table)
    failed = sum(1 for t in trials if t.error)
    print(f"bench: {len(trials)} trials, {failed} failed, {machine['seconds']:.0f} s; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"bench: interrupted ({e or 'Ctrl-C'}); its containers and test hosts are removed", file=sys.stderr)
        sys.exit(130)
