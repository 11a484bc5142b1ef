"""bench/train.py's result bookkeeping: re-measured runs never mix with older runs in one ratio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train import add_ratios, merge_results  # noqa: E402


def _row(config: str, precision: str, impl: str, rate: float, measured: str, optimizer: str | None = "trainer") -> dict:
    """A train row; `optimizer` None: one measured before the bare loops stepped with the Trainer's optimizer."""
    row = {"config": config, "precision": precision, "impl": impl, "sessions_per_s": rate, "measured": measured}
    return row | ({"optimizer": optimizer} if optimizer else {})


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


H100 = "NVIDIA H100 80GB HBM3"


def _gpu_rows(config: str, precision: str, gpu: str, measured: str, **rates: float) -> list[dict]:
    """Train rows of one run on `gpu` with their ratios to its bare-compiled row (rates by impl)."""
    return [{**_row(config, precision, impl.replace("_", "-"), rate, measured), "gpu": gpu,
             "ratio_vs_bare_compiled": rate / rates["bare_compiled"]} for impl, rate in rates.items()]


def test_report_gpu_targets_are_met_only_on_an_h100():
    from bench.report import target_status

    h200 = _gpu_rows("5k", "bf16", "NVIDIA H200", "day2", bare_compiled=100.0, raytr_local_cudagraphs=128.0)
    lines = target_status(None, {"results": h200}, None, None)
    assert ("- GPU 5k bf16 (H200): best Trainer run raytr-local-cudagraphs / bare compiled = 1.28 "
            "(**met on an H200 only**; not measured on an H100)") in lines
    assert not any("(**met**)" in line for line in lines)
    # An earlier H100 run on file: the latest one's best ratio is named.
    earlier = (_gpu_rows("5k", "bf16", H100, "day0", bare_compiled=100.0, raytr_local_cudagraphs=90.0)
               + _gpu_rows("5k", "bf16", H100, "day1", bare_compiled=100.0, raytr_local_compiled=46.0,
                           raytr_local_cudagraphs=76.0))
    lines = target_status(None, {"results": h200, "previous_results": earlier}, None, None)
    assert ("- GPU 5k bf16 (H200): best Trainer run raytr-local-cudagraphs / bare compiled = 1.28 (**met on an H200 "
            "only**; not measured on an H100 since day1, when its best was raytr-local-cudagraphs 0.76)") in lines
    slow = _gpu_rows("5k", "bf16", "NVIDIA H200", "day2", bare_compiled=100.0, raytr_local_cudagraphs=70.0)
    assert "(**NOT met** on an H200; not measured on an H100)" in target_status(None, {"results": slow}, None, None)[1]
    # The H100's rows decide, however fast another GPU's are; the 1M targets likewise.
    h100 = _gpu_rows("5k", "bf16", H100, "day3", bare_compiled=100.0, raytr_local_cudagraphs=85.0)
    one_m = [{**r, "peak_mem_gb": 12.0} for r in _gpu_rows("1M", "fp16", "NVIDIA H200", "day2", bare_compiled=10.0,
                                                           raytr_local_cudagraphs_triton=12.0)]
    lines = target_status(None, {"results": h100 + one_m}, None, None)
    assert "- GPU 5k bf16 (H100): best Trainer run raytr-local-cudagraphs / bare compiled = 0.85 (**met**)" in lines
    assert ("- GPU 1M fp16 raytr-local-cudagraphs-triton (H200): peak 12.0 GB (**met on an H200 only**), speed / bare "
            "compiled = 1.20 (**met on an H200 only**)") in lines


