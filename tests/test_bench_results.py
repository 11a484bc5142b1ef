"""bench/train.py's result bookkeeping: re-measured runs never mix with older runs in one ratio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train import add_ratios, merge_results  # noqa: E402


def _row(config: str, precision: str, impl: str, rate: float, measured: str) -> dict:
    return {"config": config, "precision": precision, "impl": impl, "sessions_per_s": rate, "measured": measured}


def test_merge_moves_a_remeasured_group_to_previous_and_keeps_the_rest():
    old = {"results": [_row("5k", "fp16", "bare-compiled", 100.0, "day1"), _row("5k", "fp16", "raytr-local", 40.0, "day1"),
                       _row("1M", "fp16", "bare-compiled", 10.0, "day1")],
           "previous_results": [_row("5k", "fp16", "raytr-local", 30.0, "day0")]}
    fresh = [_row("5k", "fp16", "bare-compiled", 150.0, "day2"), _row("5k", "fp16", "raytr-local-compiled", 90.0, "day2")]
    results, previous = merge_results(old, fresh)
    assert [(r["config"], r["impl"], r["measured"]) for r in results] == [
        ("1M", "bare-compiled", "day1"), ("5k", "bare-compiled", "day2"), ("5k", "raytr-local-compiled", "day2")]
    # day1's 5k rows replace day0's row of the same implementation; nothing of day1 is lost.
    assert sorted((r["impl"], r["measured"]) for r in previous) == [("bare-compiled", "day1"), ("raytr-local", "day1")]


def test_ratios_use_the_bare_loop_of_the_same_run_only():
    rows = [_row("5k", "fp16", "bare-compiled", 150.0, "day2"), _row("5k", "fp16", "raytr-local-compiled", 90.0, "day2"),
            _row("5k", "fp16", "raytr-ray-compiled", 60.0, "day1")]
    add_ratios(rows)
    assert rows[1]["ratio_vs_bare_compiled"] == 90.0 / 150.0
    assert "ratio_vs_bare_compiled" not in rows[2]  # its own run's bare loop is not among the rows


def test_run_benchmarks_skips_what_would_start_without_enough_budget(capsys):
    from bench.common import run_benchmarks

    # 10 s of budget and 60 s needed to start: nothing runs, and that counts as a failure.
    assert run_benchmarks([("report", ["no-such-script.py"])], seconds=10, min_start_s=60) == 1
    assert "=== report: skipped" in capsys.readouterr().out


def test_run_gpu_orders_the_target_configs_first_and_merges_every_step():
    from bench.run_gpu import gpu_steps

    steps = gpu_steps(["300k", "1M", "5k", "50k"], ["fp16", "bf16"])
    labels = [label for label, _ in steps]
    assert labels[:5] == ["profile", "train-50k-fp16", "train-50k-bf16", "train-5k-fp16", "train-5k-bf16"]
    assert labels[-1] == "loader"
    assert all("--merge" in cmd for label, cmd in steps if label != "loader")


def test_profile_variant_suffixes_combine_and_unknown_ones_are_named():
    from bench.profile_gpu import STEP_OPTIONS, TRAINER_OPTIONS, variant_options

    assert variant_options("trainer", "trainer", TRAINER_OPTIONS) == set()
    assert variant_options("trainer-cudagraphs-smallchunk", "trainer", TRAINER_OPTIONS) == {"cudagraphs", "smallchunk"}
    assert variant_options("raytr-compiled-cudagraphs-smallchunk", "raytr-compiled", STEP_OPTIONS) == {
        "cudagraphs", "smallchunk"}
    for bad in ("trainer-fast", "trainer-", "trainers", "trainer-quiet-merlinx"):
        with pytest.raises(ValueError, match=r"trainer\[-merlin\]"):
            variant_options(bad, "trainer", TRAINER_OPTIONS)
