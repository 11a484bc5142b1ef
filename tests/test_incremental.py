"""Incremental (day-window) evaluation: train on day t, evaluate on day t+1, next to the baselines.

Runs `run_incremental` in-process with launcher="local" and a tiny model, one epoch per day, on
the shared prepared synthetic data (days 1-4: three windows in "finetune" mode).
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from _tensorboard import scalars
from raytr.config import ConfigError, load_config
from raytr.data.layout import day_paths
from raytr.models import SessionModel
from raytr.training.incremental import IncrementalResult, evaluate_baselines, run_incremental

REPO = Path(__file__).resolve().parents[1]
MODELS = ["gpt2", "popularity", "item_knn"]

pytestmark = pytest.mark.slow


def small_config():
    return load_config(REPO / "configs" / "synthetic.yaml", {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
        # Small batches and a high LR: one epoch per day is ~22 steps, enough to beat popularity
        # (average ndcg@20 ~0.44 vs 0.33 on these days; with batch 32 / LR 0.005 it was a coin toss).
        "training": {"launcher": "local", "num_train_epochs": 1, "per_device_train_batch_size": 16,
                     "learning_rate": 0.01, "disable_tqdm": True, "data_loader_engine": "pyarrow",
                     "logging_steps": 1},
    })


def run_names(output_dir: Path) -> list[str]:
    """Training runs in the order they ran (train_result.json keeps only the last)."""
    return [p.name for p in sorted((output_dir / "train" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)]


def final_weights(output_dir: Path, run: str) -> dict[str, torch.Tensor]:
    checkpoints = sorted((output_dir / "train" / "runs" / run / "checkpoints").glob("checkpoint-*"))
    return SessionModel.load(checkpoints[-1]).state_dict()


def init_weights(output_dir: Path, run: str) -> dict[str, torch.Tensor]:
    return SessionModel.load(output_dir / "train" / "runs" / run / "init").state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finetuned(prepared_dir, tmp_path_factory) -> IncrementalResult:
    torch.manual_seed(0)
    return run_incremental(small_config(), prepared_dir, tmp_path_factory.mktemp("incremental") / "finetune")


def test_table_has_a_row_per_day_and_model(finetuned: IncrementalResult):
    table = finetuned.table
    assert list(zip(table["day"], table["model"])) == [(d, m) for d in (2, 3, 4) for m in MODELS]
    assert {"ndcg@20", "recall@20", "mrr@10", "precision@5"} <= set(table.columns)
    metrics = table.drop(columns=["day", "model"])
    assert ((metrics >= 0) & (metrics <= 1)).all().all()
    assert list(finetuned.averages["model"]) == MODELS
    for model in MODELS:
        rows = table[table["model"] == model].drop(columns=["day", "model"])
        average = finetuned.averages.set_index("model").loc[model]
        pd.testing.assert_series_equal(rows.mean(), average[rows.columns], check_names=False)


def test_writes_csv_json_and_png(finetuned: IncrementalResult):
    out = Path(finetuned.output_dir)
    csv = pd.read_csv(out / "incremental.csv")
    pd.testing.assert_frame_equal(csv, finetuned.table, check_dtype=False)
    data = json.loads((out / "incremental.json").read_text())
    assert data["mode"] == "finetune"
    assert len(data["per_day"]) == 9 and [r["model"] for r in data["average"]] == MODELS
    assert data["per_day"][0]["ndcg@20"] == pytest.approx(finetuned.table["ndcg@20"].iloc[0])
    png = (out / "incremental.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_model_beats_popularity_on_average(finetuned: IncrementalResult):
    average = finetuned.averages.set_index("model")["ndcg@20"]
    assert average["gpt2"] > average["popularity"] + 0.03, average.to_dict()


def test_finetune_continues_one_model_and_fits_baselines_on_all_days_seen(finetuned, prepared_dir, prepared_spec):
    out = Path(finetuned.output_dir)
    runs = run_names(out)
    assert len(runs) == 3
    for previous, current in itertools.pairwise(runs):  # each window starts from the previous one's weights
        assert same(init_weights(out, current), final_weights(out, previous))
    lr = small_config().training.learning_rate
    for run in runs:  # and a fresh linear schedule of its own: the LR after its first of n steps is lr (n-1)/n
        logged = scalars(out / "train" / "tensorboard" / run, "train/learning_rate")
        n = max(step for step, _ in logged)
        assert logged[0] == (1, pytest.approx(lr * (n - 1) / n, rel=1e-5)), (run, logged[:3])
    config = small_config()
    expected = evaluate_baselines(prepared_spec, day_paths(prepared_dir, [1, 2]), day_paths(prepared_dir, [3]),
                                  config.training.metrics_top_k, False)
    row = finetuned.table[(finetuned.table["day"] == 3) & (finetuned.table["model"] == "popularity")].iloc[0]
    assert row["ndcg@20"] == pytest.approx(expected["popularity"]["ndcg@20"], abs=1e-12)


def test_retrain_mode_trains_a_new_model_per_window(prepared_dir, prepared_spec, tmp_path):
    config = small_config()
    # A set run_name: each window's new Trainer gets its own run (Ray Train would resume a reused one).
    config = replace(config, training=replace(config.training, run_name="w"))
    result = run_incremental(config, prepared_dir, tmp_path / "retrain", start_day=2, end_day=4, mode="retrain")
    table = result.table
    assert list(zip(table["day"], table["model"])) == [(d, m) for d in (3, 4) for m in MODELS]
    assert json.loads((tmp_path / "retrain" / "incremental.json").read_text())["mode"] == "retrain"
    runs = run_names(tmp_path / "retrain")
    assert runs == ["w-day2", "w-day3"]
    assert not same(init_weights(tmp_path / "retrain", runs[1]), final_weights(tmp_path / "retrain", runs[0]))
    # Baselines see day t only.
    expected = evaluate_baselines(prepared_spec, day_paths(prepared_dir, [3]), day_paths(prepared_dir, [4]),
                                  config.training.metrics_top_k, False)
    row = table[(table["day"] == 4) & (table["model"] == "item_knn")].iloc[0]
    assert row["ndcg@20"] == pytest.approx(expected["item_knn"]["ndcg@20"], abs=1e-12)


def test_expanding_mode_trains_a_new_model_per_window_on_the_days_so_far(prepared_dir, prepared_spec, tmp_path):
    """Each window is a split of its own: a fresh model trained on days start..t (what the baselines
    are fitted on), evaluated on day t+1."""
    from raytr.data.loaders import DataLoader

    config = small_config()
    config = replace(config, training=replace(config.training, run_name="w"))
    out = tmp_path / "expanding"
    result = run_incremental(config, prepared_dir, out, start_day=2, end_day=4, mode="expanding")
    assert list(zip(result.table["day"], result.table["model"])) == [(d, m) for d in (3, 4) for m in MODELS]
    assert json.loads((out / "incremental.json").read_text())["mode"] == "expanding"
    runs = run_names(out)
    assert runs == ["w-day2", "w-day3"]
    # A fresh model (the same seed's initial weights), not the previous window's.
    assert same(init_weights(out, runs[1]), init_weights(out, runs[0]))
    assert not same(init_weights(out, runs[1]), final_weights(out, runs[0]))
    batch = config.training.per_device_train_batch_size
    for run, days in zip(runs, ([2], [2, 3])):  # one epoch: one step per batch of those days' sessions
        steps = max(step for step, _ in scalars(out / "train" / "tensorboard" / run, "train/learning_rate"))
        assert steps == len(DataLoader(prepared_spec, day_paths(prepared_dir, days), batch, engine="pyarrow")), run
    expected = evaluate_baselines(prepared_spec, day_paths(prepared_dir, [2, 3]), day_paths(prepared_dir, [4]),
                                  config.training.metrics_top_k, False)
    row = result.table[(result.table["day"] == 4) & (result.table["model"] == "item_knn")].iloc[0]
    assert row["ndcg@20"] == pytest.approx(expected["item_knn"]["ndcg@20"], abs=1e-12)
    with pytest.raises(ValueError, match="mode='daily': expected 'finetune', 'retrain' or 'expanding'"):
        run_incremental(config, prepared_dir, tmp_path / "bad", mode="daily")


def test_fewer_than_two_days_or_no_window_raise(prepared_dir, tmp_path):
    one_day = tmp_path / "one_day"
    shutil.copytree(Path(prepared_dir) / "sessions" / "day=1", one_day / "sessions" / "day=1")
    shutil.copy(Path(prepared_dir) / "prepare.json", one_day / "prepare.json")  # a complete dataset
    with pytest.raises(ValueError, match=r"1 day\(s\) of sessions; incremental evaluation needs >= 2"):
        run_incremental(small_config(), one_day, tmp_path / "out")
    with pytest.raises(ValueError, match="no day t with t and t\\+1"):
        run_incremental(small_config(), prepared_dir, tmp_path / "out", start_day=4)


def test_a_checkpoint_to_resume_is_refused_before_anything_is_written(prepared_dir, tmp_path):
    """Every window's Trainer would resume it (a new model per window starting from its weights)."""
    config = small_config()
    config = replace(config, training=replace(config.training, resume_from_checkpoint=str(tmp_path / "ckpt")))
    with pytest.raises(ConfigError, match=r"training.resume_from_checkpoint=.*ckpt.*unset it"):
        run_incremental(config, prepared_dir, tmp_path / "out", mode="expanding")
    assert not (tmp_path / "out").exists()