def test_report_lists_every_gpu_run_missing_from_run_gpus_full_set():
    from bench.head_kernels import VARIANTS
    from bench.loader import ENGINES
    from bench.report import gpu_not_measured
    from bench.run_gpu import TRAIN_IMPLS, TRAIN_ORDER

    rows = [{**_row(cfg, precision, impl, 1.0, "day1"), "gpu": H100} for cfg in TRAIN_ORDER
            for precision in ("fp16", "bf16") for impl in TRAIN_IMPLS[cfg].split(",")]
    on_h100 = {"machine": {"gpu": H100}}  # loader and loss-kernel rows name no GPU: their file's machine does
    complete = {"results": rows}
    loaders = {**on_h100, "results": [{"engine": e} for e in ENGINES]}
    every_kernel = {**on_h100, "results": [{"variant": v} for v in VARIANTS]}
    assert gpu_not_measured(complete, loaders, every_kernel) == []
    partial = {"results": [r for r in rows if not (r["config"] == "300k" or (r["config"], r["precision"], r["impl"])
                                                   == ("5k", "bf16", "raytr-ray-cudagraphs"))]}
    loaders["results"][0]["error"] = "failed"
    assert gpu_not_measured(partial, loaders, {**on_h100, "results": [{"variant": "bare", "error": "failed"}]}) == [
        "training 5k bf16 raytr-ray-cudagraphs", "training 300k fp16", "training 300k bf16",
        "the loss kernels (head_kernels.py)", f"loader {ENGINES[0]}"]
    some_kernels = {**on_h100, "results": [{"variant": v} for v in VARIANTS if not v.endswith("-repeat-bias")]}
    every_loader = {**on_h100, "results": [{"engine": e} for e in ENGINES]}
    assert gpu_not_measured(complete, every_loader, some_kernels) == [
        "the loss kernels (head_kernels.py) bare-repeat-bias/eager-repeat-bias/compiled-repeat-bias/triton-repeat-bias"]
    # What only an H200 measured is not measured for the targets, and says so; likewise a loader file of an H200.
    on_h200 = {"results": [{**r, "gpu": "NVIDIA H200"} if r["config"] == "5k" else r for r in rows]}
    h200_loaders = {"machine": {"gpu": "NVIDIA H200"}, "results": every_loader["results"]}
    assert gpu_not_measured(on_h200, h200_loaders, every_kernel) == [
        "training 5k fp16 (measured on an H200 only)", "training 5k bf16 (measured on an H200 only)",
        *[f"loader {e} (measured on an H200 only)" for e in ENGINES]]


