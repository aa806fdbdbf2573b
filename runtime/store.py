"""The SQLite catalog of one host: images, containers, snapshots.

Each CLI call and each shim opens it briefly; WAL mode and a busy timeout let them share it.
State changes are conditional UPDATEs, so two writers can never both win a transition.
"""

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import journal, states
from .errors import Conflict, NotFound
from .linux import proc_identity
from .spec import ContainerSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    layers TEXT NOT NULL,
    config TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    pid INTEGER,
    shim_pid INTEGER,
    cgroups TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    exit_code INTEGER
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    container TEXT NOT NULL,
    tag TEXT,
    created REAL NOT NULL,
    spec TEXT NOT NULL,
    criu_version TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""
# What each schema version adds to the one before (PRAGMA user_version counts them). Catalogs
# made before versions were counted are version 0: the tables above, as they were then.
_MIGRATIONS = (
    # the process holding a transient state: {"pid": N, "start": TICKS}, so a dead one is a fact
    "ALTER TABLE containers ADD COLUMN owner TEXT",
    # version 2: the migration journal (runtime/journal.py), and on a migration's target the id
    # of the migration whose uncommitted copy a record is
    *journal.SCHEMA,
    "ALTER TABLE containers ADD COLUMN migration TEXT",
    # version 3: snapshots taken by a schedule (retention prunes only those), and how long
    # the container was frozen for each
    "ALTER TABLE snapshots ADD COLUMN scheduled INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE snapshots ADD COLUMN pause REAL",
    # the snapshot a container was last restored from: with those taken since it was created,
    # the snapshots that are its own (older ones of its name belong to an earlier container)
    "ALTER TABLE containers ADD COLUMN restored_from TEXT",
)
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass(frozen=True)
class ImageRecord:
    name: str
    id: str
    layers: tuple[str, ...]
    config: dict
    size: int
    created: float


@dataclass(frozen=True)
class ContainerRecord:
    name: str
    state: str
    spec: ContainerSpec
    pid: int | None
    shim_pid: int | None
    cgroups: dict
    created: float
    started: float | None
    finished: float | None
    exit_code: int | None
    owner: dict | None = None  # {"pid", "start"} of the process holding a transient state
    migration: str | None = None  # on a migration's target, until its commit: that migration's id
    restored_from: str | None = None  # the snapshot it was last restored from, if any


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    container: str
    tag: str | None
    created: float
    spec: ContainerSpec
    criu_version: str
    size: int
    scheduled: bool = False  # taken by the container's schedule (runtime/schedule.py), pruned by it
    pause: float | None = None  # seconds the container was frozen for it, as CRIU measured


