"""The Trainer API with launcher="local": the training loop in this process, no Ray Train.

Every test trains a tiny GPT-2 (1 layer, d_model 32) on the shared prepared synthetic data of
conftest.py (4 days: 344/402/340/381 sessions). The module fixture `trained` runs one 3-epoch
training on days 1-3 evaluated on day 4; the tests below it read its outputs. The tests after it
train their own models for a few steps each.

Only the prepared data needs Ray (`raytr prepare` runs on Ray Data); training here never does.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from _tensorboard import scalars
from raytr import storage
from raytr.config import ConfigError, ModelConfig
from raytr.data.layout import day_paths
from raytr.data.loaders import DataLoader
from raytr.features import FIRST_ITEM_ID
from raytr.models import SessionModel
from raytr.training.arguments import TrainingArguments
from raytr.training.loop import TRAINER_STATE, TRAINING_STATE, TrainingDivergedError, read_trainer_state
from raytr.training.trainer import Predictions, Trainer, TrainOutput, _check_work_left

TOP_K = (5, 10, 20)
METRICS = ("precision", "recall", "ndcg", "map", "mrr")


def small_model_config() -> ModelConfig:
    return ModelConfig(body="gpt2", objective="clm", d_model=32, n_layers=1, n_heads=2, categorical_dim=8)


def local_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), launcher="local", num_train_epochs=1, per_device_train_batch_size=64,
                  learning_rate=5e-3, lr_scheduler_type="linear", disable_tqdm=True, logging_steps=1,
                  data_loader_engine="pyarrow", metrics_top_k=TOP_K, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def steps_per_epoch(spec, paths: list[str], batch_size: int) -> int:
    return len(DataLoader(spec, paths, batch_size, shuffle=False, engine="pyarrow"))


def training_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / TRAINING_STATE, map_location="cpu", weights_only=True)


def optimizer_steps(checkpoint: str | Path) -> set[int]:
    """AdamW's per-parameter step counters in a checkpoint (one value when all params trained)."""
    return {int(s["step"]) for s in training_state(checkpoint)["optimizer"]["state"].values()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def first_batch(spec, paths: list[str], batch_size: int = 64):
    return next(iter(DataLoader(spec, paths, batch_size, shuffle=False, engine="pyarrow")))


# --------------------------------------------------------------------------- one shared training
EPOCHS = 3
EACH_N = 5  # compute_metrics_each_n_steps


@dataclass
class Trained:
    trainer: Trainer
    output: TrainOutput
    before: dict[str, float]  # eval metrics of the untrained model
    out_dir: Path
    steps_per_epoch: int
    eval_paths: list[str]


@pytest.fixture(scope="module")
def trained(prepared_dir, prepared_spec, tmp_path_factory) -> Trained:
    """3 epochs on days 1-3 with the default merlin reader, eval on day 4, best 2 checkpoints kept."""
    out_dir = tmp_path_factory.mktemp("trainer") / "out"
    train_paths, eval_paths = day_paths(prepared_dir, [1, 2, 3]), day_paths(prepared_dir, [4])
    torch.manual_seed(0)
    model = SessionModel(prepared_spec, small_model_config(), seed=0)
    args = local_args(out_dir, num_train_epochs=EPOCHS, save_total_limit=2, compute_metrics_each_n_steps=EACH_N,
                      data_loader_engine="merlin")
    trainer = Trainer(model, args, train_dataset_or_path=train_paths, eval_dataset_or_path=eval_paths)
    before = trainer.evaluate()
    output = trainer.train()
    return Trained(trainer, output, before, out_dir, steps_per_epoch(prepared_spec, train_paths, 64), eval_paths)


@pytest.mark.slow
def test_train_writes_model_result_and_reloadable_weights(trained: Trained, prepared_spec):
    out, output = trained.out_dir, trained.output
    assert isinstance(output, TrainOutput)
    assert Path(output.model_dir) == out / "model"
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    total = trained.steps_per_epoch * EPOCHS
    assert output.metrics["step"] == total and output.metrics["epoch"] == EPOCHS
    assert trained.trainer.state["global_step"] == total

    result = json.loads((out / "train_result.json").read_text())
    assert result["run_name"] == output.run_name
    assert result["metrics"] == output.metrics
    assert result["model_dir"] == output.model_dir and result["checkpoint"] == output.checkpoint
    assert result["training_arguments"]["num_train_epochs"] == EPOCHS
    assert result["feature_spec"] == prepared_spec.to_dict()

    # The saved model scores exactly like the trainer's in-memory model.
    batch = first_batch(prepared_spec, trained.eval_paths)
    reloaded = SessionModel.load(output.model_dir)
    model = trained.trainer.model.eval()
    torch.testing.assert_close(reloaded.score_next(batch), model.score_next(batch), rtol=0, atol=0)


@pytest.mark.slow
def test_checkpoints_keep_save_total_limit_latest_and_best(trained: Trained):
    run_dir = trained.out_dir / "runs" / trained.output.run_name
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    # save_total_limit=2 of 3 epochs: the latest, and the better of the first two by eval ndcg@10
    # (as TensorBoard recorded it at each epoch's end; a tie keeps the more recent).
    spe = trained.steps_per_epoch
    ndcg = dict(scalars(trained.out_dir / "tensorboard" / trained.output.run_name, "train/eval_ndcg@10"))
    better = max((1, 2), key=lambda epoch: (ndcg[epoch * spe], epoch))
    assert [c.name for c in checkpoints] == [f"checkpoint-{better * spe:08d}", f"checkpoint-{EPOCHS * spe:08d}"]
    latest = checkpoints[-1]
    assert str(latest) == trained.output.checkpoint
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert {"model.safetensors", "config.json", TRAINING_STATE, TRAINER_STATE} <= names
    state = read_trainer_state(latest)
    assert state["epoch"] == EPOCHS - 1
    assert state["global_step"] == trained.steps_per_epoch * EPOCHS
    assert training_state(latest)["scheduler"]["last_epoch"] == state["global_step"]

    # The best checkpoint is one that was kept, with the highest eval ndcg@10 among them.
    assert trained.output.best_checkpoint in {str(c) for c in checkpoints}
    scores = {str(c): read_trainer_state(c)["metrics"]["eval_ndcg@10"] for c in checkpoints}
    assert scores[trained.output.best_checkpoint] == max(scores.values())


@pytest.mark.slow
def test_tensorboard_logs_loss_eval_lr_and_step_metrics(trained: Trained):
    event_dir = trained.out_dir / "tensorboard" / trained.output.run_name
    spe, total = trained.steps_per_epoch, trained.steps_per_epoch * EPOCHS
    epoch_ends = [spe * (e + 1) for e in range(EPOCHS)]
    assert [s for s, _ in scalars(event_dir, "train/loss")] == epoch_ends
    assert [s for s, _ in scalars(event_dir, "train/eval_ndcg@10")] == epoch_ends
    # compute_metrics_each_n_steps: ranking metrics of the training batch every EACH_N steps.
    step_metrics = scalars(event_dir, "train/ndcg@10")
    assert [s for s, _ in step_metrics] == list(range(EACH_N, total + 1, EACH_N))
    assert all(0.0 <= v <= 1.0 for _, v in step_metrics)
    # logging_steps=1: the LR after every step, linear decay to 0 over the run.
    lrs = scalars(event_dir, "train/learning_rate")
    assert [s for s, _ in lrs] == list(range(1, total + 1))
    lr0 = trained.trainer.args.learning_rate
    np.testing.assert_allclose([v for _, v in lrs], [lr0 * (total - s) / total for s, _ in lrs], rtol=1e-5, atol=1e-9)
    losses = [v for _, v in scalars(event_dir, "train/loss")]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_eval_steps_evaluate_inside_the_epoch_too(prepared_dir, prepared_spec, tmp_path):
    every = 4
    args = local_args(tmp_path / "out", eval_steps=every, per_device_train_batch_size=32)
    train_paths = day_paths(prepared_dir, [1])
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), args,
                      train_dataset_or_path=train_paths, eval_dataset_or_path=day_paths(prepared_dir, [4]))
    output = trainer.train()
    spe = steps_per_epoch(prepared_spec, train_paths, 32)
    assert spe > every
    logged = scalars(tmp_path / "out" / "tensorboard" / output.run_name, "train/eval_ndcg@10")
    assert [step for step, _ in logged] == [*range(every, spe, every), spe]
    assert len({value for _, value in logged}) > 1  # evaluations of different weights


