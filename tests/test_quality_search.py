"""bench/quality.py's hyperparameter search: validation only, the best trial per model chosen."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import quality  # noqa: E402
from bench.common import ITEM_COLUMN  # noqa: E402


def test_parse_grid_types_values_and_names_a_bad_field():
    assert quality.parse_grid(["dropout=0.2,0.5", "d_model=64,128"]) == {"dropout": [0.2, 0.5], "d_model": [64, 128]}
    with pytest.raises(ValueError, match="'dropuot' is not a searchable"):
        quality.parse_grid(["dropuot=0.2"])
    with pytest.raises(ValueError, match="values of 'd_model' must be ints"):
        quality.parse_grid(["d_model=64.5"])
    with pytest.raises(ValueError, match="no values for 'dropout'"):
        quality.parse_grid(["dropout="])
    assert quality.parse_grid(["repeat_bias=false,True"]) == {"repeat_bias": [False, True]}
    with pytest.raises(ValueError, match="values of 'repeat_bias' must be bools"):
        quality.parse_grid(["repeat_bias=0"])
    assert quality.model_config("gpt2", "clm", quality.Hyper(repeat_bias=True)).repeat_bias


def test_tuned_hyper_applies_the_choice_of_its_dataset_and_model_only(monkeypatch):
    monkeypatch.setattr(quality, "TUNED", {"ml-100k": {"xlnet-clm": {"dropout": 0.5, "d_model": 128}}})
    base = quality.Hyper(batch_size=32)
    assert quality.tuned_hyper(base, "ml-100k", "xlnet-clm") == quality.Hyper(batch_size=32, dropout=0.5, d_model=128)
    assert quality.tuned_hyper(base, "ml-100k", "gru") == base
    assert quality.tuned_hyper(base, "yoochoose", "xlnet-clm") == base
    assert quality.tuned_hyper(base, "ml-100k", "xlnet-clm", use_tuned=False) == base


class _Untouchable(quality.EvalSet):
    def batches(self, spec, batch_size: int = 512):
        raise AssertionError("the search scored the test set")


def _tiny_data(tmp_path: Path) -> quality.QualityData:
    """Sessions that walk a ring of 20 items: the next item is always the current one + 1."""
    from raytr.features import FIRST_ITEM_ID, FeatureSpec

    rng = np.random.default_rng(0)
    ring = 20

    def walk(length: int) -> np.ndarray:
        start = rng.integers(ring)
        return FIRST_ITEM_ID + (start + np.arange(length)) % ring

    train = quality._write_sessions(tmp_path / "train.parquet", [walk(int(rng.integers(3, 9))) for _ in range(512)])
    valid = torch.zeros(64, 8, dtype=torch.int64)
    for row in valid:
        row[:6] = torch.from_numpy(walk(6))
    spec = FeatureSpec(item_id=ITEM_COLUMN, item_cardinality=FIRST_ITEM_ID + ring, max_sequence_length=8)
    return quality.QualityData("tiny", spec, [train], quality.EvalSet("valid", sessions=valid),
                               _Untouchable("test"), exclude_seen=False, protocol="ring", stats={})


def test_search_scores_validation_only_and_chooses_each_models_best_trial(tmp_path, monkeypatch):
    data = _tiny_data(tmp_path)
    monkeypatch.setattr(quality, "load_data", lambda *args: data)
    base = quality.Hyper(d_model=16, n_layers=1, n_heads=2, batch_size=64)
    res = quality.search_dataset("tiny", ("gru", "gpt2-clm"), {"learning_rate": [1e-6, 1e-2]}, 2, tmp_path / "work",
                                 base, jobs=1, threads=1)
    assert [(t["model"], t["hyperparameters"]["learning_rate"]) for t in res["trials"]] == [
        ("gru", 1e-6), ("gru", 1e-2), ("gpt2-clm", 1e-6), ("gpt2-clm", 1e-2)]
    for trial in res["trials"]:
        assert set(trial["validation_curve"]) == {1, 2}  # every epoch scored on validation
        assert trial["hyperparameters"]["d_model"] == 16  # the base's other fields kept
    # A learning rate of 1e-6 cannot learn the ring in two epochs; 1e-2 does, for both models.
    for model in ("gru", "gpt2-clm"):
        low, high = (t for t in res["trials"] if t["model"] == model)
        assert high["valid"]["ndcg@20"] > low["valid"]["ndcg@20"] + 0.1
        assert res["chosen"][model] == {"learning_rate": 1e-2}
    assert not (tmp_path / "work" / "tiny").exists()  # checkpoints removed


def test_a_search_skips_and_records_the_points_the_model_config_refuses(tmp_path, monkeypatch):
    data = _tiny_data(tmp_path)
    monkeypatch.setattr(quality, "load_data", lambda *args: data)
    trained = []
    monkeypatch.setattr(quality, "run_search_trial", lambda trial: trained.append(trial.hp) or {
        "model": trial.model, "hyperparameters": asdict(trial.hp), "valid": {"ndcg@20": float(trial.hp.repeat_mixture)}})
    grid = {"repeat_bias": [True, False], "repeat_mixture": [True, False]}
    res = quality.search_dataset("tiny", ("gpt2-clm",), grid, 1, tmp_path / "work", quality.Hyper())
    assert [(hp.repeat_bias, hp.repeat_mixture) for hp in trained] == [(True, False), (False, True), (False, False)]
    assert [(s["hyperparameters"]["repeat_bias"], s["hyperparameters"]["repeat_mixture"]) for s in res["skipped"]] \
        == [(True, True)]
    assert "set one of them" in res["skipped"][0]["why"]
    assert res["chosen"] == {"gpt2-clm": {"repeat_bias": False, "repeat_mixture": True}}


def test_the_test_split_by_target_kind_adds_up_to_the_whole():
    from raytr.features import FIRST_ITEM_ID, FeatureSpec

    a, b, c = FIRST_ITEM_ID, FIRST_ITEM_ID + 1, FIRST_ITEM_ID + 2
    sessions = torch.tensor([[a, b, c, c, 0], [a, b, a, 0, 0], [a, c, b, 0, 0]])
    kinds = quality.target_kinds(sessions, torch.tensor([4, 3, 3]))
    assert kinds.tolist() == [0, 1, 2]  # the last item again, an earlier item, a new one

    class LastItemFirst:
        def score_next(self, batch):
            scores = torch.zeros(batch.item_ids.shape[0], spec.item_cardinality)
            scores[torch.arange(len(scores)), batch.item_ids[torch.arange(len(scores)), batch.lengths - 1]] = 1.0
            return scores

    spec = FeatureSpec(item_id=ITEM_COLUMN, item_cardinality=FIRST_ITEM_ID + 10, max_sequence_length=4)
    sessions = torch.tensor([[a, b, b, 0], [a, c, c, 0], [b, a, b, 0], [a, b, c + 3, 0], [c, a, b, c]])
    data = quality.QualityData("tiny", spec, [], quality.EvalSet("valid", sessions=sessions), quality.EvalSet("test"),
                               exclude_seen=False, protocol="", stats={})
    res = quality.evaluate(LastItemFirst(), data, "valid", by_target=True)
    split = res["by_target"]
    assert [split[k]["sessions"] for k in quality.TARGET_KINDS] == [2, 2, 1] and res["sessions"] == 5
    assert split["the last item again"]["ndcg@20"] == 1.0 and split["an item not in the session"]["mrr@20"] < 1.0
    for metric in ("ndcg@20", "recall@10", "mrr@20"):
        assert res[metric] == pytest.approx(sum(s[metric] * s["sessions"] for s in split.values()) / 5)
    assert res == quality.evaluate(LastItemFirst(), data, "valid") | {"by_target": split}
    with pytest.raises(ValueError, match="by_target"):
        quality.evaluate(LastItemFirst(), replace(data, exclude_seen=True), "valid", by_target=True)


def test_merging_searches_replaces_a_repeated_grid_and_keeps_other_fields_searched():
    old = [{"dataset": "ml-100k", "grid": {"dropout": [0.2], "d_model": [64]}, "run": 1},
           {"dataset": "yoochoose", "grid": {"dropout": [0.2]}, "run": 1}]
    fresh = [{"dataset": "ml-100k", "grid": {"d_model": [64, 128], "dropout": [0.5]}, "run": 2},
             {"dataset": "ml-100k", "grid": {"learning_rate": [1e-3]}, "run": 2}]
    merged = quality.merge_searches(old, fresh)
    on_other_data = {"dataset": "yoochoose", "grid": {"dropout": [0.2]}, "data": {"time_features": ["hour"]}, "run": 3}
    assert quality.merge_searches(merged, [on_other_data])[-2:] == [merged[-1], on_other_data]
    xlnet, gpt2 = ({"dataset": "yoochoose", "grid": {"dropout": [0.2]}, "chosen": {m: {"dropout": 0.2}}, "run": 4}
                   for m in ("xlnet-clm", "gpt2-clm"))
    assert quality.merge_searches([xlnet], [gpt2]) == [xlnet, gpt2]  # other models: both kept
    assert quality.merge_searches([xlnet, gpt2], [xlnet | {"run": 5}]) == [xlnet | {"run": 5}, gpt2]
    assert [(s["dataset"], sorted(s["grid"]), s["run"]) for s in merged] == [
        ("ml-100k", ["d_model", "dropout"], 2), ("yoochoose", ["dropout"], 1), ("ml-100k", ["learning_rate"], 2)]


def test_a_search_starts_each_model_from_what_earlier_searches_chose(tmp_path, monkeypatch):
    data = _tiny_data(tmp_path)
    monkeypatch.setattr(quality, "load_data", lambda *args: data)
    monkeypatch.setattr(quality, "TUNED", {"tiny": {"gru": {"d_model": 8}}})
    base = quality.Hyper(d_model=16, n_layers=1, n_heads=2, batch_size=64)
    res = quality.search_dataset("tiny", ("gru",), {"dropout": [0.0]}, 1, tmp_path / "work", base)
    assert res["trials"][0]["hyperparameters"]["d_model"] == 8
    assert res["tuned_before"] == {"gru": {"d_model": 8}}
    res = quality.search_dataset("tiny", ("gru",), {"dropout": [0.0]}, 1, tmp_path / "work", base, use_tuned=False)
    assert res["trials"][0]["hyperparameters"]["d_model"] == 16


def test_a_trial_an_earlier_search_ran_is_reused_not_trained_again(tmp_path, monkeypatch):
    data = _tiny_data(tmp_path)
    monkeypatch.setattr(quality, "load_data", lambda *args: data)
    base = quality.Hyper(d_model=16, n_layers=1, n_heads=2, batch_size=64)
    first = quality.search_dataset("tiny", ("gru",), {"learning_rate": [1e-2]}, 1, tmp_path / "work", base)
    trained = []
    real = quality.run_search_trial
    monkeypatch.setattr(quality, "run_search_trial", lambda trial: trained.append(trial.hp.learning_rate) or real(trial))
    second = quality.search_dataset("tiny", ("gru",), {"learning_rate": [1e-6, 1e-2]}, 1, tmp_path / "work", base,
                                    earlier=[first])
    assert trained == [1e-6]  # 1e-2 came from the first search
    reused = second["trials"][1]
    assert reused["reused"] == first["measured"] and reused["valid"] == first["trials"][0]["valid"]
    assert second["chosen"] == {"gru": {"learning_rate": 1e-2}}
    # A search on other data (e.g. YOOCHOOSE prepared with other time features) is not reused.
    trained.clear()
    quality.search_dataset("tiny", ("gru",), {"learning_rate": [1e-2]}, 1, tmp_path / "work", base,
                           earlier=[{**first, "data": {"time_features": ["hour"]}}])
    assert trained == [1e-2]
    # YOOCHOOSE's key names the time features its config asks for (searches before recorded {}) and
    # its validation day (searches before chose on a random 10% of days 1-5 and recorded none, or on
    # the whole day 5 and recorded "day 5").
    assert quality._data_key("yoochoose") == {"time_features": ["hour", "time_since_prev"],
                                              "validation": "day 5, items of days 1-4 only"}


def _fake_movielens(tmp_path: Path, monkeypatch):
    """8 users with 12 ratings each, all at distinct times, in place of MovieLens-100k."""
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame([(user, int(item), int(t)) for user in range(1, 9)
                          for t, item in enumerate(rng.choice(np.arange(1, 40), size=12, replace=False))],
                         columns=["user_id", "item_id", "timestamp"])
    monkeypatch.setattr(quality, "movielens_interactions", lambda: frame.copy())
    monkeypatch.setattr(quality, "DATA_DIR", tmp_path)
    return frame


def test_a_movielens_holdout_shift_moves_validation_and_test_one_rating_earlier(tmp_path, monkeypatch):
    """With shift 1 each user's last rating is never read: the shifted test set is the unshifted
    validation set (inputs, targets and the history excluded from the ranking alike)."""
    import pyarrow.parquet as pq

    frame = _fake_movielens(tmp_path, monkeypatch)
    plain = quality.load_movielens(quality.MovieLensSplit(window=6, tie_orders=1))
    shifted = quality.load_movielens(quality.MovieLensSplit(window=6, tie_orders=1, holdout_shift=1))
    assert torch.equal(shifted.test.sessions, plain.valid.sessions)
    assert (shifted.test.history != plain.valid.history).nnz == 0
    train = np.concatenate(pq.read_table(shifted.train_paths[0]).column(ITEM_COLUMN).to_numpy(zero_copy_only=False))
    assert plain.test.sessions.shape == shifted.test.sessions.shape == (8, 6)
    # the dropped ratings appear nowhere: not as an input, a target or a training event
    assert shifted.stats["interactions"] == len(frame) - 8 and shifted.stats["holdout_shift"] == 1
    dropped = plain.test.sessions[torch.arange(8), (plain.test.sessions > 0).sum(1) - 1]
    for user in range(8):
        assert dropped[user] not in shifted.test.sessions[user] and dropped[user] not in shifted.valid.sessions[user]
    assert len(train) == 8 * (12 - 3)  # each user's 12 ratings less the dropped, validation and test ones
    assert quality.MovieLensSplit().key() == {"ml_window": quality.ML_WINDOW, "ml_tie_orders": quality.ML_TIE_ORDERS}
    assert quality.MovieLensSplit(holdout_shift=2).key()["ml_holdout_shift"] == 2


def test_movielens_refit_windows_add_each_users_validation_rating_and_keep_the_held_out_sets(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    _fake_movielens(tmp_path, monkeypatch)

    def events(paths: list[str]) -> list[int]:
        return sorted(np.concatenate(pq.read_table(paths[0]).column(ITEM_COLUMN).to_numpy(zero_copy_only=False)))

    plain = quality.load_movielens(quality.MovieLensSplit(window=6, tie_orders=2, refit=False))
    refit = quality.load_movielens(quality.MovieLensSplit(window=6, tie_orders=2, refit=True))
    assert plain.refit_paths is None and plain.refit_baseline_paths is None
    assert torch.equal(refit.valid.sessions, plain.valid.sessions) and torch.equal(refit.test.sessions, plain.test.sessions)
    assert events(refit.train_paths) == events(plain.train_paths)  # the validation-time fit is unchanged
    valid_targets = plain.valid.sessions[torch.arange(8), (plain.valid.sessions > 0).sum(1) - 1].tolist()
    test_targets = plain.test.sessions[torch.arange(8), (plain.test.sessions > 0).sum(1) - 1].tolist()
    assert events(refit.refit_baseline_paths) == sorted(events(plain.baseline_paths) + valid_targets)
    assert events(refit.refit_paths) == sorted(events(plain.train_paths) + 2 * valid_targets)  # in both tie orders
    assert not set(test_targets) & (set(events(refit.refit_paths)) - set(events(plain.train_paths)) - set(valid_targets))
    assert refit.stats["refit"] is True and "fitted again" in refit.protocol


def test_a_refit_scores_the_test_with_the_model_fitted_again_at_the_epoch_chosen_on_validation(tmp_path):
    """Training walks the ring forwards, the refit data and the test backwards: only a test scored
    with the refitted model can rank the backward step; validation (forwards) still picks the epoch."""
    from raytr.features import FIRST_ITEM_ID

    data = _tiny_data(tmp_path)
    rng = np.random.default_rng(1)

    def backwards(length: int) -> np.ndarray:
        return FIRST_ITEM_ID + (rng.integers(20) - np.arange(length)) % 20

    test = torch.zeros(64, 8, dtype=torch.int64)
    for row in test:
        row[:6] = torch.from_numpy(backwards(6))
    data.test = quality.EvalSet("test", sessions=test)
    hp = quality.Hyper(d_model=16, n_layers=1, n_heads=2, batch_size=64, learning_rate=1e-2)
    plain = quality.run_neural(data, "gru", "gru", "clm", 2, tmp_path / "work", hp)
    data.refit_paths = [quality._write_sessions(tmp_path / "refit.parquet",
                                                [backwards(int(rng.integers(3, 9))) for _ in range(512)])]
    refit = quality.run_neural(data, "gru", "gru", "clm", 2, tmp_path / "work", hp)
    assert refit["refit"] is True and "refit" not in plain
    assert refit["valid"] == plain["valid"] and refit["choice"] == plain["choice"]  # the choice is unchanged
    assert plain["test"]["ndcg@20"] < 0.5 < refit["test"]["ndcg@20"]
    assert not (tmp_path / "work" / "gru-refit").exists()

    # the baselines too: a refit popularity knows the item every test session ends with
    item = FIRST_ITEM_ID + 7
    data.baseline_paths = data.train_paths
    data.refit_baseline_paths = [quality._write_sessions(tmp_path / "refit-baseline.parquet",
                                                         [np.array([item, item])] * 2000)]
    data.test = quality.EvalSet("test", sessions=torch.tensor([[FIRST_ITEM_ID, item]] * 8))
    baselines = quality.run_baselines(data)
    assert baselines["popularity"]["test"]["ndcg@10"] == 1.0 and baselines["popularity"]["refit"] is True
    data.refit_baseline_paths = None
    assert quality.run_baselines(data)["popularity"]["test"]["ndcg@10"] < 1.0


def test_refit_schedule_keeps_the_steps_to_the_chosen_epoch_in_whole_epochs_of_the_larger_data():
    assert quality.refit_schedule(30, 26, 11317, 13626) == (25, 22)  # YOOCHOOSE days 1-4 -> 1-5
    assert quality.refit_schedule(40, 28, 9648, 9708) == (40, 28)  # MovieLens: 0.6% more windows
    assert quality.refit_schedule(4, 3, 512, 1024) == (2, 2)
    assert quality.refit_schedule(3, 1, 10, 100) == (1, 1)  # never less than one epoch
    for chosen in range(1, 31):
        epochs, stop = quality.refit_schedule(30, chosen, 11317, 13626)
        assert 0 < stop <= epochs and abs(stop * 13626 - chosen * 11317) <= 13626 / 2


def test_a_refit_on_twice_the_sessions_trains_half_the_epochs(tmp_path, monkeypatch):
    from raytr.features import FIRST_ITEM_ID

    data = _tiny_data(tmp_path)  # 512 training sessions
    data.test = quality.EvalSet("test", sessions=data.valid.sessions)
    data.refit_paths = [quality._write_sessions(tmp_path / "refit.parquet",
                                                [np.arange(6) % 20 + FIRST_ITEM_ID] * 1024)]
    calls = []
    train = quality._train_checkpoints

    def recording(data, body, objective, epochs, out_dir, hp, paths, stop_after_epoch=0):
        checkpoints, result, seconds = train(data, body, objective, epochs, out_dir, hp, paths, stop_after_epoch)
        calls.append((paths, epochs, stop_after_epoch, sorted(checkpoints)))
        return checkpoints, result, seconds

    monkeypatch.setattr(quality, "_train_checkpoints", recording)
    hp = quality.Hyper(d_model=16, n_layers=1, n_heads=2, batch_size=64, learning_rate=1e-2)
    res = quality.run_neural(data, "gru", "gru", "clm", 4, tmp_path / "work", hp)
    chosen = res["choice"]["epochs"]
    stop = max(1, round(chosen / 2))
    assert calls[0] == (data.train_paths, 4, 0, [1, 2, 3, 4])
    assert calls[1] == (data.refit_paths, 2, stop, list(range(1, stop + 1)))  # 16 steps an epoch instead of 8
    assert res["refit_epochs"] == {"schedule": 2, "stopped_after": stop} and res["test"] is not None


def test_a_repeat_scoring_model_is_chosen_at_its_best_epoch_and_temperature_and_tested_at_both(tmp_path, monkeypatch):
    data = _tiny_data(tmp_path)
    data.test = quality.EvalSet("test", sessions=data.valid.sessions)
    by_temperature = {t: 0.30 + 0.001 * i for i, t in enumerate(quality.SCORE_TEMPERATURES)} | {2.0: 0.35}
    scored = []

    def fake_evaluate(model, data, which, by_target=False):  # epoch 2 is 0.01 better at every temperature
        temperature = model.config.score_temperature
        scored.append((which, temperature))
        epoch = 1 + (len(scored) - 1) // len(quality.SCORE_TEMPERATURES)
        return {"ndcg@20": by_temperature[temperature] + 0.01 * (epoch == 2)}

    monkeypatch.setattr(quality, "evaluate", fake_evaluate)
    hp = quality.Hyper(d_model=16, n_layers=1, n_heads=2, batch_size=64, repeat_bias=True)
    res = quality.run_neural(data, "gru", "gru", "clm", 2, tmp_path / "work", hp)
    assert scored == [("valid", t) for _ in range(2) for t in quality.SCORE_TEMPERATURES] + [("test", 2.0)]
    assert res["choice"] == {"epochs": 2, "score_temperature": 2.0} and res["valid"]["ndcg@20"] == 0.36
    assert res["validation_curve"] == {1: 0.30, 2: 0.31}  # the model as trained (temperature 1)
    assert res["validation_by_temperature"] == {str(t): v + 0.01 for t, v in by_temperature.items()}
    # Without repeat scoring a temperature would move no ranking: one score per checkpoint.
    scored.clear()
    res = quality.run_neural(data, "gru", "gru", "clm", 2, tmp_path / "work", replace(hp, repeat_bias=False))
    assert scored == [("valid", 1.0), ("valid", 1.0), ("test", 1.0)] and res["choice"] == {"epochs": 1}
    assert "validation_by_temperature" not in res


def _fake_search_trials(tmp_path: Path, monkeypatch) -> list[bool]:
    """Searches on tiny data whose trials train nothing: the returned list collects each trained
    trial's repeat_bias."""
    data = _tiny_data(tmp_path)
    monkeypatch.setattr(quality, "load_data", lambda *args: data)
    trained = []
    monkeypatch.setattr(quality, "run_search_trial", lambda trial: trained.append(trial.hp.repeat_bias) or {
        "model": trial.model, "hyperparameters": asdict(trial.hp), "valid": {"ndcg@20": 0.5},
        "score_temperatures": list(quality.score_temperatures(trial.hp))})
    return trained