def test_run_gpu_missing_runs_whole_gaps_first_then_regroups_partial_ones():
    from bench.loader import ENGINES
    from bench.head_kernels import VARIANTS
    from bench.run_gpu import TRAIN_IMPLS, TRAIN_ORDER, gpu_steps, missing_runs, missing_steps

    rows = [_row(cfg, precision, impl, 1.0, "day1") for cfg in TRAIN_ORDER for precision in ("fp16", "bf16")
            for impl in TRAIN_IMPLS[cfg].split(",") if (cfg, precision) not in (("1M", "bf16"), ("300k", "bf16"))
            and (cfg, precision, impl) != ("5k", "fp16", "raytr-ray-cudagraphs")]
    rows.append({**_row("300k", "bf16", "bare-compiled", 0.0, "day1"), "error": "out of memory"})  # counts as missing
    rows = [{**r, "gpu": H100} for r in rows]
    loaders = {"machine": {"gpu": H100}, "results": [{"engine": e} for e in ENGINES]}
    missing = missing_runs({"results": rows}, loaders, None)
    assert missing == {"train-5k-fp16": ["raytr-ray-cudagraphs"], "train-1M-bf16": TRAIN_IMPLS["1M"].split(","),
                       "train-300k-bf16": TRAIN_IMPLS["300k"].split(","), "head-kernels": list(VARIANTS)}
    labels = [label for label, _ in missing_steps(gpu_steps(list(TRAIN_ORDER), ["fp16", "bf16"]), missing)]
    assert labels == ["head-kernels", "train-1M-bf16", "train-300k-bf16", "train-5k-fp16"]  # no profile

    # The loss kernels measured in part (a variant out of memory counts as measured, an error does not):
    # their step runs again whole, after the steps never measured.
    kernels = {"machine": {"gpu": H100},
               "results": [{"variant": v} for v in VARIANTS if v not in ("compiled-tuned", "eager-repeat-bias")]}
    kernels["results"] += [{"variant": "compiled-tuned", "error": "RuntimeError()"},
                           {"variant": "bare-repeat-bias", "out_of_memory": "CUDA out of memory"}]
    missing = missing_runs({"results": rows}, loaders, kernels)
    assert missing["head-kernels"] == ["compiled-tuned", "eager-repeat-bias"]
    labels = [label for label, _ in missing_steps(gpu_steps(list(TRAIN_ORDER), ["fp16", "bf16"]), missing)]
    assert labels == ["train-1M-bf16", "train-300k-bf16", "head-kernels", "train-5k-fp16"]

    # Rows of another GPU count as missing: the 50k fp16 group measured on an H200 runs again whole, and so do
    # the loaders and loss kernels of a file from an H200 (rows without a GPU take their file's).
    on_h200 = [{**r, "gpu": "NVIDIA H200"} if (r["config"], r["precision"]) == ("50k", "fp16") else r for r in rows]
    h200 = {"gpu": "NVIDIA H200"}
    missing = missing_runs({"results": on_h200}, {**loaders, "machine": h200}, {**kernels, "machine": h200})
    assert missing["train-50k-fp16"] == TRAIN_IMPLS["50k"].split(",")
    assert missing["loader"] == list(ENGINES) and missing["head-kernels"] == list(VARIANTS)
    labels = [label for label, _ in missing_steps(gpu_steps(list(TRAIN_ORDER), ["fp16", "bf16"]), missing)]
    assert labels == ["head-kernels", "train-50k-fp16", "train-1M-bf16", "train-300k-bf16", "loader", "train-5k-fp16"]


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
    # A seed that loses a metric: met by the run reported, not over seeds (the mean still wins everywhere).
    assert quality_status({"datasets": [ds]}, [seed1, seed2, other_split]) == [
        "- Quality ml-100k: xlnet-clm beats every baseline on every test metric (**met by the run reported; not over "
        "seeds**: so do 2 of its 3 seeds, the seed mean on 5 of 5 metrics)"]
    # Every seed but one loses MRR@20 by enough that the mean trails too (YOOCHOOSE's case).
    def mrr_loss(seed: int) -> dict:
        return {"datasets": [{**ds, "models": {"xlnet-clm": {**model(0.15, seed), "test": {
            **model(0.15)["test"], "mrr@20": 0.12}}}}]}
    assert quality_status({"datasets": [ds]}, [mrr_loss(1), mrr_loss(2)]) == [
        "- Quality ml-100k: xlnet-clm beats every baseline on every test metric (**met by the run reported; not over "
        "seeds**: so do 1 of its 3 seeds, the seed mean on 4 of 5 metrics)"]
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


def _loader_result(gpu: str, engines: dict[str, float], **row: object) -> dict:
    return {"machine": {"gpu": gpu}, "sessions": 1000, "batch_size": 1024, "max_sequence_length": 20,
            "columns": ["item_id-list"], "results": [{"engine": e, "sessions_per_s": rate, **row}
                                                     for e, rate in engines.items()]}


def _figure_texts(monkeypatch) -> dict[str, list[str]]:
    """report.save replaced by one that keeps each figure's legend and x tick texts instead of writing it."""
    import bench.report

    texts: dict[str, list[str]] = {}

    def keep(fig, name: str) -> str:
        ax = fig.axes[0]
        legend = ax.get_legend()
        texts[name] = [t.get_text() for t in ax.get_xticklabels()] + (
            [t.get_text() for t in legend.get_texts()] if legend else [])
        bench.report._plt().close(fig)
        return f"figures/{name}"

    monkeypatch.setattr(bench.report, "save", keep)
    return texts