def test_train_prepared_warns_of_days_both_trained_and_evaluated_on(prepared_dir, tmp_path, monkeypatch, caplog):
    import raytr.bundle
    from raytr.config import load_config
    from raytr.training.trainer import train_prepared

    monkeypatch.setattr(Trainer, "train", lambda self: None)  # the split is all this test is about
    monkeypatch.setattr(raytr.bundle, "attach_preprocessing", lambda *a: None)
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml",
                         {"training": {"output_dir": str(tmp_path)}})
    with caplog.at_level("WARNING", logger="raytr.training.trainer"):
        train_prepared(config, prepared_dir, train_days=[1, 2, 3], eval_days=[4])
    assert not caplog.records
    with caplog.at_level("WARNING", logger="raytr.training.trainer"):
        train_prepared(config, prepared_dir, train_days=[2, 3], eval_days=[3, 4])
    assert "days [3] are both trained and evaluated on" in caplog.text


@pytest.mark.slow
def test_training_improves_eval_metrics_over_the_untrained_model(trained: Trained):
    after = trained.trainer.evaluate()
    before = trained.before
    # Seeded run on the synthetic data: untrained ndcg@10 ~0.03, trained ~0.36 (recall@20 ~0.70).
    assert before["eval_ndcg@10"] < 0.1, before
    assert after["eval_ndcg@10"] > 0.25, after
    assert after["eval_recall@20"] > 0.5, after
    assert trained.output.metrics["loss"] < math.log(trained.trainer.model.spec.item_cardinality)