def test_knn_settings_reach_the_baseline_and_bad_ones_fail_before_training(prepared_dir, prepared_spec, tmp_path):
    from raytr.baselines import SessionItemKNN
    from raytr.data.loaders import DataLoader
    from raytr.evaluation import evaluate_next_item

    train, test = day_paths(prepared_dir, [1, 2]), day_paths(prepared_dir, [3])
    knn = SessionItemKNN(prepared_spec.item_cardinality, recency_decay=0.5, self_similarity=1.0).fit(
        DataLoader(prepared_spec, train, 1024, shuffle=False, engine="pyarrow"))
    expected = evaluate_next_item(knn, DataLoader(prepared_spec, test, 1024, shuffle=False, engine="pyarrow"),
                                  [20], False).compute()
    got = evaluate_baselines(prepared_spec, train, test, [20], False, knn_recency_decay=0.5,
                             knn_self_similarity=1.0)["item_knn"]
    assert got["ndcg@20"] == pytest.approx(expected["ndcg@20"], abs=1e-12)
    assert got["ndcg@20"] != evaluate_baselines(prepared_spec, train, test, [20], False,
                                                knn_recency_decay=0.5)["item_knn"]["ndcg@20"]
    with pytest.raises(ValueError, match="self_similarity=1.5"):
        run_incremental(small_config(), prepared_dir, tmp_path / "out", knn_self_similarity=1.5)
    assert not (tmp_path / "out").exists()