def test_a_trial_scored_without_the_temperatures_is_run_again_only_where_they_apply(tmp_path, monkeypatch):
    trained = _fake_search_trials(tmp_path, monkeypatch)
    base = quality.Hyper()
    grid = {"repeat_bias": [True, False]}
    before = {"dataset": "tiny", "data": {}, "epochs_max": 1, "measured": "earlier", "grid": grid,  # no temperatures
              "trials": [{"model": "gru", "hyperparameters": asdict(replace(base, repeat_bias=b)),
                          "valid": {"ndcg@20": 0.4}} for b in (True, False)]}
    res = quality.search_dataset("tiny", ("gru",), grid, 1, tmp_path / "work", base, earlier=[before])
    assert trained == [True]  # the plain model's trial is reused: its scores cannot change
    assert [t.get("reused") for t in res["trials"]] == [None, "earlier"]


def test_a_repeat_bias_trial_of_the_summed_form_is_run_again_and_one_of_the_latest_occurrence_reused(
        tmp_path, monkeypatch):
    trained = _fake_search_trials(tmp_path, monkeypatch)
    base, grid = quality.Hyper(), {"repeat_bias": [True, False]}

    def earlier(form: dict) -> dict:
        return {"dataset": "tiny", "data": {}, "epochs_max": 1, "measured": "earlier", "grid": grid,
                "trials": [{"model": "gru", "hyperparameters": asdict(replace(base, repeat_bias=b)),
                            "valid": {"ndcg@20": 0.4}, "score_temperatures": list(quality.score_temperatures(
                                replace(base, repeat_bias=b)))} | (form if b else {}) for b in (True, False)]}

    res = quality.search_dataset("tiny", ("gru",), grid, 1, tmp_path / "work", base, earlier=[earlier({})])
    assert trained == [True]  # the summed bias is trained again; the plain model's trial is reused
    assert [t.get("reused") for t in res["trials"]] == [None, "earlier"]
    res = quality.search_dataset("tiny", ("gru",), grid, 1, tmp_path / "work", base,
                                 earlier=[earlier({"repeat_bias_form": quality.REPEAT_BIAS_FORM})])
    assert trained == [True] and [t.get("reused") for t in res["trials"]] == ["earlier", "earlier"]