@pytest.mark.slow
def test_evaluate_keys_prefix_and_agreement_with_training_metrics(trained: Trained, prepared_dir):
    metrics = trained.trainer.evaluate(metric_key_prefix="eval")
    assert set(metrics) == {f"eval_{m}@{k}" for m in METRICS for k in TOP_K}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # The loop evaluated the same final weights on the same day at the end of the last epoch.
    for key, value in metrics.items():
        assert value == pytest.approx(trained.output.metrics[key], abs=1e-9), key
    other = trained.trainer.evaluate(day_paths(prepared_dir, [3]), metric_key_prefix="test")
    assert set(other) == {f"test_{m}@{k}" for m in METRICS for k in TOP_K}
    assert other["test_ndcg@10"] != metrics["eval_ndcg@10"]


@pytest.mark.slow
def test_predict_shapes_order_and_targets(trained: Trained):
    trainer = trained.trainer
    preds = trainer.predict()
    assert isinstance(preds, Predictions)
    expected_targets = np.concatenate([
        [row[-1] for row in pq.read_table(p, columns=["item_id-list"]).column(0).to_pylist()]
        for p in trained.eval_paths])
    n, k = len(expected_targets), trainer.args.predict_top_k
    assert preds.item_ids.shape == (n, k) and preds.scores.shape == (n, k) and preds.targets.shape == (n,)
    np.testing.assert_array_equal(preds.targets, expected_targets)  # the last item of each session, in order
    assert (np.diff(preds.scores, axis=1) <= 0).all()  # best first
    assert preds.item_ids.min() >= FIRST_ITEM_ID  # never padding, null or out-of-vocabulary
    assert all(len(set(row)) == k for row in preds.item_ids.tolist())
    # Hits in the top 20 agree with the evaluation (same tie rule).
    recall20 = float((preds.item_ids[:, :20] == preds.targets[:, None]).any(axis=1).mean())
    assert recall20 == pytest.approx(trainer.evaluate()["eval_recall@20"], abs=1e-12)

    top5 = trainer.predict(k=5)
    assert top5.item_ids.shape == (n, 5)
    np.testing.assert_array_equal(top5.item_ids, preds.item_ids[:, :5])


@pytest.mark.slow
def test_without_eval_data_the_most_recent_checkpoints_are_kept(prepared_dir, prepared_spec, tmp_path):
    paths = day_paths(prepared_dir, [1])
    spe = steps_per_epoch(prepared_spec, paths, 64)
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                      local_args(tmp_path, num_train_epochs=3, save_total_limit=2), train_dataset_or_path=paths)
    output = trainer.train()
    kept = sorted(p.name for p in (tmp_path / "runs" / output.run_name / "checkpoints").iterdir())
    assert kept == [f"checkpoint-{2 * spe:08d}", f"checkpoint-{3 * spe:08d}"]
    assert output.best_checkpoint is None and "eval_ndcg@10" not in output.metrics


