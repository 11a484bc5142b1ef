"""What a run's optimizer and learning-rate schedule do across resumes, later train() calls and
skipped fp16 steps; which parameters weight decay reaches; random streams on resume.

Each test trains a tiny GPT-2 on day 1 of the shared prepared data (conftest.py) with the local
launcher, a few seconds a run.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from _model_fixtures import ALLOWED, tiny_config, tiny_spec
from _tensorboard import scalars
from raytr.config import ModelConfig
from raytr.data.layout import day_paths
from raytr.data.loaders import DataLoader
from raytr.models import SessionModel
from raytr.training import loop
from raytr.training.arguments import TrainingArguments
from raytr.training.loop import TRAINING_STATE, build_optimizer, read_trainer_state
from raytr.training.trainer import Trainer

pytestmark = pytest.mark.slow
LR = 5e-3


def model(spec, dropout: float = 0.0) -> SessionModel:
    return SessionModel(spec, ModelConfig(body="gpt2", objective="clm", d_model=32, n_layers=1, n_heads=2,
                                          dropout=dropout), seed=0)


def args(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), launcher="local", num_train_epochs=1, per_device_train_batch_size=64,
                  learning_rate=LR, lr_scheduler_type="linear", disable_tqdm=True, logging_steps=1,
                  data_loader_engine="pyarrow", metrics_top_k=(5, 10), seed=0)
    return TrainingArguments(**(values | overrides))


def weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def state(checkpoint) -> dict:
    return torch.load(f"{checkpoint}/{TRAINING_STATE}", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def day1(prepared_dir, prepared_spec) -> tuple[list[str], int]:
    paths = day_paths(prepared_dir, [1])
    return paths, len(DataLoader(prepared_spec, paths, 64, shuffle=False, engine="pyarrow"))


def test_a_resumed_run_takes_its_first_step_at_the_schedules_lr(prepared_spec, day1, tmp_path):
    """A checkpoint of a finished linear schedule holds LR 0; resumed with a larger max_steps its
    first step takes the new schedule's LR there (it took the saved 0 and left the weights alone)."""
    paths, spe = day1
    first = Trainer(model(prepared_spec), args(tmp_path / "a", max_steps=spe), train_dataset_or_path=paths)
    cut = first.train().checkpoint
    assert state(cut)["optimizer"]["param_groups"][0]["lr"] == 0.0
    resumed = Trainer(model(prepared_spec), args(tmp_path / "b", max_steps=spe + 1, resume_from_checkpoint=cut),
                      train_dataset_or_path=paths)
    resumed.train()
    before = SessionModel.load(cut).state_dict()
    moved = [k for k, v in weights(resumed.model).items() if not torch.equal(v, before[k])]
    assert moved, "the resumed step ran at the finished schedule's LR 0"


def test_steps_that_fp16_skips_do_not_move_the_schedule(prepared_spec, day1, tmp_path, monkeypatch):
    """GradScaler skips the optimizer step of an overflowing gradient; warmup and decay must count
    only the steps taken. (No GPU here: a CPU GradScaler, and inf gradients on the first 3 steps.)"""
    paths, _ = day1
    real_scaler, real_load = torch.amp.GradScaler, SessionModel.load
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled=True: real_scaler(device, enabled=True))
    backwards = [0]

    def load_with_overflow(directory, map_location="cpu"):
        m = real_load(directory, map_location=map_location)

        def overflow(grad):
            backwards[0] += 1
            return grad * float("inf") if backwards[0] <= 3 else grad

        next(m.parameters()).register_hook(overflow)
        return m

    monkeypatch.setattr(loop.SessionModel, "load", staticmethod(load_with_overflow))
    out = Trainer(model(prepared_spec), args(tmp_path / "out", max_steps=10, warmup_steps=4),
                  train_dataset_or_path=paths).train()
    saved = state(out.checkpoint)
    taken = {int(s["step"]) for s in saved["optimizer"]["state"].values()}
    assert taken == {7} and saved["scheduler"]["last_epoch"] == 7  # 10 steps, 3 skipped
    lrs = scalars(tmp_path / "out" / "tensorboard" / out.run_name, "train/learning_rate")
    assert [round(lr / LR, 4) for _, lr in lrs[:5]] == [0.0, 0.0, 0.0, 0.25, 0.5]  # warmup starts at step 4