def _quality_run(shift: int, transformer: float, knn: float, seed: int = 0, refit: bool = True) -> dict:
    def scores(v: float) -> dict:
        return {m: v for m in quality.REPORTED} | {"sessions": 943}

    models = {"item_knn": {"valid": scores(knn), "test": scores(knn), "choice": {"recency_decay": 0.5}},
              "xlnet-clm": {"valid": scores(transformer), "test": scores(transformer), "choice": {"epochs": 7},
                            "hyperparameters": {"d_model": 64, "seed": seed}}}
    beats = {m: {"item_knn": transformer > knn} for m in quality.REPORTED}
    summary = {"best_transformer": "xlnet-clm", "beats_every_baseline": transformer > knn, "beats": beats,
               "best_test": scores(transformer), "best_baseline_test": {m: (knn, "item_knn") for m in quality.REPORTED}}
    stats = {"users": 943} | ({"holdout_shift": shift} if shift else {}) | ({"refit": True} if refit else {})
    return {"datasets": [{"dataset": "ml-100k", "protocol": "leave-one-out", "stats": stats, "seconds": 10.0,
                          "budget_s": 60.0, "epochs_max": 40, "models": models, "summary": summary}]}


def test_the_report_shows_movielens_variants_beside_the_standard_split_each_with_its_own_seeds(tmp_path, monkeypatch):
    from bench import report

    monkeypatch.setattr(report, "FIGURES", tmp_path)
    seeds = [_quality_run(0, 0.145, 0.143, seed=1), _quality_run(1, 0.162, 0.141, seed=1),
             _quality_run(0, 0.138, 0.143, seed=1, refit=False)]
    variants = [_quality_run(1, 0.16, 0.141), _quality_run(0, 0.139, 0.143, refit=False)]
    text = "\n".join(report.section_quality(_quality_run(0, 0.14, 0.143), seeds, variants=variants))
    no_refit_at = text.index("#### ml-100k, the standard split, test scored without the refit (`--no-ml-refit`)")
    shifted_at = text.index("#### ml-100k, validation and test 1 rating(s) earlier (`--ml-holdout-shift 1`)\n")
    assert no_refit_at < shifted_at  # the standard place first
    standard, no_refit, shifted = text[:no_refit_at], text[no_refit_at:shifted_at], text[shifted_at:]
    assert "does **not** beat every baseline" in standard and "**xlnet-clm**, beats every baseline" in shifted
    # each variant's seed spread holds its own seeds only
    assert "| 1 | 7 | 0.1450 | 0.1450 |" in standard and "0.1620" not in standard and "0.1380" not in standard
    assert "| 1 | 7 | 0.1380 | 0.1380 |" in no_refit and "0.1450" not in no_refit
    assert "| 1 | 7 | 0.1620 | 0.1620 |" in shifted and "0.1450" not in shifted
    assert (tmp_path / "quality.png").exists()
    # a seed run under another protocol (e.g. before a split changed) is no seed of this one
    other_protocol = _quality_run(0, 0.150, 0.143, seed=2)
    other_protocol["datasets"][0]["protocol"] = "an older split"
    main = _quality_run(0, 0.14, 0.143)["datasets"][0]
    assert [r["test"]["ndcg@20"] for r in report.seed_runs_of(main, seeds + [other_protocol])] == [0.14, 0.145]