def test_report_loader_target_divides_by_the_training_step_of_the_loaders_gpu(monkeypatch):
    from bench.report import section_loader, target_status, with_current_consumption

    def trainer(config: str, gpu: str, rate: float) -> dict:
        return {**_row(config, "bf16", "raytr-local-cudagraphs", rate, "day1"), "gpu": gpu, "seq_len": 20,
                "batch": 1024}

    train = {"results": [trainer("5k", "NVIDIA H200", 185_000.0), trainer("50k", H100, 133_000.0)]}
    loader = _loader_result(H100, {"raytr-merlin": 600_000.0, "raytr-pyarrow": 1_100_000.0})
    got = with_current_consumption(loader, train, "cuda")
    cons = got["training_consumption"]
    assert (cons["config"], cons["sessions_per_s"]) == ("50k", 133_000.0) and "loader_gpu" not in cons
    assert got["results"][0]["ratio_vs_training"] == 600_000.0 / 133_000.0
    # raytr-ray not measured: the target is partly measured, not met.
    assert ("- GPU raytr loader engines >= 2x training consumption (50k bf16 raytr-local-cudagraphs, H100): 2/2 "
            "measured at >= 2x (**partly measured**; slowest raytr-merlin at 5x); not measured: raytr-ray"
            ) in target_status(None, None, None, got)
    figures = _figure_texts(monkeypatch)
    lines = section_loader(got, "cuda")
    assert any(line.startswith("| engine |") and "| ÷ training step (50k bf16 raytr-local-cudagraphs, H100) |" in line
               for line in lines)
    assert "2 x training consumption (50k bf16 raytr-local-cudagraphs, H100)" in figures["loader_cuda.png"]

    every = _loader_result(H100, {"raytr-merlin": 600_000.0, "raytr-pyarrow": 1_100_000.0, "raytr-ray": 400_000.0})
    assert ("- GPU raytr loader engines >= 2x training consumption (50k bf16 raytr-local-cudagraphs, H100): 3/3 "
            "measured at >= 2x (**met**; slowest raytr-ray at 3x)"
            ) in target_status(None, None, None, with_current_consumption(every, train, "cuda"))
    # No Trainer row of the loaders' GPU: another GPU's consumption, named with both GPUs, never plainly met.
    other = with_current_consumption(every, {"results": train["results"][:1]}, "cuda")
    assert other["training_consumption"]["loader_gpu"] == "H100"
    assert ("- GPU raytr loader engines >= 2x training consumption (5k bf16 raytr-local-cudagraphs, H200; loaders on "
            "an H100): 3/3 measured at >= 2x (**not comparable**: the training step ran on another GPU; slowest "
            "raytr-ray at 2x)") in target_status(None, None, None, other)


def test_report_train_figure_names_each_groups_gpu(monkeypatch):
    from bench.report import section_train

    rows = [{**r, "step_ms": 1.0} for r in
            _gpu_rows("5k", "fp16", "NVIDIA H200", "day2", bare_compiled=100.0, raytr_local_cudagraphs=105.0)
            + _gpu_rows("50k", "fp16", H100, "day1", bare_compiled=100.0, raytr_local_cudagraphs=100.0)]
    figures = _figure_texts(monkeypatch)
    section_train({"machine": {"gpu": H100}, "configs": {}, "repeats": 1, "results": rows}, "cuda")
    assert figures["train_cuda.png"][:2] == ["5k\nfp16\nH200", "50k\nfp16\nH100"]


