"""Settling records from facts: the decision table of runtime/reconcile.py, and the catalog's
schema versions and conditional settle."""

import json
import os
import sqlite3

import pytest

from runtime import states
from runtime.reconcile import Facts, decide
from runtime.spec import ContainerSpec
from runtime.store import SCHEMA_VERSION, Catalog


def facts(owner=False, shim=False, tree=False, traced=False, commit=None) -> Facts:
    return Facts(owner_alive=owner, shim_alive=shim, tree_alive=tree, traced=traced, commit=commit)


def test_a_running_record_without_shim_or_processes_is_lost():
    assert decide(states.RUNNING, facts())[0] == "lost"
    assert decide(states.RUNNING, facts(shim=True, tree=True)) is None
    assert decide(states.RUNNING, facts(tree=True)) is None  # processes run: never called lost


@pytest.mark.parametrize("state", [states.CHECKPOINTING, states.MIGRATING, states.RESTORING])
def test_a_live_owner_is_never_overruled(state):
    for f in (facts(owner=True), facts(owner=True, tree=True), facts(owner=True, shim=True, tree=True)):
        assert decide(state, f) is None


@pytest.mark.parametrize("state", [states.CHECKPOINTING, states.MIGRATING])
def test_an_interrupted_dump_resumes_or_is_lost(state):
    assert decide(state, facts(shim=True, tree=True))[0] == "resumed"
    assert decide(state, facts())[0] == "lost"


def test_a_criu_that_outlived_its_operation():
    # a checkpoint's CRIU lets the tree go by itself at its next notification: wait for it
    assert decide(states.CHECKPOINTING, facts(shim=True, tree=True, traced=True)) is None
    # a lazy migration's page server may wait forever with the tree frozen: it is ended
    assert decide(states.MIGRATING, facts(shim=True, tree=True, traced=True))[0] == "release"
    assert decide(states.MIGRATING, facts(owner=True, shim=True, tree=True, traced=True)) is None


def test_a_migration_that_died_in_its_commit_follows_the_journal():
    # asked, answer unknown: held, whatever its processes do, until recover asks the target
    for tree in (True, False):
        assert decide(states.MIGRATING, facts(shim=True, tree=tree, commit="asked"))[0] == "migrate-in-doubt"
    # the target's yes is known here: only the cleanup was left
    assert decide(states.MIGRATING, facts(shim=True, tree=True, commit="committed"))[0] == "migrate-done"
    # a CRIU still holding it is ended first (the tree is frozen by its cgroup meanwhile)
    assert decide(states.MIGRATING, facts(shim=True, tree=True, traced=True, commit="asked"))[0] == "release"
    assert decide(states.MIGRATING, facts(owner=True, tree=True, commit="asked")) is None
    assert decide(states.IN_DOUBT, facts(tree=True)) is None  # only recover, which asks the peer, settles it


def test_in_doubt_is_left_only_by_recover():
    assert states.check("recover-kept", states.IN_DOUBT) == states.RUNNING
    for action in ("stop", "checkpoint", "migrate", "exec", "remove", "restore"):
        with pytest.raises(Exception, match="run `migrate recover c1`"):
            states.check(action, states.IN_DOUBT, "c1")


def test_an_interrupted_restore_waits_for_its_shim():
    assert decide(states.RESTORING, facts(shim=True, tree=True)) is None
    assert decide(states.RESTORING, facts())[0] == "lost"
    assert decide(states.RESTORING, facts(tree=True))[0] == "lost"


@pytest.mark.parametrize("state", [states.CREATED, states.EXITED, states.CHECKPOINTED, states.LOST, states.IN_DOUBT])
def test_settled_states_stay(state):
    assert decide(state, facts()) is None


def test_lost_can_be_restored_or_removed_and_nothing_else():
    assert states.check("restore", states.LOST) == states.RESTORING
    assert states.check("remove", states.LOST) == "removed"
    for action in ("start", "stop", "checkpoint", "migrate", "exec"):
        with pytest.raises(Exception, match="it is lost"):
            states.check(action, states.LOST, "c1")


def spec(name="c1") -> ContainerSpec:
    return ContainerSpec(name=name, image="busybox:latest", image_id="sha256:" + "0" * 64, layers=(),
                         argv=("sh",), env=(), working_dir="/", volumes=())


def test_a_catalog_of_schema_0_is_migrated_in_place(tmp_path):
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.executescript("""
        CREATE TABLE containers (name TEXT PRIMARY KEY, state TEXT NOT NULL, spec TEXT NOT NULL,
            pid INTEGER, shim_pid INTEGER, cgroups TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL,
            started REAL, finished REAL, exit_code INTEGER);
    """)
    old.execute("INSERT INTO containers (name, state, spec, created) VALUES (?,?,?,?)",
                ("c1", "exited", spec().to_json(), 1.0))
    old.commit()
    old.close()
    cat = Catalog(db)
    rec = cat.container("c1")
    assert (rec.state, rec.owner) == ("exited", None)
    assert cat._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    cat.close()
    Catalog(db).close()  # a second open changes nothing


def test_a_catalog_of_a_newer_tool_is_refused(tmp_path):
    db = tmp_path / "state.db"
    c = sqlite3.connect(db)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(Exception, match="newer version"):
        Catalog(db)


