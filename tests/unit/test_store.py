"""The SQLite catalog: lookups, conditional state changes, uniqueness."""

import pytest

from runtime import states
from runtime.errors import Conflict, NotFound
from runtime.spec import ContainerSpec
from runtime.store import Catalog, ImageRecord, SnapshotRecord

IMAGE_ID = "sha256:" + "ab" * 32


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(tmp_path / "state.db")
    c.add_image(ImageRecord("busybox:latest", IMAGE_ID, ("sha256:" + "01" * 32,), {"cmd": ["sh"]}, 10, 0.0))
    yield c
    c.close()


def spec(name="c1") -> ContainerSpec:
    return ContainerSpec(name, "busybox:latest", IMAGE_ID, ("sha256:" + "01" * 32,), ("sh",))


def test_image_lookup_by_short_name_full_name_id_and_prefix(catalog):
    for ref in ("busybox", "busybox:latest", IMAGE_ID, "ab" * 6):
        assert catalog.image(ref).id == IMAGE_ID
    for ref in ("busybox:other", "nginx", "cd" * 6):
        with pytest.raises(NotFound):
            catalog.image(ref)


def test_duplicate_container_name_is_a_conflict(catalog):
    catalog.add_container(spec())
    with pytest.raises(Conflict, match="already exists"):
        catalog.add_container(spec())


def test_transition_follows_the_state_machine_and_sets_fields(catalog):
    catalog.add_container(spec())
    rec = catalog.transition("c1", "start", pid=42)
    assert (rec.state, rec.pid) == (states.RUNNING, 42)
    with pytest.raises(Conflict, match="cannot restore c1: it is running"):
        catalog.transition("c1", "restore")
    assert catalog.container("c1").state == states.RUNNING


def test_update_if_state_only_applies_in_the_expected_state(catalog):
    catalog.add_container(spec())
    catalog.transition("c1", "start", pid=1)
    catalog.transition("c1", "checkpoint")
    # the shim seeing its init die must not overwrite a checkpoint in progress
    assert not catalog.update_if_state("c1", states.RUNNING, state=states.EXITED, exit_code=137)
    assert catalog.container("c1").state == states.CHECKPOINTING


def test_unknown_columns_are_refused(catalog):
    catalog.add_container(spec())
    with pytest.raises(ValueError):
        catalog.set_fields("c1", **{"state=1; DROP TABLE containers; --": 1})


def test_snapshot_tags_unique_per_container(catalog):
    catalog.add_snapshot(SnapshotRecord("s1", "c1", "t", 1.0, spec(), "4.1.1", 5))
    catalog.add_snapshot(SnapshotRecord("s2", "c2", "t", 2.0, spec("c2"), "4.1.1", 5))
    with pytest.raises(Conflict):
        catalog.add_snapshot(SnapshotRecord("s3", "c1", "t", 3.0, spec(), "4.1.1", 5))
    assert catalog.snapshot("t", container="c1").id == "s1"
    assert [s.id for s in catalog.snapshots()] == ["s1", "s2"]
    with pytest.raises(NotFound):
        catalog.snapshot("nope")