def test_movielens_position_stats_describe_the_held_out_rating_at_each_place_from_the_end():
    import pandas as pd

    day = 86400
    # user 1 rates 10, 11, 12, 13 (12 and 13 in the same second); user 2 rates 11, 10, 13, 12;
    # user 3 rates 13, 12, 10, 11 (all within seconds)
    frame = pd.DataFrame({"user_id": [1] * 4 + [2] * 4 + [3] * 4,
                          "item_id": [10, 11, 12, 13, 11, 10, 13, 12, 13, 12, 10, 11],
                          "timestamp": [0, day, 2 * day, 2 * day, 0, 1, 2, 3 * day, 0, 1, 2, 3],
                          "rating": [1, 2, 3, 4, 5, 4, 3, 2, 1, 1, 1, 5]})
    users_reversed = pd.concat([frame[frame["user_id"] == u] for u in (3, 2, 1)])  # ties keep the file's order
    last, second = quality.movielens_position_stats(users_reversed, places=2)
    # last ratings 13, 12, 11; counted in what precedes each user's validation: 10, 11 | 11, 10 | 13, 12
    assert last["median_train_count"] == 1.0
    assert last["median_age_days"] == pytest.approx(2.0)  # 13 first rated at 0, rated by user 1 at day 2
    assert last["tied_with_previous"] == pytest.approx(1 / 3) and last["mean_rating"] == pytest.approx(11 / 3)
    # second-to-last 12, 13, 10; counted in the first rating of each user (10, 11, 13)
    assert second["place"] == 2 and second["median_train_count"] == 1.0
    assert second["mean_rating"] == pytest.approx(7 / 3)


