"""What one migration cost: downtime, total time, time per phase, bytes per kind."""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .output import human_size, print_note, print_table

BYTE_KINDS = ("layers", "upper", "pre-copy", "images", "pages")


@dataclass
class MigrationStats:
    container: str
    source: str
    target: str
    mode: str = "copy"
    page_link: str = ""  # how memory went, where a page connection carried it: "ssh" or "direct"
    phases: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KINDS, 0))
    downtime: float = 0.0
    total: float = 0.0
    notes: list[str] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - start

    def to_json(self) -> dict:
        return {"container": self.container, "source": self.source, "target": self.target, "mode": self.mode,
                "page_link": self.page_link or None,
                "downtime_s": round(self.downtime, 4), "total_s": round(self.total, 4),
                "phases_s": {k: round(v, 4) for k, v in self.phases.items()},
                "bytes": dict(self.bytes), "bytes_total": sum(self.bytes.values()), "notes": list(self.notes)}

    def print(self) -> None:
        for note in self.notes:
            print_note(note)
        rows = [("downtime", f"{self.downtime:.3f} s", "frozen on the source until running on the target"),
                ("total", f"{self.total:.3f} s", f"{self.mode} mode, {self.source} -> {self.target}")]
        if self.page_link:
            rows.append(("pages by", self.page_link, "plain TCP, unencrypted" if self.page_link == "direct"
                         else "the SSH connection"))
        rows += [(f"  {k}", f"{v:.3f} s", "") for k, v in self.phases.items()]
        rows += [(f"bytes {k}", human_size(v), "") for k, v in self.bytes.items()]
        rows.append(("bytes total", human_size(sum(self.bytes.values())), ""))
        print_table(("MEASURE", "VALUE", "NOTE"), rows)
