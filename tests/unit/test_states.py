import pytest

from runtime import states
from runtime.errors import Conflict


def test_lifecycle_happy_path():
    s = states.check("start", states.CREATED)
    assert s == states.RUNNING
    s = states.check("checkpoint", s)
    assert s == states.CHECKPOINTING
    s = states.check("checkpoint-done-stopped", s)
    assert s == states.CHECKPOINTED
    s = states.check("restore", s)
    assert states.check("restore-done", s) == states.RUNNING


@pytest.mark.parametrize("action,state", [
    ("restore", states.RUNNING),
    ("restore", states.CHECKPOINTING),
    ("checkpoint", states.CHECKPOINTED),
    ("checkpoint", states.EXITED),
    ("remove", states.RUNNING),
    ("remove", states.CHECKPOINTING),
    ("remove", states.MIGRATING),
    ("start", states.RUNNING),
    ("exec", states.EXITED),
    ("stop", states.CHECKPOINTED),
])
def test_refused_transitions_name_the_state(action, state):
    with pytest.raises(Conflict, match=f"cannot {action.split('-')[0]} web: it is {state}"):
        states.check(action, state, "web")


def test_every_action_starts_from_known_states():
    for action in states.ACTIONS:
        assert states.allowed_from(action) <= set(states.ALL)


def test_failed_checkpoint_returns_to_running():
    assert states.check("checkpoint-failed", states.CHECKPOINTING) == states.RUNNING