def test_a_shifted_split_or_another_seed_never_writes_over_the_standard_results():
    assert quality.default_output() == "quality"
    assert quality.default_output(seed=2) == "quality-seed2"
    assert quality.default_output(holdout_shift=1) == "quality-ml-shift1"
    assert quality.default_output(holdout_shift=1, seed=2) == "quality-ml-shift1-seed2"
    assert quality.default_output(holdout_shift=1, seed=2, refit=False) == "quality-ml-shift1-no-refit-seed2"
    assert quality.default_output(refit=False) == "quality-ml-no-refit"
    # a shift applies to MovieLens evaluations only (a search would replace the standard one)
    assert quality.main(["--datasets", "synthetic", "--ml-holdout-shift", "1"]) == 2
    assert quality.main(["--datasets", "ml-100k", "--ml-holdout-shift", "1", "--search", "dropout=0.1"]) == 2
    assert quality.main(["--datasets", "ml-100k", "--ml-holdout-shift", "-1"]) == 2
    # so does a refit, which changes how the test is scored (a search never scores it)
    assert quality.main(["--datasets", "yoochoose", "--no-ml-refit"]) == 2
    assert quality.main(["--datasets", "ml-100k", "--no-ml-refit", "--search", "dropout=0.1"]) == 2


def test_merging_a_run_of_some_models_keeps_the_others_of_the_same_protocol_and_summarizes_all():
    def scores(v: float) -> dict:
        return {m: v for m in quality.REPORTED}

    def run(protocol: str, measured: str, **models: float) -> dict:
        res = {name: {"valid": scores(v), "test": scores(v)} for name, v in models.items()}
        return {"dataset": "ml-100k", "protocol": protocol, "stats": {"users": 943}, "measured": measured,
                "models": res, "summary": quality.summarize(res)}

    old = run("refit", "10:00", popularity=0.05, item_knn=0.14, gru=0.13, **{"gpt2-clm": 0.16, "xlnet-clm": 0.12})
    fresh = run("refit", "11:00", popularity=0.05, item_knn=0.14, **{"xlnet-clm": 0.15})
    merged = quality.merge_dataset(old, fresh, ("xlnet-clm",))
    assert set(merged["models"]) == {"popularity", "item_knn", "gru", "gpt2-clm", "xlnet-clm"}
    assert merged["models"]["xlnet-clm"]["test"]["ndcg@20"] == 0.15  # the fresh run wins
    assert merged["models"]["gpt2-clm"]["measured"] == "10:00" and merged["merged_models"] == ["gpt2-clm", "gru"]
    assert merged["summary"]["best_transformer"] == "gpt2-clm" and merged["summary"]["beats_every_baseline"]
    # another protocol, or a run of every model, replaces the dataset whole
    assert quality.merge_dataset(run("plain", "09:00", gru=0.2), fresh, ("xlnet-clm",)) is fresh
    assert quality.merge_dataset(old, fresh, None) is fresh


