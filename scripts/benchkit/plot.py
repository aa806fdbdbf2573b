"""The benchmark's PNG: pause and total time against memory size, one line per mode and
workload (the wires as dashed lines). matplotlib is not a dependency of the tool: it is the
optional group `bench` (pyproject.toml), installed into the venv on first use."""

import importlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .results import MOVES, WIRES, Row

REQUIREMENT = "matplotlib>=3.6"  # the same as pyproject.toml's optional group `bench`


def _pyplot():
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        print(f"bench: installing {REQUIREMENT} into {sys.prefix} (the optional group `bench`)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-input", "--disable-pip-version-check",
                        REQUIREMENT], check=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: Sequence[Row], title: str, out: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, attr, label in ((axes[0], "pause_s", "pause seen by the workload (s)"),
                            (axes[1], "total_s", "total time of the move (s)")):
        for workload in sorted({r.workload for r in rows if r.workload != "-"}):
            for mode in MOVES:
                pts = [(r.size_mib, getattr(r, attr)) for r in rows
                       if r.workload == workload and r.mode == mode and getattr(r, attr) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=f"{mode}, {workload}",
                            linestyle="-." if mode.endswith("-direct") else "-")
        for mode in WIRES:
            pts = [(r.size_mib, r.total_s) for r in rows if r.mode == mode and r.total_s is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), linestyle="--", marker=".", label=f"wire: {mode}")
        ax.set_xlabel("memory (MiB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[1].legend(fontsize="small")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