# --------------------------------------------------------------------------- continued training
@pytest.mark.slow
def test_train_again_continues_weights_optimizer_and_lr_schedule(prepared_dir, prepared_spec, tmp_path):
    """Three train() calls on one Trainer, the incremental recipe:
    1. day 1, a linear schedule that decays to 0;
    2. day 3 via the T4Rec alias, two steps at twice the LR, no reset: one schedule over both calls,
       its end moved out by the two steps (not a finished one at LR 0 all run); the optimizer and
       scheduler counters go on;
    3. reset_lr_scheduler(), day 2 via `train_dataset`: a fresh schedule from the initial LR."""
    bs, lr0 = 32, 5e-3
    args = local_args(tmp_path / "out", per_device_train_batch_size=bs, learning_rate=lr0)
    torch.manual_seed(0)
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), args,
                      train_dataset_or_path=day_paths(prepared_dir, [1]))
    steps1 = steps_per_epoch(prepared_spec, day_paths(prepared_dir, [1]), bs)
    steps2 = steps_per_epoch(prepared_spec, day_paths(prepared_dir, [2]), bs)
    assert steps1 != steps2  # so that the step counts below show which day was trained on

    out1 = trainer.train()
    after1 = clone_state(trainer.model)
    assert training_state(out1.checkpoint)["scheduler"]["last_epoch"] == steps1
    assert training_state(out1.checkpoint)["scheduler"]["_last_lr"] == [0.0, 0.0]

    # 2. Continue without reset.
    trainer.train_dataset_or_path = day_paths(prepared_dir, [3])
    assert trainer.train_dataset == day_paths(prepared_dir, [3])
    trainer.args = replace(args, max_steps=2, learning_rate=2 * lr0)
    out2 = trainer.train()
    assert out2.run_name != out1.run_name
    init2 = SessionModel.load(tmp_path / "out" / "runs" / out2.run_name / "init")
    assert same_weights(clone_state(init2), after1), "the second run did not start from the current weights"
    assert training_state(out2.checkpoint)["scheduler"]["last_epoch"] == steps1 + 2
    assert optimizer_steps(out2.checkpoint) == {steps1 + 2}  # Adam moments carried over
    assert not same_weights(clone_state(trainer.model), after1), "the continued schedule trained at LR 0"
    lrs2 = scalars(tmp_path / "out" / "tensorboard" / out2.run_name, "train/learning_rate")
    # The LR after each step (its steps took 2 / (steps1 + 2) and 1 / (steps1 + 2) of this run's LR).
    assert lrs2[0] == (1, pytest.approx(2 * lr0 / (steps1 + 2), rel=1e-5)) and lrs2[1] == (2, 0.0)
    after2 = clone_state(trainer.model)

    # 2b. Resuming call 2's checkpoint in a new Trainer (max_steps raised to 4) goes on on the one
    # schedule over both calls, its end now at steps1 + 4 (over 4 steps alone it would be at LR 0).
    resumed = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                      replace(args, output_dir=str(tmp_path / "resumed"), max_steps=4, learning_rate=2 * lr0,
                              resume_from_checkpoint=out2.checkpoint),
                      train_dataset_or_path=day_paths(prepared_dir, [3]))
    out2b = resumed.train()
    assert training_state(out2b.checkpoint)["scheduler"]["last_epoch"] == steps1 + 4
    lrs2b = scalars(tmp_path / "resumed" / "tensorboard" / out2b.run_name, "train/learning_rate")
    assert lrs2b[0] == (3, pytest.approx(2 * lr0 / (steps1 + 4), rel=1e-5)) and lrs2b[1] == (4, 0.0)
    assert not same_weights(clone_state(resumed.model), after2), "the resumed schedule trained at LR 0"

    # 3. Reset: a fresh schedule over this run's steps, optimizer moments kept.
    trainer.reset_lr_scheduler()
    trainer.train_dataset = day_paths(prepared_dir, [2])
    trainer.args = args
    out3 = trainer.train()
    assert training_state(out3.checkpoint)["scheduler"]["last_epoch"] == steps2
    assert optimizer_steps(out3.checkpoint) == {steps1 + 2 + steps2}
    assert read_trainer_state(Path(out3.checkpoint))["global_step"] == steps2
    lrs3 = scalars(tmp_path / "out" / "tensorboard" / out3.run_name, "train/learning_rate")
    assert lrs3[0][0] == 1
    assert lrs3[0][1] == pytest.approx(lr0 * (steps2 - 1) / steps2, rel=1e-5)  # restarted from lr0
    assert not same_weights(clone_state(trainer.model), after2)


@pytest.mark.slow
def test_stop_after_epoch_ends_the_run_on_the_full_schedules_trajectory(prepared_dir, prepared_spec, tmp_path):
    """A 3-epoch schedule stopped after epoch 2 ends exactly where the full run was after epoch 2
    (same weights, optimizer and LR, not decayed to 0), and trains no third epoch."""
    paths = day_paths(prepared_dir, [1])
    spe = steps_per_epoch(prepared_spec, paths, 64)

    def run(name: str, **overrides):
        args = local_args(tmp_path / name, num_train_epochs=3, save_total_limit=3, **overrides)
        return Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), args,
                       train_dataset_or_path=paths).train()

    full, stopped = run("full"), run("stopped", stop_after_epoch=2)
    full_epoch2 = next(c for c in Path(full.checkpoint).parent.glob("checkpoint-*")
                       if read_trainer_state(c)["epoch"] == 1)
    assert read_trainer_state(stopped.checkpoint)["epoch"] == 1
    assert read_trainer_state(stopped.checkpoint)["global_step"] == 2 * spe
    assert len(list(Path(stopped.checkpoint).parent.glob("checkpoint-*"))) == 2
    assert same_weights(clone_state(SessionModel.load(stopped.checkpoint)), clone_state(SessionModel.load(full_epoch2)))
    lr = training_state(stopped.checkpoint)["scheduler"]["_last_lr"][0]
    assert lr == pytest.approx(5e-3 * spe / (3 * spe))  # a third of the 3-epoch schedule left
    assert lr == training_state(full_epoch2)["scheduler"]["_last_lr"][0]

    with pytest.raises(ConfigError, match="training.stop_after_epoch=4"):
        local_args(tmp_path / "bad", num_train_epochs=3, stop_after_epoch=4)
    # Resuming the stopped run: nothing is left before its stop, two epochs of the schedule after it.
    state = read_trainer_state(stopped.checkpoint)
    with pytest.raises(ValueError, match="stop_after_epoch=2 leaves nothing to train"):
        _check_work_left(state, local_args(tmp_path, num_train_epochs=3, stop_after_epoch=2), stopped.checkpoint)
    _check_work_left(state, local_args(tmp_path, num_train_epochs=3), stopped.checkpoint)