class Catalog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        # a migration journals from CRIU's notification thread too: transactions take a lock
        self._db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed write survives a power cut
        self._migrate()
        self.journal = journal.Journal(self._db, self.transaction)

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION in one transaction (several processes may race)."""
        with self.transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise Conflict(f"the catalog {self.path} is of a newer version of this tool "
                               f"(schema {version}, this one knows {SCHEMA_VERSION})")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            for stmt in _MIGRATIONS[version:]:
                self._db.execute(stmt)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # images
    def add_image(self, rec: ImageRecord) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?)",
            (rec.name, rec.id, json.dumps(rec.layers), json.dumps(rec.config), rec.size, rec.created),
        )

    def image(self, ref: str) -> ImageRecord:
        """By name (`busybox` means `busybox:latest`), full id, or id prefix of 12 or more hex digits."""
        name = ref if ":" in ref.rpartition("/")[2] else f"{ref}:latest"
        row = self._db.execute("SELECT * FROM images WHERE name=? OR id=?", (name, ref)).fetchone()
        if row is None and len(ref) >= 12 and all(c in "0123456789abcdef" for c in ref):
            rows = self._db.execute("SELECT * FROM images WHERE id LIKE ?", (f"sha256:{ref}%",)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise NotFound(f"no such image: {ref}")
        return _image(row)

    def images(self) -> list[ImageRecord]:
        return [_image(r) for r in self._db.execute("SELECT * FROM images ORDER BY name")]

    def remove_image(self, name: str) -> None:
        self._db.execute("DELETE FROM images WHERE name=?", (name,))

    def layers_in_use(self) -> set[str]:
        used: set[str] = set()
        for (layers,) in self._db.execute("SELECT layers FROM images"):
            used.update(json.loads(layers))
        for rec in self.containers():
            used.update(rec.spec.layers)
        for snap in self.snapshots():
            used.update(snap.spec.layers)
        return used

    # containers
    def add_container(self, spec: ContainerSpec, state: str = states.CREATED) -> None:
        try:
            self._db.execute(
                "INSERT INTO containers (name, state, spec, created) VALUES (?,?,?,?)",
                (spec.name, state, spec.to_json(), time.time()),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"a container named {spec.name} already exists") from None

    def container(self, name: str) -> ContainerRecord:
        row = self._db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no such container: {name}")
        return _container(row)

    def find_container(self, name: str) -> ContainerRecord | None:
        row = self._db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        return _container(row) if row else None

    def containers(self) -> list[ContainerRecord]:
        return [_container(r) for r in self._db.execute("SELECT * FROM containers ORDER BY name")]

    def transition(self, name: str, action: str, **fields) -> ContainerRecord:
        """Apply a state-machine action atomically; extra column values are set in the same write.

        A transient state (checkpointing, restoring, migrating) records this process as its
        owner; any other state clears the owner."""
        with self.transaction():
            rec = self.container(name)
            new_state = states.check(action, rec.state, name)
            if new_state in states.TRANSIENT:
                fields.setdefault("owner", own_identity())
            else:
                fields["owner"] = None
            self._update(name, state=new_state, **fields)
        return self.container(name)

    def settle(self, name: str, expected: ContainerRecord, action: str, **fields) -> bool:
        """Apply `action` only if the record is still exactly `expected` (state and owner): what
        reconcile decided from facts must not override anybody who moved meanwhile."""
        with self.transaction():
            rec = self.find_container(name)
            if rec is None or (rec.state, rec.owner, rec.shim_pid) != (expected.state, expected.owner,
                                                                       expected.shim_pid):
                return False
            self._update(name, state=states.check(action, rec.state, name), owner=None, **fields)
        return True

    def update_if_state(self, name: str, expected: str, **fields) -> bool:
        """Set fields only while the container is still in `expected` (used by the shim)."""
        cols, values = _assignments(fields)
        cur = self._db.execute(f"UPDATE containers SET {cols} WHERE name=? AND state=?", (*values, name, expected))
        return cur.rowcount == 1

    def set_fields(self, name: str, **fields) -> None:
        self._update(name, **fields)

    def _update(self, name: str, **fields) -> None:
        cols, values = _assignments(fields)
        self._db.execute(f"UPDATE containers SET {cols} WHERE name=?", (*values, name))

    def remove_container(self, name: str) -> None:
        self._db.execute("DELETE FROM containers WHERE name=?", (name,))

    def remove_if_state(self, name: str, expected: str) -> bool:
        return self._db.execute("DELETE FROM containers WHERE name=? AND state=?", (name, expected)).rowcount == 1

    # snapshots
    def require_free_tag(self, container: str, tag: str | None) -> None:
        if tag and self._db.execute(
            "SELECT 1 FROM snapshots WHERE container=? AND tag=?", (container, tag)
        ).fetchone():
            raise Conflict(f"{container} already has a snapshot tagged {tag}")

    def add_snapshot(self, rec: SnapshotRecord) -> None:
        self.require_free_tag(rec.container, rec.tag)
        self._db.execute(
            "INSERT INTO snapshots (id, container, tag, created, spec, criu_version, size, scheduled, pause) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (rec.id, rec.container, rec.tag, rec.created, rec.spec.to_json(), rec.criu_version, rec.size,
             int(rec.scheduled), rec.pause),
        )

    def snapshots(self, container: str | None = None) -> list[SnapshotRecord]:
        if container is None:
            rows = self._db.execute("SELECT * FROM snapshots ORDER BY created")
        else:
            rows = self._db.execute("SELECT * FROM snapshots WHERE container=? ORDER BY created", (container,))
        return [_snapshot(r) for r in rows]

    def own_snapshots(self, rec: ContainerRecord) -> list[SnapshotRecord]:
        """REC's snapshots, oldest first: those taken since it was created and the one it was
        restored from. Others of its name are an earlier container's, removed and run anew."""
        return [s for s in self.snapshots(rec.name) if s.created >= rec.created or s.id == rec.restored_from]

    def snapshot(self, ref: str, container: str | None = None) -> SnapshotRecord:
        """Find a snapshot by id, or by tag within a container."""
        row = self._db.execute("SELECT * FROM snapshots WHERE id=?", (ref,)).fetchone()
        if row is None and container is not None:
            row = self._db.execute(
                "SELECT * FROM snapshots WHERE container=? AND tag=?", (container, ref)
            ).fetchone()
        if row is None:
            raise NotFound(f"no such snapshot: {ref}")
        return _snapshot(row)

    def remove_snapshot(self, snapshot_id: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))


_CONTAINER_COLUMNS = frozenset({"state", "spec", "pid", "shim_pid", "cgroups", "started", "finished", "exit_code",
                                "owner", "migration", "restored_from"})
_JSON_COLUMNS = frozenset({"cgroups", "owner"})


def own_identity() -> dict:
    pid, start = proc_identity(os.getpid())
    return {"pid": pid, "start": start}


def _assignments(fields: dict) -> tuple[str, list]:
    """SET clause and values; column names come from code, never from input, and are checked."""
    unknown = set(fields) - _CONTAINER_COLUMNS
    if unknown:
        raise ValueError(f"not container columns: {sorted(unknown)}")
    values = [json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items()]
    return ", ".join(f"{k}=?" for k in fields), values


def _image(row) -> ImageRecord:
    return ImageRecord(row["name"], row["id"], tuple(json.loads(row["layers"])), json.loads(row["config"]),
                       row["size"], row["created"])


def _container(row) -> ContainerRecord:
    return ContainerRecord(
        name=row["name"], state=row["state"], spec=ContainerSpec.from_json(row["spec"]), pid=row["pid"],
        shim_pid=row["shim_pid"], cgroups=json.loads(row["cgroups"]), created=row["created"],
        started=row["started"], finished=row["finished"], exit_code=row["exit_code"],
        owner=json.loads(row["owner"]) if row["owner"] else None, migration=row["migration"],
        restored_from=row["restored_from"],
    )


def _snapshot(row) -> SnapshotRecord:
    return SnapshotRecord(row["id"], row["container"], row["tag"], row["created"],
                          ContainerSpec.from_json(row["spec"]), row["criu_version"], row["size"],
                          bool(row["scheduled"]), row["pause"])
