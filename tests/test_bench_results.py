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
    # Whole runs are kept: day0's row stays beside day1's, nothing of either is lost.
    assert sorted((r["impl"], r["measured"]) for r in previous) == [
        ("bare-compiled", "day1"), ("raytr-local", "day0"), ("raytr-local", "day1")]


def test_ratios_use_the_bare_loop_of_the_same_run_only():
    rows = [_row("5k", "fp16", "bare-compiled", 150.0, "day2"), _row("5k", "fp16", "raytr-local-compiled", 90.0, "day2"),
            _row("5k", "fp16", "raytr-ray-compiled", 60.0, "day1")]
    add_ratios(rows)
    assert rows[1]["ratio_vs_bare_compiled"] == 90.0 / 150.0
    assert "ratio_vs_bare_compiled" not in rows[2]  # its own run's bare loop is not among the rows
    undated = [{**r, "measured": None} for r in rows[:2]]  # rows that do not say which run they come from
    add_ratios(undated)
    assert not any("ratio_vs_bare_compiled" in r for r in undated)


def test_run_benchmarks_skips_what_would_start_without_enough_budget(capsys):
    from bench.common import run_benchmarks

    # 10 s of budget and 60 s needed to start: nothing runs, and that counts as a failure.
    assert run_benchmarks([("report", ["no-such-script.py"])], seconds=10, min_start_s=60) == 1
    assert "=== report: skipped" in capsys.readouterr().out


def test_run_gpu_orders_the_target_configs_first_and_merges_every_step():
    from bench.run_gpu import gpu_steps

    steps = gpu_steps(["300k", "1M", "5k", "50k"], ["fp16", "bf16"])
    labels = [label for label, _ in steps]
    assert labels[:6] == ["profile", "head-kernels", "train-50k-fp16", "train-50k-bf16", "train-5k-fp16", "train-5k-bf16"]
    assert labels[-1] == "loader"
    # the training and profile steps add to their files; the loaders and the loss alone are one run each
    assert all("--merge" in cmd for label, cmd in steps if label not in ("loader", "head-kernels"))


def test_profile_variant_suffixes_combine_and_unknown_ones_are_named():
    from bench.profile_gpu import STEP_OPTIONS, TRAINER_OPTIONS, variant_options

    assert variant_options("trainer", "trainer", TRAINER_OPTIONS) == set()
    assert variant_options("trainer-cudagraphs-smallchunk", "trainer", TRAINER_OPTIONS) == {"cudagraphs", "smallchunk"}
    assert variant_options("trainer-cudagraphs-triton", "trainer", TRAINER_OPTIONS) == {"cudagraphs", "triton"}
    assert variant_options("raytr-compiled-cudagraphs-smallchunk", "raytr-compiled", STEP_OPTIONS) == {
        "cudagraphs", "smallchunk"}
    for bad in ("trainer-fast", "trainer-", "trainers", "trainer-quiet-merlinx"):
        with pytest.raises(ValueError, match=r"trainer\[-merlin\]"):
            variant_options(bad, "trainer", TRAINER_OPTIONS)


def test_merge_names_the_gpu_of_rows_written_before_rows_named_theirs():
    old = {"machine": {"gpu": "NVIDIA H100 80GB HBM3"},
           "results": [_row("50k", "fp16", "bare-compiled", 100.0, "day1"), _row("5k", "fp16", "bare-compiled", 90.0, "day1")]}
    fresh = [{**_row("5k", "fp16", "bare-compiled", 150.0, "day2"), "gpu": "NVIDIA H200"}]
    results, previous = merge_results(old, fresh)
    assert [(r["config"], r["gpu"]) for r in results] == [("50k", "NVIDIA H100 80GB HBM3"), ("5k", "NVIDIA H200")]
    assert [r["gpu"] for r in previous] == ["NVIDIA H100 80GB HBM3"]


def test_report_names_each_gpu_target_lines_gpu():
    from bench.report import target_status

    rows = [{**_row("5k", "bf16", impl, rate, "day2"), "gpu": "NVIDIA H200", "ratio_vs_bare_compiled": rate / 100.0}
            for impl, rate in (("bare-compiled", 100.0), ("raytr-local-cudagraphs", 128.0))]
    lines = target_status(None, {"results": rows}, None, None)
    assert "- GPU 5k bf16 (H200): best Trainer run raytr-local-cudagraphs / bare compiled = 1.28 (**met**)" in lines