def test_report_marks_disturbed_and_starved_runs_apart_in_train_and_loader_tables(monkeypatch):
    from bench.report import section_loader, train_table

    def cpu_row(impl: str, rate: float, per_cpu_s: float, disturbed: bool) -> dict:
        return {**_row("cpu-5k", "fp32", impl, rate, "day1"), "step_ms": 1.0, "threads": 1,
                "sessions_per_cpu_s": per_cpu_s, "load_before": [4.0 if disturbed else 1.0], "disturbed": disturbed}

    lines = train_table([cpu_row("bare", 80.0, 100.0, False), cpu_row("raytr-local", 100.0, 100.0, True)], "cpu")
    assert "| cpu-5k | fp32 | bare | 80 | 1.0 | 100 | 0.80 ▼ | – | – | – | 1.0 |" in lines
    assert "| cpu-5k | fp32 | raytr-local | 100 | 1.0 | 100 | 1.00 | – | – | – | 4.0 ⚠ |" in lines
    assert lines[-1].startswith("▼: CPU share below 0.85") and "⚠: 1-minute load above 1.5 x cores" in lines[-1]

    _figure_texts(monkeypatch)
    loader = _loader_result("no GPU", {"raytr-merlin": 1000.0}, sessions_per_cpu_s=1000.0, load_before=[4.0],
                            disturbed=True)
    lines = section_loader(loader, "cpu")
    assert "| raytr-merlin | 1,000 | 1,000 | 1.00 | – | – | – | 4.0 ⚠ |" in lines
    assert any(line.startswith("▼: CPU share below 0.85") and "⚠: 1-minute load" in line for line in lines)


def _quality_ds(dataset: str, xlnet: float, seed: int = 0, shift: int = 0) -> dict:
    from bench.common import QUALITY_METRICS

    def model(value: float, seed: int = 0) -> dict:
        return {"test": {m: value for m in QUALITY_METRICS}, "valid": {"ndcg@20": value}, "choice": {"epochs": 3},
                "hyperparameters": {"seed": seed, "d_model": 64}}

    return {"dataset": dataset, "protocol": "leave-one-out", "stats": {"refit": True, "holdout_shift": shift},
            "seconds": 10.0, "budget_s": 60.0, "epochs_max": 5,
            "models": {"item_knn": model(0.14), "xlnet-clm": model(xlnet, seed)},
            "summary": {"best_transformer": "xlnet-clm", "beats_every_baseline": xlnet > 0.14,
                        "best_test": model(xlnet)["test"],
                        "best_baseline_test": {m: (0.14, "item_knn") for m in QUALITY_METRICS}}}