def test_knn_self_similarity_is_chosen_on_validation(tmp_path):
    """Where validation sessions end by repeating their last item, the kNN that may recommend the
    session's own items wins on validation; on the ring (never a repeat) the classic one does."""
    data = _tiny_data(tmp_path)
    data.test = data.valid
    ring = quality.run_baselines(data)["item_knn"]
    assert ring["choice"]["self_similarity"] == 0.0 and ring["valid"]["ndcg@10"] > 0.9
    assert len(ring["validation_trials"]) == len(quality.KNN_DECAYS) * len(quality.KNN_SELF_SIMILARITIES)
    repeats = data.valid.sessions.clone()
    repeats[:, 6] = repeats[:, 5]  # ... x, x: the target repeats the last item
    data.valid = data.test = quality.EvalSet("valid", sessions=repeats)
    knn = quality.run_baselines(data)["item_knn"]
    assert knn["choice"]["self_similarity"] > 0.0 and knn["valid"]["ndcg@10"] == 1.0


def test_day_windows_train_the_chosen_model_with_every_hyperparameter(tmp_path, monkeypatch):
    """The windows' model is the one validation chose: its repeat bias and label smoothing too."""
    import pandas as pd

    from raytr.training import incremental

    seen = {}

    def fake_run_incremental(config, data_dir, out_dir, **kwargs):
        seen["model"], seen["kwargs"] = config.model, kwargs
        table = pd.DataFrame([{"day": 2, "model": "xlnet", **{m: 0.5 for m in quality.REPORTED}}])
        return incremental.IncrementalResult(table, table.drop(columns=["day"]), str(out_dir))

    monkeypatch.setattr(incremental, "run_incremental", fake_run_incremental)
    monkeypatch.setattr(quality, "yoochoose_prepared", lambda: tmp_path)
    hp = quality.Hyper(repeat_bias=True, label_smoothing=0.1, dropout=0.3)
    out = quality.run_yoochoose_incremental("xlnet", "clm", 2, tmp_path, {"recency_decay": 0.5,
                                                                         "self_similarity": 1.0}, hp)
    assert seen["model"].repeat_bias and seen["model"].label_smoothing == 0.1 and seen["model"].dropout == 0.3
    assert seen["kwargs"]["knn_self_similarity"] == 1.0 and out["hyperparameters"]["repeat_bias"] is True


