"""An operation takes a container the moment a snapshot under way lets it go: the wait and the
transition are one loop, so the next scheduled snapshot cannot begin in between (a drain under
scheduled snapshots was refused "it is checkpointing" when it did). Real SQLite, a real owner."""

import subprocess
import threading
import time

import pytest

from runtime import states
from runtime.container import Runtime
from runtime.errors import Conflict
from runtime.linux import proc_identity
from runtime.paths import StateRoot
from runtime.spec import ContainerSpec
from runtime.store import Catalog, ImageRecord

IMAGE_ID = "sha256:" + "ab" * 32


@pytest.fixture
def rt(tmp_path):
    r = Runtime(StateRoot(tmp_path / "root"))
    r.catalog.add_image(ImageRecord("busybox:latest", IMAGE_ID, ("sha256:" + "01" * 32,), {"cmd": ["sh"]}, 10, 0.0))
    r.catalog.add_container(ContainerSpec("c1", "busybox:latest", IMAGE_ID, ("sha256:" + "01" * 32,), ("sh",)),
                            states.RUNNING)
    yield r
    r.close()


@pytest.fixture
def snapshotter():
    """A live process standing for the one writing a snapshot."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def checkpointing_by(rt: Runtime, proc) -> None:
    pid, start = proc_identity(proc.pid)
    rt.catalog.transition("c1", "checkpoint", owner={"pid": pid, "start": start})


def finish_later(rt: Runtime, delay: float) -> threading.Thread:
    def finish():
        time.sleep(delay)
        catalog = Catalog(rt.root.db)  # a connection of its own, as the snapshot's process has
        try:
            catalog.transition("c1", "checkpoint-done-running")
        finally:
            catalog.close()

    t = threading.Thread(target=finish)
    t.start()
    return t


def test_an_operation_waits_for_the_snapshot_under_way_and_takes_the_container(rt, snapshotter):
    checkpointing_by(rt, snapshotter)
    finisher = finish_later(rt, 0.4)
    t0 = time.monotonic()
    rec = rt.take("c1", "migrate", timeout=10)
    finisher.join()
    assert rec.state == states.MIGRATING and time.monotonic() - t0 >= 0.4


def test_a_snapshot_whose_writer_is_dead_is_not_waited_for(rt, snapshotter):
    checkpointing_by(rt, snapshotter)
    snapshotter.kill()
    snapshotter.wait()
    t0 = time.monotonic()
    with pytest.raises(Conflict, match="cannot migrate c1: it is checkpointing"):
        rt.take("c1", "migrate", timeout=10)
    assert time.monotonic() - t0 < 1


def test_a_snapshot_that_does_not_end_is_waited_for_until_the_timeout(rt, snapshotter):
    checkpointing_by(rt, snapshotter)
    t0 = time.monotonic()
    with pytest.raises(Conflict, match="it is checkpointing"):
        rt.take("c1", "checkpoint", timeout=0.5)
    assert 0.5 <= time.monotonic() - t0 < 3


@pytest.mark.parametrize("state_action", ["migrate", "exit"])
def test_other_states_are_refused_at_once(rt, state_action):
    rt.catalog.transition("c1", state_action)
    t0 = time.monotonic()
    with pytest.raises(Conflict):
        rt.take("c1", "checkpoint", timeout=10)
    assert time.monotonic() - t0 < 1