def test_report_quality_tables_name_the_machine_of_runs_measured_elsewhere(monkeypatch, tmp_path):
    import json

    import bench.report
    from bench.report import machine_rows, section_quality

    intel = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "gpu": "no GPU"}
    epyc = {"cpu": "AMD EPYC", "cores": 2, "gpu": "no GPU"}
    quality = {"machine": intel, "datasets": [_quality_ds("ml-100k", 0.15)]}
    seeds = [{"machine": intel, "datasets": [_quality_ds("ml-100k", 0.16, seed=1)]},  # same machine: not named
             {"machine": epyc, "datasets": [_quality_ds("ml-100k", 0.16, seed=1, shift=1)]}]
    variant = {"machine": epyc, "datasets": [_quality_ds("ml-100k", 0.15, shift=1)]}
    search = {"machine": epyc, "datasets": [{
        "dataset": "ml-100k", "grid": {"dropout": [0.1, 0.2]}, "base": {"d_model": 64}, "seconds": 60.0, "jobs": 2,
        "measured": "day0", "chosen": {"xlnet-clm": {"dropout": 0.2}},
        "trials": [{"model": "xlnet-clm", "hyperparameters": {"dropout": d}, "valid": {"ndcg@20": 0.1},
                    "choice": {"epochs": 3}, "train_seconds": 5.0} for d in (0.1, 0.2)]}]}
    _figure_texts(monkeypatch)
    lines = section_quality(quality, seeds, search, [variant])
    text = "\n".join(lines)
    assert text.count("not the section's machine") == 1  # the variant only
    assert "`--ml-holdout-shift 1`" in text and "Measured on AMD EPYC, 2 cores, not the section's machine." in text
    spreads = [line for line in lines if line.startswith("Seed spread")]
    assert len(spreads) == 2 and "measured on" not in spreads[0]
    assert spreads[1].endswith("Seeds 0, 1 measured on AMD EPYC, 2 cores.")
    assert "measured day0 on AMD EPYC, 2 cores (quality-search.json's machine)" in text

    # The Machines table lists the quality runs of other machines, grouped by machine.
    monkeypatch.setattr(bench.report, "RESULTS", tmp_path)
    for name, res in (("quality", quality), ("quality-seed1", seeds[0]), ("quality-ml-shift1", variant),
                      ("quality-ml-shift1-seed1", seeds[1]), ("quality-search", search)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    assert machine_rows() == [
        ["quality", "Intel(R) Xeon(R) Processor, 2 cores, no GPU"],
        ["quality-ml-shift1, quality-ml-shift1-seed1", "AMD EPYC, 2 cores, no GPU"],
        ["quality-search", "AMD EPYC, 2 cores, no GPU (the latest search's; the file records no machine per search)"],
        ["quality-seed1", "Intel(R) Xeon(R) Processor, 2 cores, no GPU"]]


def test_report_tie_rule_section_shows_both_rules_and_the_tied_targets():
    from bench.report import section_tie_rule

    assert section_tie_rule(None) == []
    metrics = {"ndcg@10": 0.5, "ndcg@20": 0.55, "recall@10": 0.7, "recall@20": 0.8, "mrr@20": 0.4}
    lower = {k: v - 0.01 for k, v in metrics.items()}
    res = {"machine": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2}, "started": "day0",
           "datasets": {"yoochoose": {
               "baselines": {"item_knn": {"sessions": 4087, "tied_targets": 1218, "by_id": metrics, "pessimistic": lower}},
               "neural": {"gru": {"sessions": 4087, "tied_targets": 1, "by_id": metrics, "pessimistic": metrics,
                                  "epochs": 5, "score_temperature": 20.0}}}}}
    text = "\n".join(section_tie_rule(res))
    assert "| yoochoose | item_knn | 1,218 of 4,087 | 0.5000 -> 0.4900 | 0.5500 -> 0.5400 |" in text
    assert "| yoochoose | gru (5 epochs, temperature 20) | 1 of 4,087 | 0.5000 -> 0.5000 |" in text


def test_ratios_against_the_bare_loops_old_optimizer_are_flagged_and_measured_again():
    """Until 2026-12-07 the bare loops stepped with torch's default AdamW (foreach on CUDA), slower
    than the Trainer's fused one: such a ratio favours raytr, so the report says so and
    run_gpu.py --missing runs its whole group again."""
    from bench.report import target_status
    from bench.run_gpu import TRAIN_IMPLS, missing_runs

    rows = [{**r, "gpu": "NVIDIA H100 80GB HBM3"} for r in _gpu_rows("50k", "fp16", "NVIDIA H100 80GB HBM3", "day1",
                                                                      bare_compiled=100.0, raytr_local_cudagraphs=100.0)]
    for r in rows:
        del r["optimizer"]
    line = next(x for x in target_status(None, {"results": rows}, None, None) if x.startswith("- GPU 50k fp16"))
    assert line.endswith("= 1.00 (**met**; against a bare loop on torch's default AdamW (foreach, every parameter "
                         "decayed), slower than the Trainer's fused one: the ratio favours raytr, to be measured again)")
    assert len(missing_runs({"results": rows}, None, None)["train-50k-fp16"]) == len(TRAIN_IMPLS["50k"].split(","))
    current = [{**r, "optimizer": "trainer"} for r in rows]
    line = next(x for x in target_status(None, {"results": current}, None, None) if x.startswith("- GPU 50k fp16"))
    assert line.endswith("= 1.00 (**met**)")
    assert missing_runs({"results": current}, None, None)["train-50k-fp16"] == [
        i for i in TRAIN_IMPLS["50k"].split(",") if i not in ("bare-compiled", "raytr-local-cudagraphs")]