def test_eval_steps_dividing_max_steps_report_the_last_loss_not_nan(prepared_spec, day1, prepared_dir, tmp_path):
    """max_steps cuts the epoch short at a multiple of eval_steps: the report at that step used to
    take the running loss, leaving the epoch-end report a NaN (into the checkpoint and the result)."""
    paths, spe = day1
    assert spe > 4
    trainer = Trainer(model(prepared_spec), args(tmp_path / "out", max_steps=4, eval_steps=2),
                      train_dataset_or_path=paths, eval_dataset_or_path=day_paths(prepared_dir, [2]))
    out = trainer.train()
    assert math.isfinite(out.metrics["loss"]) and math.isfinite(read_trainer_state(out.checkpoint)["metrics"]["loss"])


@pytest.mark.parametrize("body,objective", ALLOWED)
def test_weight_decay_reaches_no_bias_norm_or_embedding(body, objective):
    """GPT-2's position table (wpe) and XLNet's [heads, head_dim] attention biases (r_w_bias, ...)
    had taken weight decay through a filter on names."""
    m = SessionModel(tiny_spec(), tiny_config(body, objective), seed=0)
    decay, no_decay = build_optimizer(m, args("unused", weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = [names[id(p)] for p in decay["params"]]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decayed
    assert not [n for n in decayed if "bias" in n or "emb" in n or "norm" in n or n.endswith(("wpe.weight", "wte.weight"))]
    assert all(p.ndim >= 2 for p in decay["params"])
    exempt = {id(p) for mod in m.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()}
    assert not exempt & {id(p) for p in decay["params"]}


def test_a_run_resumed_at_an_epochs_end_draws_what_an_uninterrupted_run_draws(prepared_spec, day1, tmp_path):
    """Dropout and the model's own draws are seeded per (seed, rank, epoch): a resumed run's weights
    equal an uninterrupted run's exactly, dropout on."""
    paths, _ = day1
    whole = Trainer(model(prepared_spec, dropout=0.1), args(tmp_path / "whole", num_train_epochs=2),
                    train_dataset_or_path=paths)
    whole.train()
    half = Trainer(model(prepared_spec, dropout=0.1), args(tmp_path / "half", num_train_epochs=2, stop_after_epoch=1),
                   train_dataset_or_path=paths)
    cut = half.train().checkpoint
    rest = Trainer(model(prepared_spec, dropout=0.1), args(tmp_path / "rest", num_train_epochs=2,
                                                            resume_from_checkpoint=cut), train_dataset_or_path=paths)
    rest.train()
    a, b = weights(whole.model), weights(rest.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_continued_call_keeps_the_first_calls_warmup_and_takes_its_own_settings(prepared_spec, day1, tmp_path):
    """One schedule over two calls: the second (five times longer) goes on decaying from where the
    first left it, without warming up again over a ratio of the longer total; its weight decay and
    Adam betas are its own, not those the loaded optimizer state held."""
    paths, spe = day1
    first = args(tmp_path / "out", warmup_ratio=0.2)
    trainer = Trainer(model(prepared_spec), first, train_dataset_or_path=paths)
    trainer.train()
    trainer.args = replace(first, num_train_epochs=5, weight_decay=0.5, adam_beta2=0.98)
    out = trainer.train()
    lrs = [lr for _, lr in scalars(tmp_path / "out" / "tensorboard" / out.run_name, "train/learning_rate")]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the continued schedule warmed up again"
    warmup = math.ceil(0.2 * spe)
    assert lrs[0] == pytest.approx(LR * (6 * spe - spe - 1) / (6 * spe - warmup), rel=1e-5)
    groups = state(out.checkpoint)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.98) for g in groups)
