"""When iterative pre-copy stops pre-dumping and freezes for the final dump.

Each pre-dump sends the pages dirtied since the one before (soft-dirty tracking), while the
container runs; the final dump, frozen, sends only what was dirtied during the last one. So
iterating pays while each round leaves fewer pages, and stops when (first rule that holds):

- few pages were dirtied (the final dump would be about that small),
- the estimated final transfer fits in the pause budget (at the rate the last round reached),
- dirtying does not shrink (the workload dirties as fast as pages move: more rounds only cost),
- the iteration limit is reached.

Pure functions of the rounds' statistics (CRIU's stats-dump), so they are tested without CRIU.
"""

from dataclasses import dataclass

PAGE_SIZE = 4096


@dataclass(frozen=True)
class Round:
    pages_written: int  # pages this pre-dump sent (dirtied since the previous one)
    seconds: float  # how long it took, pages streamed included


@dataclass(frozen=True)
class StopRules:
    min_pages: int = 64  # as P.Haul's
    pause_budget: float = 0.3  # seconds the final transfer may take by estimate
    shrink: float = 0.9  # a round must leave at most this share of the previous round's pages
    max_rounds: int = 8


def estimated_pause(rounds: list[Round]) -> float | None:
    """Seconds the final dump's pages would take to send, by the last two rounds: the pages of a
    round are those dirtied during the one before, which gives the dirtying rate; the last
    round's own pages and time give the transfer rate. None before the second round."""
    if len(rounds) < 2 or rounds[-2].seconds <= 0 or rounds[-1].seconds <= 0 or rounds[-1].pages_written <= 0:
        return None
    dirtied_per_second = rounds[-1].pages_written / rounds[-2].seconds
    expected_pages = dirtied_per_second * rounds[-1].seconds
    sent_per_second = rounds[-1].pages_written / rounds[-1].seconds
    return expected_pages / sent_per_second


def stop_reason(rounds: list[Round], rules: StopRules = StopRules()) -> str | None:
    """Why to freeze for the final dump now; None: pre-dump once more."""
    if not rounds:
        return None
    last = rounds[-1]
    if last.pages_written <= rules.min_pages:
        return f"only {last.pages_written} pages dirtied in the last round"
    pause = estimated_pause(rounds)
    if pause is not None and pause <= rules.pause_budget:
        return f"the final dump's pages would take about {pause:.2f} s to send, within {rules.pause_budget} s"
    if len(rounds) > 1 and last.pages_written > rules.shrink * rounds[-2].pages_written:
        return (f"dirtying does not shrink ({rounds[-2].pages_written} then {last.pages_written} pages): "
                "more rounds would not shorten the pause")
    if len(rounds) >= rules.max_rounds:
        return f"{rules.max_rounds} rounds done"
    return None