@pytest.mark.slow
def test_triton_loss_kernel_takes_the_torch_kernels_steps(prepared_dir, prepared_spec, tmp_path, monkeypatch):
    """training.loss_kernel='triton' (interpreted on the CPU here, conftest.py) trains as 'torch' does:
    after three steps the weights agree, and they moved."""
    from raytr.models import triton_loss

    paths = day_paths(prepared_dir, [1])
    untrained = clone_state(SessionModel(prepared_spec, small_model_config(), seed=0))
    calls = []
    kernel = triton_loss.cross_entropy_rows_
    monkeypatch.setattr(triton_loss, "cross_entropy_rows_", lambda *a, **k: calls.append(1) or kernel(*a, **k))

    def train(loss_kernel: str) -> dict[str, torch.Tensor]:
        args = local_args(tmp_path / loss_kernel, max_steps=3, loss_kernel=loss_kernel, save_total_limit=1)
        trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), args, train_dataset_or_path=paths)
        trainer.train()
        return clone_state(trainer.model)

    with_torch = train("torch")
    assert not calls
    with_triton = train("triton")
    assert len(calls) >= 3  # a chunk or more per step
    assert not same_weights(with_triton, untrained)
    for name, value in with_torch.items():
        # Adam turns the kernels' last-bit differences in near-zero gradients into steps of up to ~3e-6
        # (of 1.5e-2, three steps at LR 5e-3); a wrong gradient moves weights by ~1e-3.
        assert torch.allclose(with_triton[name], value, rtol=0, atol=1e-5), name


@pytest.mark.slow
def test_resume_from_checkpoint_is_for_the_first_train_call_only(prepared_dir, prepared_spec, tmp_path):
    """A Trainer built with resume_from_checkpoint continues that run once; its next train() call
    continues from the weights it has, with a run of its own (a set run_name gets a number)."""
    paths = day_paths(prepared_dir, [1])
    spe = steps_per_epoch(prepared_spec, paths, 64)
    first = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                    local_args(tmp_path / "a", num_train_epochs=2, save_total_limit=2), train_dataset_or_path=paths)
    epoch1 = tmp_path / "a" / "runs" / first.train().run_name / "checkpoints" / f"checkpoint-{spe:08d}"

    args = local_args(tmp_path / "b", num_train_epochs=2, resume_from_checkpoint=str(epoch1), run_name="window")
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=1), args, train_dataset_or_path=paths)
    out1 = trainer.train()
    assert out1.run_name == "window" and trainer.state["global_step"] == 2 * spe  # one epoch left, resumed
    after1 = clone_state(trainer.model)
    trainer.train_dataset = day_paths(prepared_dir, [2])
    out2 = trainer.train()
    assert out2.run_name == "window-2"
    init2 = SessionModel.load(tmp_path / "b" / "runs" / out2.run_name / "init")
    assert same_weights(clone_state(init2), after1)
    assert trainer.state["global_step"] == 2 * steps_per_epoch(prepared_spec, day_paths(prepared_dir, [2]), 64)
    assert not same_weights(clone_state(trainer.model), after1)  # it trained, rather than reload the checkpoint

    finished = Path(out1.checkpoint)  # the end of epoch 2 of 2
    done = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                   replace(args, resume_from_checkpoint=str(finished)), train_dataset_or_path=paths)
    with pytest.raises(ValueError, match=r"resume_from_checkpoint .* finished epoch 2 of "
                                         r"training.num_train_epochs=2: nothing is left to train"):
        done.train()


@pytest.mark.slow
def test_resume_after_max_steps_goes_on_inside_the_epoch_it_cut_short(prepared_dir, prepared_spec, tmp_path):
    """Stopped by max_steps 2 steps into epoch 2, resumed with a larger max_steps: the rest of epoch 2
    is trained (not skipped for epoch 3), so the run ends at its max_steps."""
    paths = day_paths(prepared_dir, [1])
    spe = steps_per_epoch(prepared_spec, paths, 64)
    first = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                    local_args(tmp_path / "a", max_steps=spe + 2), train_dataset_or_path=paths)
    cut = Path(first.train().checkpoint)
    assert read_trainer_state(cut)["epoch"] == 1 and read_trainer_state(cut)["steps_into_epoch"] == 2
    resumed = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                      local_args(tmp_path / "b", max_steps=2 * spe, resume_from_checkpoint=str(cut)),
                      train_dataset_or_path=paths)
    out = resumed.train()
    state = read_trainer_state(Path(out.checkpoint))
    assert state["global_step"] == 2 * spe and state["epoch"] == 1 and state["steps_into_epoch"] == 0
    assert optimizer_steps(out.checkpoint) == {2 * spe}
    # Epoch-based: the cut epoch is not finished, so num_train_epochs=2 leaves its rest to train.
    again = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                    local_args(tmp_path / "c", num_train_epochs=2, resume_from_checkpoint=str(cut)),
                    train_dataset_or_path=paths)
    assert again.train() is not None and again.state["global_step"] == 2 * spe