def test_report_lists_every_gpu_run_missing_from_run_gpus_full_set():
    from bench.head_kernels import VARIANTS
    from bench.loader import ENGINES
    from bench.report import gpu_not_measured
    from bench.run_gpu import TRAIN_IMPLS, TRAIN_ORDER

    rows = [_row(cfg, precision, impl, 1.0, "day1") for cfg in TRAIN_ORDER for precision in ("fp16", "bf16")
            for impl in TRAIN_IMPLS[cfg].split(",")]
    complete = {"results": rows}
    loaders = {"results": [{"engine": e} for e in ENGINES]}
    every_kernel = {"results": [{"variant": v} for v in VARIANTS]}
    assert gpu_not_measured(complete, loaders, every_kernel) == []
    partial = {"results": [r for r in rows if not (r["config"] == "300k" or (r["config"], r["precision"], r["impl"])
                                                   == ("5k", "bf16", "raytr-ray-cudagraphs"))]}
    loaders["results"][0]["error"] = "failed"
    assert gpu_not_measured(partial, loaders, {"results": [{"variant": "bare", "error": "failed"}]}) == [
        "training 5k bf16 raytr-ray-cudagraphs", "training 300k fp16", "training 300k bf16",
        "the loss kernels (head_kernels.py)", f"loader {ENGINES[0]}"]
    some_kernels = {"results": [{"variant": v} for v in VARIANTS if not v.endswith("-repeat-bias")]}
    assert gpu_not_measured(complete, {"results": [{"engine": e} for e in ENGINES]}, some_kernels) == [
        "the loss kernels (head_kernels.py) bare-repeat-bias/eager-repeat-bias/compiled-repeat-bias/triton-repeat-bias"]


def test_run_gpu_missing_runs_whole_gaps_first_then_regroups_partial_ones():
    from bench.loader import ENGINES
    from bench.head_kernels import VARIANTS
    from bench.run_gpu import TRAIN_IMPLS, TRAIN_ORDER, gpu_steps, missing_runs, missing_steps

    rows = [_row(cfg, precision, impl, 1.0, "day1") for cfg in TRAIN_ORDER for precision in ("fp16", "bf16")
            for impl in TRAIN_IMPLS[cfg].split(",") if (cfg, precision) not in (("1M", "bf16"), ("300k", "bf16"))
            and (cfg, precision, impl) != ("5k", "fp16", "raytr-ray-cudagraphs")]
    rows.append({**_row("300k", "bf16", "bare-compiled", 0.0, "day1"), "error": "out of memory"})  # counts as missing
    missing = missing_runs({"results": rows}, {"results": [{"engine": e} for e in ENGINES]}, None)
    assert missing == {"train-5k-fp16": ["raytr-ray-cudagraphs"], "train-1M-bf16": TRAIN_IMPLS["1M"].split(","),
                       "train-300k-bf16": TRAIN_IMPLS["300k"].split(","), "head-kernels": list(VARIANTS)}
    labels = [label for label, _ in missing_steps(gpu_steps(list(TRAIN_ORDER), ["fp16", "bf16"]), missing)]
    assert labels == ["head-kernels", "train-1M-bf16", "train-300k-bf16", "train-5k-fp16"]  # no profile

    # The loss kernels measured in part (a variant out of memory counts as measured, an error does not):
    # their step runs again whole, after the steps never measured.
    kernels = {"results": [{"variant": v} for v in VARIANTS if v not in ("compiled-tuned", "eager-repeat-bias")]}
    kernels["results"] += [{"variant": "compiled-tuned", "error": "RuntimeError()"},
                           {"variant": "bare-repeat-bias", "out_of_memory": "CUDA out of memory"}]
    missing = missing_runs({"results": rows}, {"results": [{"engine": e} for e in ENGINES]}, kernels)
    assert missing["head-kernels"] == ["compiled-tuned", "eager-repeat-bias"]
    labels = [label for label, _ in missing_steps(gpu_steps(list(TRAIN_ORDER), ["fp16", "bf16"]), missing)]
    assert labels == ["train-1M-bf16", "train-300k-bf16", "head-kernels", "train-5k-fp16"]