def test_transient_states_name_their_owner_and_settle_is_conditional(tmp_path):
    cat = Catalog(tmp_path / "state.db")
    cat.add_container(spec(), states.RUNNING)
    rec = cat.transition("c1", "migrate")
    assert rec.owner["pid"] == os.getpid() and rec.owner["start"] > 0
    # somebody moved on meanwhile: reconcile's decision no longer applies
    cat.set_fields("c1", owner={"pid": 1, "start": 1})
    assert not cat.settle("c1", rec, "resumed")
    assert cat.container("c1").state == states.MIGRATING
    rec = cat.container("c1")
    assert cat.settle("c1", rec, "resumed")
    assert (cat.container("c1").state, cat.container("c1").owner) == (states.RUNNING, None)
    assert json.loads(cat._db.execute("SELECT owner FROM containers").fetchone()[0] or "null") is None


def test_what_a_dead_migration_left_is_swept_and_a_live_ones_is_not(tmp_path):
    from runtime.paths import StateRoot
    from runtime.reconcile import owner_file, sweep_transfers, write_transfer_owner

    root = StateRoot(tmp_path / "root")
    cat = Catalog(root.db)
    (root.layers / "tmp").mkdir(parents=True)
    live, dead = root.incoming / "aaaa", root.incoming / "bbbb"
    staging_live, staging_dead = root.layers / "tmp" / "incoming-1", root.layers / "tmp" / "incoming-2"
    for d in (live, dead, staging_live, staging_dead):
        d.mkdir(parents=True)
        (d / "pages.img").write_text("memory")
    write_transfer_owner(live, staging_live)  # this process: alive
    owner_file(dead).write_text(json.dumps({"pid": os.getpid(), "start": 1, "staging": str(staging_dead)}))
    # outgoing: one of a container a live migration holds, one nobody holds
    cat.add_container(spec("held"), states.RUNNING)
    cat.transition("held", "migrate")
    for name in ("held", "orphan"):
        (root.outgoing / name).mkdir(parents=True)
    notes = sweep_transfers(root, cat)
    assert len(notes) == 1 and "incoming/bbbb" in notes[0] and "outgoing/orphan" in notes[0]
    assert live.is_dir() and staging_live.is_dir() and owner_file(live).exists()
    assert not dead.exists() and not staging_dead.exists() and not owner_file(dead).exists()
    assert (root.outgoing / "held").is_dir() and not (root.outgoing / "orphan").exists()
    assert sweep_transfers(root, cat) == []  # nothing more to do


def test_published_snapshots_are_adopted_and_unfinished_ones_of_dead_checkpoints_removed(tmp_path):
    from runtime.paths import SNAPSHOT_META, StateRoot
    from runtime.reconcile import OWNER_FILE, sweep_snapshots, write_owner

    root = StateRoot(tmp_path / "root")
    cat = Catalog(root.db)
    published = root.snapshot_dir("aaaaaaaaaaaa")
    published.mkdir(parents=True)
    (published / SNAPSHOT_META).write_text(json.dumps({
        "id": "aaaaaaaaaaaa", "container": "c1", "tag": "nightly", "criu_version": "4.2.1", "created": 5.0,
        "size": 10, "spec": json.loads(spec().to_json())}))
    live, dead, ownerless = (root.partial_snapshot_dir(i) for i in ("b" * 12, "c" * 12, "d" * 12))
    for d in (live, dead, ownerless):
        d.mkdir(parents=True)
    write_owner(live / OWNER_FILE)  # this process: a checkpoint still writing
    (dead / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "start": 1}))
    notes = sweep_snapshots(root, cat)
    assert len(notes) == 3 and any("adopted snapshot aaaaaaaaaaaa of c1" in n for n in notes)
    snap = cat.snapshot("aaaaaaaaaaaa")
    assert (snap.container, snap.tag, snap.created, snap.size) == ("c1", "nightly", 5.0, 10)
    assert live.is_dir() and not dead.exists() and not ownerless.exists()
    assert sweep_snapshots(root, cat) == []  # nothing more to do


def test_a_checkpoint_that_died_after_publishing_leaves_it_checkpointed():
    f = Facts(owner_alive=False, shim_alive=False, tree_alive=False, traced=False, published=True)
    assert decide(states.CHECKPOINTING, f)[0] == "checkpoint-done-stopped"
    f = Facts(owner_alive=False, shim_alive=True, tree_alive=True, traced=False, published=True)
    assert decide(states.CHECKPOINTING, f)[0] == "resumed"  # CRIU let the tree go: it runs, the snapshot stays


def test_only_a_complete_in_doubt_dump_is_marked_for_keeping(tmp_path):
    """Copy mode's dump holds all of the memory: synced and marked, it can become a snapshot if
    the host restarts while in doubt. A lazy dump's images lack the memory: never marked."""
    from runtime.paths import CHECKPOINT_META, DUMP_SYNCED
    from runtime.reconcile import secure_dump

    for lazy in (False, True):
        folder = tmp_path / f"lazy-{lazy}"
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "pages-1.img").write_bytes(b"x" * 4096)
        (folder / CHECKPOINT_META).write_text(json.dumps({"pipes": {}, "memory_here": not lazy}))
        secure_dump(folder)
        assert (folder / DUMP_SYNCED).exists() is not lazy
    older = tmp_path / "no-meta"  # a dump that says nothing of how it was made is not trusted
    older.mkdir()
    secure_dump(older)
    assert not (older / DUMP_SYNCED).exists()