@pytest.mark.slow
def test_reset_with_warmup_starts_the_next_run_at_lr_zero(prepared_dir, prepared_spec, tmp_path):
    """With reset_lr_scheduler() and a warmup schedule the first step of the next run has LR 0:
    the optimizer state loaded from the previous run must not bring the full LR back."""
    # A constant first run: its saved optimizer LR is the full one, which must not win.
    args = local_args(tmp_path / "out", max_steps=2, lr_scheduler_type="constant")
    torch.manual_seed(0)
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), args,
                      train_dataset_or_path=day_paths(prepared_dir, [1]))
    trainer.train()
    before = clone_state(trainer.model)
    trainer.reset_lr_scheduler()
    trainer.args = replace(args, lr_scheduler_type="constant_with_warmup", warmup_steps=5, max_steps=1)
    out = trainer.train()
    assert trainer.state["global_step"] == 1 and optimizer_steps(out.checkpoint) == {3}  # it did take a step
    assert same_weights(clone_state(trainer.model), before)


@pytest.mark.slow
def test_train_and_eval_dataloader_arguments(prepared_dir, prepared_spec, tmp_path):
    train_loader = DataLoader(prepared_spec, day_paths(prepared_dir, [1]), 64, shuffle=True, engine="pyarrow", seed=1)
    eval_loader = DataLoader(prepared_spec, day_paths(prepared_dir, [4]), 256, shuffle=False, engine="pyarrow")
    args = local_args(tmp_path / "a", num_train_epochs=2)
    torch.manual_seed(0)
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), args,
                      train_dataloader=train_loader, eval_dataloader=eval_loader)
    output = trainer.train()
    assert trainer.state["global_step"] == 2 * len(train_loader)
    assert read_trainer_state(Path(output.checkpoint))["epoch"] == 1
    metrics = trainer.evaluate()  # from eval_dataloader
    assert set(metrics) == {f"eval_{m}@{k}" for m in METRICS for k in TOP_K}
    by_path = trainer.evaluate(day_paths(prepared_dir, [4]))
    assert metrics == pytest.approx(by_path, abs=1e-12)

    # Any sized iterable of SessionBatch works, e.g. a list (no set_epoch).
    batches = list(DataLoader(prepared_spec, day_paths(prepared_dir, [2]), 64, shuffle=False, engine="pyarrow"))
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), local_args(tmp_path / "b"),
                      train_dataloader=batches)
    trainer.train()
    assert trainer.state["global_step"] == len(batches)


# --------------------------------------------------------------------------- failures
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "url"])
def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(prepared_dir, prepared_spec, tmp_path, monkeypatch,
                                                            where):
    """Also with the output at a URL (fsspec's in-memory store): the checkpoint and the TensorBoard
    curves up to the failure are there, and no local copy is left behind."""
    paths = day_paths(prepared_dir, [1])
    spe = steps_per_epoch(prepared_spec, paths, 64)
    original = SessionModel.forward
    calls = {"n": 0}

    def forward_nan_in_second_epoch(self, batch, generator=None):
        out = original(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == spe + 2:  # the second step of epoch 1
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SessionModel, "forward", forward_nan_in_second_epoch)
    out_dir = str(tmp_path / "out") if where == "local" else f"memory://raytr-nan-{uuid.uuid4().hex[:8]}/out"
    scratch = set(Path(tempfile.gettempdir()).glob("raytr-tensorboard-*"))
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                      local_args(out_dir, num_train_epochs=3), train_dataset_or_path=paths)
    with pytest.raises(TrainingDivergedError, match=rf"loss is nan at epoch 1, step {spe + 1}") as info:
        trainer.train()
    assert "learning_rate" in str(info.value) and "checkpoint is kept" in str(info.value)
    checkpoints = storage.list_files(storage.join(out_dir, "runs"), suffixes=("trainer_state.json",))
    assert len(checkpoints) == 1 and "/checkpoints/checkpoint-" in checkpoints[0]
    checkpoint = storage.parent(checkpoints[0])
    state = read_trainer_state(checkpoint)
    assert state["epoch"] == 0 and state["global_step"] == spe
    SessionModel.load(checkpoint)  # loadable
    assert not storage.exists(storage.join(out_dir, "model"))  # no final model from a diverged run
    assert any("tfevents" in f for f in storage.list_files(storage.join(out_dir, "tensorboard"), suffixes=("",)))
    assert set(Path(tempfile.gettempdir()).glob("raytr-tensorboard-*")) == scratch


def _write_empty_and_one_event_sessions(src: str, directory: Path) -> tuple[Path, Path]:
    table = pq.read_table(src)
    empty, short = directory / "empty.parquet", directory / "short.parquet"
    pq.write_table(table.slice(0, 0), empty)
    lists = [name for name in table.column_names if pa.types.is_list(table.schema.field(name).type)]
    for name in lists:
        table = table.set_column(table.schema.get_field_index(name), name, pc.list_slice(table.column(name), 0, 1))
    pq.write_table(table, short)
    return empty, short