def test_report_quality_target_counts_the_seeds_that_beat_the_first_runs_baselines():
    from bench.common import QUALITY_METRICS
    from bench.report import quality_status

    def model(value: float, seed: int = 0) -> dict:
        return {"test": {m: value for m in QUALITY_METRICS}, "hyperparameters": {"seed": seed, "d_model": 64}}

    ds = {"dataset": "ml-100k", "stats": {"refit": True}, "models": {"item_knn": model(0.14), "xlnet-clm": model(0.15)},
          "summary": {"best_transformer": "xlnet-clm", "beats_every_baseline": True,
                      "best_baseline_test": {m: (0.14, "item_knn") for m in QUALITY_METRICS}}}
    seed1 = {"datasets": [{**ds, "models": {"xlnet-clm": model(0.16, 1)}}]}
    seed2 = {"datasets": [{**ds, "models": {"xlnet-clm": {**model(0.15, 2), "test": {
        **model(0.15)["test"], "recall@10": 0.13}}}}]}  # loses one metric
    other_split = {"datasets": [{**ds, "stats": {"refit": True, "holdout_shift": 1},
                                 "models": {"xlnet-clm": model(0.2, 3)}}]}  # not a rerun of this split
    assert quality_status({"datasets": [ds]}, [seed1, seed2, other_split]) == [
        "- Quality ml-100k: xlnet-clm beats every baseline on every test metric (**met**); so do 2 of its 3 seeds"]
    # A hyperparameter added later (repeat_bias): a run without it ran with its default (False).
    biased = {"datasets": [{**ds, "models": {"xlnet-clm": {**model(0.16, 4), "hyperparameters": {
        "seed": 4, "d_model": 64, "repeat_bias": True}}}}]}
    unbiased = {"datasets": [{**ds, "models": {"xlnet-clm": {**model(0.16, 5), "hyperparameters": {
        "seed": 5, "d_model": 64, "repeat_bias": False}}}}]}
    assert quality_status({"datasets": [ds]}, [seed1, biased, unbiased]) == [
        "- Quality ml-100k: xlnet-clm beats every baseline on every test metric (**met**); so do 3 of its 3 seeds"]
    lost = {**ds, "summary": {**ds["summary"], "beats_every_baseline": False}}
    assert quality_status({"datasets": [lost]}, []) == [
        "- Quality ml-100k: xlnet-clm does not beat every baseline on every test metric (**NOT met**)"]
    assert quality_status(None, []) == ["- Quality: not measured."]


def test_head_kernels_variants_compute_eagers_loss_and_gradients(tmp_path, monkeypatch):
    """bench/head_kernels.py on the CPU: every variant runs, in several chunks with a partial last one,
    and gives its family's eager loss and gradients (fp32: the compiled kernels to rounding; the bare
    loop's softmax also counts the three reserved ids, a 1e-4-sized difference); the -repeat-bias
    family adds the repeat bias to each kernel and to the materialised bare loss alike."""
    import json

    import bench.common
    from bench.head_kernels import REPEAT, VARIANTS, main

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    assert main(["--device", "cpu", "--items", "500", "--d-model", "16", "--targets", "200", "--chunk-size", "64",
                 "--precision", "fp32", "--warmup", "1", "--steps", "1", "--output", "head"]) == 0
    result = json.loads((tmp_path / "head.json").read_text())
    rows = {r["variant"]: r for r in result["results"]}
    plain = [v for v in VARIANTS if not v.endswith(REPEAT)]
    assert list(rows) == ["eager", "bare", *[v for v in plain if v not in ("eager", "bare")],
                          "eager-repeat-bias", "bare-repeat-bias", "compiled-repeat-bias", "triton-repeat-bias"]
    assert all(r["chunk_rows"] == 64 for v, r in rows.items() if not v.startswith("bare"))
    for reference in ("eager", "eager-repeat-bias"):  # each family's reference, and timed against its bare loop
        assert rows[reference]["speed_vs_bare"] > 0 and "loss_rel_error" not in rows[reference]
    # The biased losses are the plain ones plus the bias: compared with the plain eager they would differ.
    assert abs(rows["eager-repeat-bias"]["loss"] - rows["eager"]["loss"]) > 1e-3 * rows["eager"]["loss"]
    for variant, row in [(v, r) for v, r in rows.items() if not v.startswith("eager")]:
        bound = 1e-2 if variant.startswith("bare") else 1e-5
        assert row["loss_rel_error"] <= bound and row["grad_hidden_rel_error"] <= bound, (variant, row)
        assert row["grad_weight_rel_error"] <= bound, (variant, row)
        assert row["ms_per_step"] > 0 and row["speed_vs_bare"] > 0
    from bench.report import section_head_kernels

    lines = section_head_kernels(result)
    assert any(line.startswith("| eager |") and line.endswith("| (reference) |") for line in lines)
    for kind in ("compiled", "triton"):
        assert sum(line.startswith(f"| {kind}") for line in lines) == sum(v.startswith(kind) for v in VARIANTS) > 0


def test_report_splits_the_test_by_target_kind_with_each_kinds_best_in_bold():
    from bench.report import by_target_table

    def split(last: float, new: float) -> dict:
        return {"by_target": {"the last item again": {"ndcg@20": last, "sessions": 3},
                              "an item not in the session": {"ndcg@20": new, "sessions": 5}}}

    ds = {"models": {"item_knn": {"test": split(0.99, 0.17)}, "xlnet-clm": {"test": split(0.92, 0.19)},
                     "popularity": {"test": {}}}}  # a run before the split: left out
    lines = by_target_table(ds)
    assert "| test target | sessions | item_knn | xlnet-clm |" in lines
    assert "| the last item again | 3 | **0.9900** | 0.9200 |" in lines
    assert "| an item not in the session | 5 | 0.1700 | **0.1900** |" in lines
    assert by_target_table({"models": {"item_knn": {"test": {}}}}) == []
