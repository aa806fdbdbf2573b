"""The migration journal: what each host of a migration is about to do, written before it does it.

Every migration has an id; each of its two hosts keeps a row for it (its role: source or target)
and, per step, a `begin` line before the step and a `done` or `failed` line after it, each in
its own durable SQLite transaction. What survives a crash is then what the host had begun.

The target's row also holds the migration's one decision: its outcome goes from undecided to
`committed` or `aborted` exactly once, by a conditional write, whoever tries first (the agent
committing, the fenced shim seeing its agent vanish, a `resolve` from the source asking after a
lost answer). So the copy there runs on exactly when the source may let its own go.
"""

import sqlite3
import time
from dataclasses import dataclass

SOURCE = "source"
TARGET = "target"
COMMITTED = "committed"
ABORTED = "aborted"
KEEP_FINISHED = 200  # finished migrations kept per host, newest first (unfinished ones always)

SCHEMA = (
    """CREATE TABLE migrations (
        id TEXT NOT NULL,
        role TEXT NOT NULL,
        container TEXT NOT NULL,
        peer TEXT NOT NULL,
        started REAL NOT NULL,
        outcome TEXT,
        decided REAL,
        finished REAL,
        PRIMARY KEY (id, role))""",
    """CREATE TABLE journal (
        migration TEXT NOT NULL,
        role TEXT NOT NULL,
        seq INTEGER NOT NULL,
        step TEXT NOT NULL,
        event TEXT NOT NULL,
        detail TEXT,
        at REAL NOT NULL,
        PRIMARY KEY (migration, role, seq))""",
)


@dataclass(frozen=True)
class MigrationRow:
    id: str
    role: str
    container: str
    peer: str
    started: float
    outcome: str | None
    finished: float | None


@dataclass(frozen=True)
class Entry:
    step: str
    event: str  # begin, done, failed
    detail: str | None
    at: float


class Journal:
    """The journal tables of one catalog connection (autocommit: every write is durable alone)."""

    def __init__(self, db: sqlite3.Connection, transaction):
        self._db = db
        self._transaction = transaction

    def begin(self, migration: str, role: str, container: str, peer: str) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO migrations (id, role, container, peer, started) VALUES (?,?,?,?,?)",
                             (migration, role, container, peer, time.time()))
            self._prune()

    def note(self, migration: str, role: str, step: str, event: str, detail: str | None = None) -> None:
        with self._transaction():
            (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM journal WHERE migration=? AND role=?",
                                      (migration, role)).fetchone()
            self._db.execute("INSERT INTO journal VALUES (?,?,?,?,?,?,?)",
                             (migration, role, seq, step, event, detail, time.time()))

    def decide(self, migration: str, role: str, outcome: str) -> str | None:
        """Set the outcome unless one is set already; returns the outcome that holds (None when
        this host has no such migration)."""
        with self._transaction():
            self._db.execute("UPDATE migrations SET outcome=?, decided=? WHERE id=? AND role=? AND outcome IS NULL",
                             (outcome, time.time(), migration, role))
            row = self._db.execute("SELECT outcome FROM migrations WHERE id=? AND role=?",
                                   (migration, role)).fetchone()
        return row[0] if row else None

    def finish(self, migration: str, role: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE migrations SET finished=? WHERE id=? AND role=? AND finished IS NULL",
                             (time.time(), migration, role))

    def get(self, migration: str, role: str) -> MigrationRow | None:
        row = self._db.execute("SELECT * FROM migrations WHERE id=? AND role=?", (migration, role)).fetchone()
        return _row(row) if row else None

    def unfinished(self, container: str | None = None) -> list[MigrationRow]:
        rows = self._db.execute("SELECT * FROM migrations WHERE finished IS NULL ORDER BY started")
        return [r for r in map(_row, rows) if container is None or r.container == container]

    def commit_state(self, container: str) -> tuple[str, MigrationRow] | None:
        """How far the unfinished migration of `container` from this host got with its commit:
        ("committed", row) once the target's yes is known here, ("asked", row) when the target
        was asked and the answer never came (a commit step begun, neither done nor failed)."""
        for row in reversed(self.unfinished(container)):
            if row.role != SOURCE:
                continue
            if row.outcome == COMMITTED:
                return COMMITTED, row
            events = {(e.step, e.event) for e in self.entries(row.id, SOURCE)}
            if ("commit", "begin") in events and not events & {("commit", "done"), ("commit", "failed")}:
                return "asked", row
        return None

    def entries(self, migration: str, role: str) -> list[Entry]:
        rows = self._db.execute("SELECT step, event, detail, at FROM journal WHERE migration=? AND role=? "
                                "ORDER BY seq", (migration, role))
        return [Entry(*r) for r in rows]

    def _prune(self) -> None:
        old = [tuple(r) for r in self._db.execute(
            "SELECT id, role FROM migrations WHERE finished IS NOT NULL ORDER BY started DESC LIMIT -1 OFFSET ?",
            (KEEP_FINISHED,))]
        for migration, role in old:
            self._db.execute("DELETE FROM journal WHERE migration=? AND role=?", (migration, role))
            self._db.execute("DELETE FROM migrations WHERE id=? AND role=?", (migration, role))


def _row(row) -> MigrationRow:
    return MigrationRow(row["id"], row["role"], row["container"], row["peer"], row["started"], row["outcome"],
                        row["finished"])