@pytest.mark.ray
def test_yoochoose_chooses_on_the_day_after_its_training_days_and_refits_on_all_of_them(prepared_dir, monkeypatch,
                                                                                        tmp_path):
    """Validation is a later day than any the models train on (as the test is); the refit adds it."""
    from raytr.data.layout import day_paths

    monkeypatch.setattr(quality, "yoochoose_prepared", lambda: prepared_dir)
    monkeypatch.setattr(quality, "YOOCHOOSE_VALID_DAY", 3)  # the fixture's data has days 1-4
    monkeypatch.setattr(quality, "DATA_DIR", tmp_path)  # not the real sample's validation file
    data = quality.load_yoochoose()
    assert data.train_paths == day_paths(prepared_dir, [1, 2])
    assert data.valid.paths == [str(tmp_path / "yoochoose-valid" / "day=3-seen-items.parquet")]
    assert data.test.paths == day_paths(prepared_dir, [4])
    assert data.refit_paths == data.refit_baseline_paths == day_paths(prepared_dir, [1, 2, 3])
    assert not data.exclude_seen and "validation day 3 (its clicks on items days 1-2 lack dropped" in data.protocol


@pytest.mark.ray
def test_the_validation_day_keeps_only_items_of_earlier_days_as_a_test_file_does(prepared_dir, tmp_path):
    """Clicks on items no earlier day holds are dropped before the workflow runs again: the sessions
    without such clicks come out as prepared, the others shorter (or gone under 2 clicks)."""
    import pandas as pd

    from raytr.data.layout import day_paths

    def sessions(paths):
        return pd.concat([pd.read_parquet(p) for p in paths]).set_index("session_id").sort_index()

    earlier = {int(i) for row in sessions(day_paths(prepared_dir, [1, 2]))["item_id-list"] for i in row}
    prepared = sessions(day_paths(prepared_dir, [3]))
    path = quality.day_of_seen_items(prepared_dir, 3, tmp_path / "day3.parquet")
    filtered = sessions([path])
    written = os.stat(path).st_mtime_ns
    assert quality.day_of_seen_items(prepared_dir, 3, tmp_path / "day3.parquet") == path
    assert os.stat(path).st_mtime_ns == written  # kept while the prepared dataset is not newer
    os.utime(path, (0, 0))
    quality.day_of_seen_items(prepared_dir, 3, tmp_path / "day3.parquet")
    assert os.stat(path).st_mtime_ns > 0 and sessions([path]).equals(filtered)  # older: written again
    assert all(int(i) in earlier for row in filtered["item_id-list"] for i in row)
    assert (filtered["session_length"] >= 2).all() and set(filtered.index) <= set(prepared.index)
    whole = prepared["session_length"] == prepared["item_id-list"].map(len)  # no clicks cut off the front
    untouched = [s for s in prepared.index[whole] if all(int(i) in earlier for i in prepared.at[s, "item_id-list"])]
    changed = [s for s in filtered.index if s not in untouched]
    assert untouched and changed and len(filtered) < len(prepared)  # the fixture has new items on day 3
    pd.testing.assert_frame_equal(filtered.loc[untouched], prepared.loc[untouched])
    for s in changed:  # the kept clicks in their order; a cut session refilled from before its cut
        kept = [i for i in prepared.at[s, "item_id-list"] if int(i) in earlier]
        items = list(filtered.at[s, "item_id-list"])
        assert items == kept if whole[s] else items[len(items) - len(kept):] == kept


def test_the_search_table_marks_repeat_bias_trials_of_the_summed_form():
    from bench import report

    def trial(bias: bool, form: dict) -> dict:
        return {"model": "gru", "hyperparameters": asdict(replace(quality.Hyper(), repeat_bias=bias)),
                "valid": {"ndcg@20": 0.4}, "choice": {"epochs": 3}, "train_seconds": 1.0} | form

    search = {"dataset": "tiny", "grid": {"repeat_bias": [True, False]}, "base": asdict(quality.Hyper()),
              "chosen": {"gru": {"repeat_bias": True}}, "seconds": 60.0, "jobs": 1, "measured": "now",
              "trials": [trial(True, {}), trial(True, {"repeat_bias_form": quality.REPEAT_BIAS_FORM}),
                         trial(False, {})]}
    rows = [line for line in report.search_table("tiny", {"datasets": [search]}) if line.startswith("| gru")]
    assert ["summed over occurrences" in row for row in rows] == [True, False, False]
