"""Pre-copy's stop rules, on made-up rounds: no CRIU needed."""

import pytest

from migrate.precopy import Round, StopRules, estimated_pause, stop_reason


def test_the_first_round_always_goes_on_unless_almost_nothing_is_there():
    assert stop_reason([]) is None
    assert stop_reason([Round(100_000, 2.0)]) is None  # all memory sent; the dirtying rate is unknown yet
    assert "only 10 pages" in stop_reason([Round(10, 0.1)])


def test_few_dirtied_pages_stop():
    assert "only 64 pages" in stop_reason([Round(100_000, 2.0), Round(64, 0.05)])


def test_an_estimated_pause_within_the_budget_stops():
    # 100k pages in 2 s, then 5000 dirtied in those 2 s, sent in 0.1 s: the next round holds
    # about 5000/2 * 0.1 = 250 pages, 0.005 s to send
    rounds = [Round(100_000, 2.0), Round(5_000, 0.1)]
    assert estimated_pause(rounds) == pytest.approx(0.005)
    assert "within 0.3 s" in stop_reason(rounds)


def test_dirtying_that_does_not_shrink_stops():
    rules = StopRules(pause_budget=0.0)  # the estimate alone would never stop it
    assert stop_reason([Round(100_000, 2.0), Round(60_000, 1.5)], rules) is None
    assert "does not shrink (60000 then 58000" in stop_reason(
        [Round(100_000, 2.0), Round(60_000, 1.5), Round(58_000, 1.5)], rules)


def test_the_round_limit_stops():
    rules = StopRules(pause_budget=0.0, shrink=1.0, max_rounds=3)
    rounds = [Round(100_000, 2.0), Round(80_000, 2.0)]
    assert stop_reason(rounds, rules) is None
    assert stop_reason([*rounds, Round(70_000, 2.0)], rules) == "3 rounds done"