def test_empty_eval_data_raises_value_error(prepared_dir, prepared_spec, tmp_path):
    empty, short = _write_empty_and_one_event_sessions(day_paths(prepared_dir, [4])[0], tmp_path)
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), local_args(tmp_path / "out"),
                      train_dataset_or_path=day_paths(prepared_dir, [1]), eval_dataset_or_path=str(empty))
    with pytest.raises(ValueError, match="0 sessions"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="fewer than 2 events"):
        trainer.evaluate(str(short))
    with pytest.raises(ValueError, match="no evaluation data"):
        Trainer(trainer.model, trainer.args).evaluate()
    with pytest.raises(ValueError, match=r"evaluation data .* has 0 sessions"):
        trainer.train()  # checked before any training step (the loader's own check names no evaluation data)


def test_data_without_the_models_columns_is_refused_naming_file_and_column(prepared_dir, prepared_spec, tmp_path):
    """train(), evaluate() and predict() read the files' footers first: no stack trace from a loader."""
    column = prepared_spec.item_id
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(pq.read_table(day_paths(prepared_dir, [4])[0]).drop([column]), lacking)
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), local_args(tmp_path / "out"),
                      train_dataset_or_path=str(lacking), eval_dataset_or_path=day_paths(prepared_dir, [4]))
    message = f"{lacking} has no column {column!r}, which the model reads"
    for call in (trainer.train, lambda: trainer.evaluate(str(lacking)), lambda: trainer.predict(str(lacking))):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_train_without_data_raises(prepared_spec, tmp_path):
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), local_args(tmp_path))
    with pytest.raises(ValueError, match="train_dataset_or_path"):
        trainer.train()
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        Trainer(trainer.model, trainer.args, train_dataset_or_path=tmp_path).train()


def test_train_refuses_an_output_dir_holding_other_data_before_writing(prepared_dir, prepared_spec, tmp_path):
    """Trainer.train() replaced <output_dir>/model/ of any directory; now only an earlier training
    output's (train_result.json or runs/<run>/init/config.json), and never one holding its data."""
    theirs = tmp_path / "theirs"
    (theirs / "model").mkdir(parents=True)
    (theirs / "model" / "config.json").write_text("{}")
    model = SessionModel(prepared_spec, small_model_config(), seed=0)
    trainer = Trainer(model, local_args(theirs, max_steps=1), train_dataset_or_path=day_paths(prepared_dir, [1]))
    with pytest.raises(ValueError, match=r"is a directory with other contents \(no train_result.json or runs"):
        trainer.train()
    assert sorted(p.name for p in theirs.rglob("*")) == ["config.json", "model"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "part.parquet").write_bytes(Path(day_paths(prepared_dir, [1])[0]).read_bytes())
    with pytest.raises(ValueError, match=r"holds the input"):
        Trainer(model, local_args(data, max_steps=1), train_dataset_or_path=str(data)).train()
    assert [p.name for p in data.iterdir()] == ["part.parquet"]


def test_fp16_without_use_gpu_is_a_config_error(tmp_path):
    """Refused when the config is read, on any machine (it had failed inside the training loop,
    after the run's directories were written)."""
    from raytr.config import ConfigError

    with pytest.raises(ConfigError, match=r"^training\.fp16=true needs a GPU"):
        local_args(tmp_path, fp16=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for a machine without a CUDA GPU")
def test_use_gpu_without_a_gpu_is_refused_before_anything_is_written(prepared_dir, prepared_spec, tmp_path):
    trainer = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0), local_args(tmp_path, use_gpu=True),
                      train_dataset_or_path=day_paths(prepared_dir, [1]))
    with pytest.raises(ValueError, match=r"^training\.use_gpu is true but no CUDA GPU is visible"):
        trainer.train()
    assert not (tmp_path / "runs").exists()


def test_model_cardinality_smaller_than_the_data_names_the_column(prepared_dir, prepared_spec, tmp_path):
    small_spec = replace(prepared_spec, item_cardinality=50)
    trainer = Trainer(SessionModel(small_spec, small_model_config(), seed=0), local_args(tmp_path),
                      train_dataset_or_path=day_paths(prepared_dir, [1]),
                      eval_dataset_or_path=day_paths(prepared_dir, [4]))
    with pytest.raises(ValueError, match=r"column 'item_id-list' has id \d+ .* cardinality is 50"):
        trainer.train()
    with pytest.raises(ValueError, match="item_id-list"):
        trainer.evaluate()


