"""Where a host's state lives: everything hangs off one root, MIGRATE_ROOT.

Test hosts on one machine get separate roots, so nothing of one host is visible to another.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/var/lib/migrate")
PARTIAL_PREFIX = ".partial-"  # snapshots/.partial-ID: a checkpoint still writing (or one that died)
SNAPSHOT_META = "snapshot.json"  # in a published snapshot: its catalog row, so it can be adopted
CHECKPOINT_META = "checkpoint.json"  # in every dump: how it was made (lazy or not), the stdio it had
STDIO_PIPES = "stdio.json"  # in a container's folder: its stdout and stderr pipes, as its shim made them
DUMP_SYNCED = "synced"  # in an in-doubt migration's complete dump: its files are on disk
INTERNAL_ERRORS = "internal-errors.log"  # in the root: tracebacks of the CLI's internal errors (bugs)


@dataclass(frozen=True)
class StateRoot:
    root: Path

    @classmethod
    def from_env(cls) -> "StateRoot":
        return cls(Path(os.environ.get("MIGRATE_ROOT", str(DEFAULT_ROOT))).absolute())

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def criu_logs(self) -> Path:
        """CRIU logs of failed dumps and restores (runtime/criulogs.py); they outlive the container."""
        return self.root / "criu-logs"

    @property
    def incoming(self) -> Path:
        """Migrations arriving here: incoming/HEX (images, upper dir, log) and HEX.owner."""
        return self.root / "incoming"

    @property
    def outgoing(self) -> Path:
        """Migrations leaving here: outgoing/NAME (CRIU's images while the source is frozen)."""
        return self.root / "outgoing"

    def container_dir(self, name: str) -> Path:
        return self.containers / name

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def partial_snapshot_dir(self, snapshot_id: str) -> Path:
        """Where a checkpoint writes before it publishes the snapshot (one rename to snapshot_dir)."""
        return self.snapshots / f"{PARTIAL_PREFIX}{snapshot_id}"

    @property
    def cgroup_parent(self) -> str:
        """The group of this root's containers' cgroups (runtime/cgroups.py): MIGRATE_CGROUP_ROOT,
        else unique per root so hosts sharing a kernel never clash."""
        chosen = os.environ.get("MIGRATE_CGROUP_ROOT", "").strip("/")
        if chosen:
            return chosen
        if self.root == DEFAULT_ROOT:
            return "migrate"
        return "migrate-" + hashlib.sha256(str(self.root).encode()).hexdigest()[:10]