def test_an_output_that_would_lose_or_mix_data_is_refused_before_training(prepared_dir, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.csv").write_text("a,b\n")
    for output, message in ((a_file, "is a file"), (foreign, "a directory with other contents"),
                            (Path(prepared_dir) / "incremental", "is inside the input data")):
        with pytest.raises(ValueError, match=message):
            run_incremental(small_config(), prepared_dir, output)
    assert a_file.read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["keep.csv"]
    assert not (Path(prepared_dir) / "incremental").exists()


def test_a_day_without_a_next_day_is_trained_on_so_the_model_sees_what_the_baselines_see(
        prepared_dir, prepared_spec, tmp_path, caplog):
    """Days 1, 3, 4 (day 2 has no sessions): day 1 cannot be evaluated on, but the model trains on
    it before day 3 (it was skipped, while the baselines of day 4 were fitted on days 1 and 3)."""
    from raytr.data.layout import categories_digest

    gap = tmp_path / "gap"
    shutil.copytree(prepared_dir, gap, ignore=lambda d, names: ["day=2"] if Path(d).name == "sessions" else [])
    with caplog.at_level("WARNING", logger="raytr.training.incremental"):
        result = run_incremental(small_config(), gap, tmp_path / "out")
    assert "no sessions on day(s) [2]: day(s) [1] are trained on, not evaluated" in caplog.text
    assert list(zip(result.table["day"], result.table["model"])) == [(4, m) for m in MODELS]
    runs = run_names(tmp_path / "out")
    assert len(runs) == 2 and same(init_weights(tmp_path / "out", runs[1]), final_weights(tmp_path / "out", runs[0]))
    expected = evaluate_baselines(prepared_spec, day_paths(gap, [1, 3]), day_paths(gap, [4]),
                                  small_config().training.metrics_top_k, False)
    row = result.table[result.table["model"] == "popularity"].iloc[0]
    assert row["ndcg@20"] == pytest.approx(expected["popularity"]["ndcg@20"], abs=1e-12)
    # train/ is a model bundle: `raytr evaluate` can tell data of another prepare run from its own.
    assert categories_digest(tmp_path / "out" / "train") == categories_digest(prepared_dir) is not None
    # Days 1, 2, 4: only day 1 has a next day; day 2, after the last window, is not trained on.
    tail = tmp_path / "tail"
    shutil.copytree(prepared_dir, tail, ignore=lambda d, names: ["day=3"] if Path(d).name == "sessions" else [])
    result = run_incremental(small_config(), tail, tmp_path / "out-tail", baselines=False)
    assert list(result.table["day"]) == [2] and len(run_names(tmp_path / "out-tail")) == 1