def test_cut_offs_above_the_catalog_are_refused_naming_them(prepared_spec, tmp_path):
    """metrics@k with k above the items a ranking can hold would count every session a hit."""
    from raytr.config import ConfigError
    from raytr.features import FIRST_ITEM_ID

    tiny = replace(prepared_spec, item_cardinality=FIRST_ITEM_ID + 15)
    model = SessionModel(tiny, small_model_config(), seed=0)
    def args(top_k: tuple[int, ...], predict: int) -> TrainingArguments:
        return local_args(tmp_path, metrics_top_k=top_k, metric_for_best_model="ndcg@5", predict_top_k=predict)

    with pytest.raises(ConfigError, match=r"metrics_top_k=\[5, 20\], predict_top_k=10: \[20\] above the model's "
                                          r"catalog of 15 items"):
        Trainer(model, args((5, 20), 10))
    with pytest.raises(ConfigError, match=r"predict_top_k=16: \[16\] above the model's catalog of 15 items"):
        Trainer(model, args((5, 15), 16))
    Trainer(model, args((5, 15), 15))  # at the catalog size: fine


def test_cuda_graph_modes_mark_every_step_on_cuda_only():
    """Under CUDA graphs each forward must declare the previous step's graph outputs dead; on the CPU,
    or compiled without graphs, the loop calls nothing (tests/test_gpu.py trains with the mode)."""
    from raytr.training.loop import _step_marker

    marker = torch.compiler.cudagraph_mark_step_begin
    for mode in ("reduce-overhead", "max-autotune"):
        assert _step_marker(TrainingArguments(torch_compile_mode=mode), torch.device("cuda")) is marker
    for args, device in [(TrainingArguments(torch_compile_mode="reduce-overhead"), "cpu"),
                         (TrainingArguments(torch_compile=True), "cuda"),
                         (TrainingArguments(torch_compile_mode="max-autotune-no-cudagraphs"), "cuda")]:
        assert _step_marker(args, torch.device(device)) is not marker, (args.torch_compile_mode, device)


def test_loss_kernel_auto_takes_triton_on_cuda_only(prepared_spec, monkeypatch, caplog):
    """'auto' (the default) swaps the Triton kernel in on a GPU and keeps the torch one elsewhere;
    without the triton package it keeps the torch kernel with a warning, where 'triton' is an error
    naming the field. Building the kernel touches no GPU, so the CUDA device is named, not used."""
    import sys

    from raytr.models.head import EAGER_KERNEL
    from raytr.training.loop import _use_loss_kernel

    def kernel_after(choice: str, device: str):
        model = SessionModel(prepared_spec, small_model_config(), seed=0)
        _use_loss_kernel(model, choice, torch.device(device))
        return model.head.kernel

    assert TrainingArguments().loss_kernel == "auto"
    assert kernel_after("auto", "cpu") is EAGER_KERNEL  # even under the interpreter conftest.py turns on
    assert kernel_after("torch", "cuda") is EAGER_KERNEL
    assert kernel_after("auto", "cuda").buffers == kernel_after("triton", "cuda").buffers == "in_place"

    # As if triton were not installed: the module cannot be imported, nor found on its package.
    monkeypatch.setitem(sys.modules, "raytr.models.triton_loss", None)
    monkeypatch.delattr("raytr.models.triton_loss", raising=False)
    with caplog.at_level("WARNING", logger="raytr.training.loop"):
        assert kernel_after("auto", "cuda") is EAGER_KERNEL
    assert "training.loss_kernel='auto' keeps the torch loss kernel" in caplog.text
    with pytest.raises(ValueError, match="training.loss_kernel='triton': .*needs the triton package"):
        kernel_after("triton", "cuda")


def test_resuming_a_run_of_another_epoch_length_is_refused_and_a_limit_of_one_names_no_best(prepared_dir,
                                                                                            prepared_spec, tmp_path):
    """A checkpoint of 64-session batches resumed with batches of 32 (as with another num_workers):
    its step count would end the run inside its last epoch; refused naming the settings. With
    save_total_limit 1 only the latest checkpoint is kept, so none is called the best."""
    paths, evals = day_paths(prepared_dir, [1]), day_paths(prepared_dir, [2])
    first = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                    local_args(tmp_path / "a", num_train_epochs=2, save_total_limit=1),
                    train_dataset_or_path=paths, eval_dataset_or_path=evals)
    out = first.train()
    assert out.best_checkpoint is None and "eval_ndcg@10" in out.metrics
    assert [c.name for c in (tmp_path / "a" / "runs" / out.run_name / "checkpoints").iterdir()] == [
        Path(out.checkpoint).name]
    spe = steps_per_epoch(prepared_spec, paths, 64)
    assert read_trainer_state(out.checkpoint)["steps_per_epoch"] == spe
    resumed = Trainer(SessionModel(prepared_spec, small_model_config(), seed=0),
                      local_args(tmp_path / "b", num_train_epochs=3, per_device_train_batch_size=32,
                                 resume_from_checkpoint=out.checkpoint), train_dataset_or_path=paths)
    with pytest.raises(ValueError, match=rf"was written by a run of {spe} steps an epoch, and this one takes "
                                         rf"{steps_per_epoch(prepared_spec, paths, 32)} \(another training.num_workers"):
        resumed.train()
