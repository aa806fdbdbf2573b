"""The migration journal: one decision per migration, taken once; what a source knows of its
commit; the README's step table is the code's."""

from pathlib import Path

from migrate import steps
from runtime import journal
from runtime.store import Catalog

MID = "00112233aabbccdd"


def test_the_outcome_is_decided_once_whoever_tries_first(tmp_path):
    cat = Catalog(tmp_path / "state.db")
    j = cat.journal
    j.begin(MID, journal.TARGET, "c1", "host-a")
    assert j.decide(MID, journal.TARGET, journal.COMMITTED) == journal.COMMITTED
    assert j.decide(MID, journal.TARGET, journal.ABORTED) == journal.COMMITTED  # too late: it holds
    assert j.decide("ffffffffffffffff", journal.TARGET, journal.ABORTED) is None  # never heard of
    other = Catalog(tmp_path / "state.db")  # another process sees the same decision
    assert other.journal.get(MID, journal.TARGET).outcome == journal.COMMITTED
    other.close()
    cat.close()


def test_a_source_knows_whether_it_asked_for_the_commit_and_what_came_back(tmp_path):
    cat = Catalog(tmp_path / "state.db")
    j = cat.journal
    j.begin(MID, journal.SOURCE, "c1", "host-b")
    for step in ("preflight", "checkpoint"):
        j.note(MID, journal.SOURCE, step, "begin")
        j.note(MID, journal.SOURCE, step, "done")
    assert j.commit_state("c1") is None
    j.note(MID, journal.SOURCE, "commit", "begin")
    assert j.commit_state("c1")[0] == "asked"
    j.decide(MID, journal.SOURCE, journal.COMMITTED)
    assert j.commit_state("c1")[0] == journal.COMMITTED
    j.finish(MID, journal.SOURCE)
    assert j.commit_state("c1") is None and j.unfinished() == []
    assert [(e.step, e.event) for e in j.entries(MID, journal.SOURCE)][-1] == ("commit", "begin")
    cat.close()


def test_a_failed_commit_is_not_in_doubt(tmp_path):
    cat = Catalog(tmp_path / "state.db")
    cat.journal.begin(MID, journal.SOURCE, "c1", "host-b")
    cat.journal.note(MID, journal.SOURCE, "commit", "begin")
    cat.journal.note(MID, journal.SOURCE, "commit", "failed", "host-b: c1 no longer runs")
    assert cat.journal.commit_state("c1") is None
    cat.close()


def test_finished_migrations_are_pruned_beyond_the_newest(tmp_path, monkeypatch):
    monkeypatch.setattr(journal, "KEEP_FINISHED", 3)
    cat = Catalog(tmp_path / "state.db")
    for i in range(6):
        mid = f"{i:016x}"
        cat.journal.begin(mid, journal.SOURCE, "c1", "host-b")
        cat.journal.note(mid, journal.SOURCE, "preflight", "begin")
        cat.journal.finish(mid, journal.SOURCE)
    cat.journal.begin("f" * 16, journal.SOURCE, "c1", "host-b")  # unfinished: never pruned
    kept = [r[0] for r in cat._db.execute("SELECT id FROM migrations")]
    assert len(kept) == 4 and "f" * 16 in kept
    assert cat._db.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 3
    cat.close()


def test_the_readme_shows_the_steps_as_the_code_has_them():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert steps.markdown() in readme, "README is out of date: paste `python -m migrate.steps` into it"
