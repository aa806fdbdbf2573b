"""The pure parts of scripts/bench: the pause from the workload's timestamps, the medians and
ratios, the table and the JSON document."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchkit.results import (  # noqa: E402
    Trial,
    document,
    format_pages_table,
    format_table,
    largest_gap,
    parse_ticks,
    parse_sizes,
    summarize,
    summarize_pages,
    ticked_after,
)


def test_parse_ticks_takes_realtime_and_drops_a_torn_line():
    text = "5.000000000 100.000000000\n5.005000000 100.005000000\nbad line here\n5.01 100.0"
    assert parse_ticks(text) == [100.0, 100.005, 100.0]
    assert parse_ticks("5.0 100.0\n5.005 100.0") == [100.0, 100.0]
    assert parse_ticks("") == []


def test_largest_gap_is_the_longest_interval_touching_the_window():
    stamps = [0.0, 0.005, 0.010, 0.8, 0.805, 3.0, 3.005]  # 0.79 s inside the move, 2.2 s after it
    assert largest_gap(stamps, 0.007, 0.7) == pytest.approx((0.79, 0.010))
    # a gap that begins in the window counts however long it lasts (a stall right after the move)
    assert largest_gap(stamps, 0.007, 1.0) == pytest.approx((2.195, 0.805))
    # an interval that begins before the window and ends in it counts (the freeze began earlier)
    assert largest_gap(stamps, 0.5, 0.6) == pytest.approx((0.79, 0.010))
    assert largest_gap(stamps, 0.0, 10.0)[0] == pytest.approx(2.195)
    assert largest_gap(stamps, 5.0, 6.0) is None
    assert largest_gap([1.0], 0.0, 2.0) is None


def test_a_clock_step_back_is_no_gap():
    assert largest_gap([1.0, 1.005, 0.5, 0.505], 0.0, 2.0) == pytest.approx((0.005, 0.5))


def test_ticked_after_counts_what_came_after_the_move():
    assert ticked_after([1.0, 2.0, 3.0, 4.0], 2.0) == 2


def test_parse_sizes():
    assert parse_sizes("64M,256M,512m,1G") == [64, 256, 512, 1024]
    assert parse_sizes("128, 2GiB") == [128, 2048]
    for bad in ("", "0M", "abc", "1T"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def _trials():
    out = []
    for rep, (copy, lazy, hand) in enumerate([(1.0, 0.2, 2.0), (3.0, 0.4, 4.0), (2.0, 0.3, 3.0)], 1):
        out += [Trial(64, "copy", rep, "idle", pause_s=copy, downtime_s=copy / 2, total_s=copy * 3),
                Trial(64, "lazy", rep, "idle", pause_s=lazy, downtime_s=0.1, total_s=2.0,
                      detail={"phases_s": {"restore": 0.05, "pages (running)": lazy * 4}}),
                Trial(64, "by-hand", rep, "idle", pause_s=hand, downtime_s=hand, total_s=hand + 1),
                Trial(64, "ssh", rep, total_s=0.5 * rep),
                Trial(64, "tcp", rep, total_s=0.1)]
    out.append(Trial(64, "copy", 4, "idle", error="CRIU dump failed"))  # a failure counts as failed, not as 0
    out.append(Trial(64, "copy", 1, "touch", pause_s=5.0, downtime_s=4.0, total_s=9.0))
    return out


def test_summarize_medians_and_ratios_to_the_by_hand_pause():
    rows = {(r.workload, r.mode): r for r in summarize(_trials())}
    copy = rows[("idle", "copy")]
    assert (copy.n, copy.failed, copy.pause_s, copy.downtime_s, copy.total_s) == (3, 1, 2.0, 1.0, 6.0)
    assert copy.ratio == pytest.approx(2.0 / 3.0)
    assert rows[("idle", "lazy")].ratio == pytest.approx(0.1)
    assert rows[("idle", "by-hand")].ratio == pytest.approx(1.0)
    ssh = rows[("-", "ssh")]  # a wire: its time against the idle by-hand pause
    assert (ssh.pause_s, ssh.total_s, ssh.ratio) == (None, 1.0, pytest.approx(1.0 / 3.0))
    assert rows[("touch", "copy")].ratio is None  # no by-hand trial of that workload
    order = [(r.workload, r.mode) for r in summarize(_trials())]
    assert order == [("idle", "copy"), ("idle", "lazy"), ("idle", "by-hand"), ("touch", "copy"),
                     ("-", "ssh"), ("-", "tcp")]


def test_table_names_the_machine_and_shows_each_row():
    machine = {"date": "2026-12-06T02:00:00+00:00", "hostname": "box", "nproc": 2, "mem_gib": 23.5,
               "kernel": "6.18.44", "criu": "4.2.1", "load_start": "1.00 1.00 1.00", "load_end": "2.00 2.00 2.00"}
    table = format_table(summarize(_trials()), machine)
    assert "2 CPUs, 23.5 GiB, kernel 6.18.44, CRIU 4.2.1" in table and "2026-12-06" in table
    assert "| 64 | idle | copy | 3 | 1 | 2.000 | 1.000 | 6.000 | 0.67x |" in table
    assert "| 64 | - | tcp | 3 | 0 | - | - | 0.100 | 0.03x |" in table
    assert "| 64 | touch | copy | 1 | 0 | 5.000 | 4.000 | 9.000 | - |" in table


def test_json_document_shape():
    doc = json.loads(json.dumps(document(_trials(), {"nproc": 2}, {"reps": 3})))
    assert set(doc) == {"schema", "machine", "settings", "trials", "medians", "pages"}
    assert doc["schema"] == 3 and doc["machine"] == {"nproc": 2} and doc["settings"] == {"reps": 3}
    assert len(doc["trials"]) == 17
    assert set(doc["trials"][0]) == {"size_mib", "mode", "rep", "workload", "pause_s", "downtime_s", "total_s",
                                     "bytes", "detail", "error"}
    assert set(doc["medians"][0]) == {"size_mib", "workload", "mode", "n", "failed", "pause_s", "downtime_s",
                                      "total_s", "ratio"}


def test_lazy_pages_against_the_ssh_wire_of_the_same_size():
    trials = [*_trials(), Trial(64, "lazy", 4, "idle", error="lazy pages failed"),  # a failure does not count
              Trial(64, "lazy", 1, "touch", pause_s=0.3, detail={"phases_s": {"restore": 0.05}}),  # no pages phase
              Trial(256, "lazy", 1, "idle", pause_s=0.3, detail={"phases_s": {"pages (running)": 2.0}}),
              Trial(64, "lazy-direct", 1, "idle", pause_s=0.2, detail={"phases_s": {"pages (running)": 0.5}})]
    rows = {(r.size_mib, r.workload, r.mode): r for r in summarize_pages(trials)}
    idle = rows[(64, "idle", "lazy")]  # pages 0.8, 1.6, 1.2 s against ssh 0.5, 1.0, 1.5 s
    assert (idle.n, idle.pages_s, idle.wire_s) == (3, pytest.approx(1.2), 1.0)
    assert idle.ratio == pytest.approx(1.2)
    assert rows[(64, "idle", "lazy-direct")].ratio == pytest.approx(0.5)  # against the same ssh wire
    touch = rows[(64, "touch", "lazy")]
    assert (touch.n, touch.pages_s, touch.ratio) == (0, None, None)
    assert (rows[(256, "idle", "lazy")].wire_s, rows[(256, "idle", "lazy")].ratio) == (None, None)  # no wire there
    assert list(rows) == [(64, "idle", "lazy"), (64, "idle", "lazy-direct"), (64, "touch", "lazy"),
                          (256, "idle", "lazy")]
    table = format_pages_table(summarize_pages(trials))
    assert "| 64 | idle | lazy | 3 | 1.200 | 1.000 | 1.20x |" in table
    assert "| 64 | idle | lazy-direct | 1 | 0.500 | 1.000 | 0.50x |" in table
    assert "| 256 | idle | lazy | 1 | 2.000 | - | - |" in table
