"""What one training worker does: epochs of AMP steps, metrics, evaluation, checkpoints.

The loop knows nothing of Ray. Its contact with the outside is a `WorkerContext`: rank, world
size, device, how to wrap the model for DDP, how to report metrics with a checkpoint, and the
checkpoint to resume from. `raytr.training.trainer` builds one from Ray Train's context; at world
size 1 `local_context` runs the same loop in-process.

A checkpoint is a directory of plain files:
    model.safetensors, config.json   the model (SessionModel.save)
    training_state.pt                optimizer, scheduler and grad-scaler tensors (loaded with
                                     torch.load(weights_only=True): tensors and numbers only)
    trainer_state.json               epoch, global step, metrics
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raytr import storage
from raytr.config import ModelConfig
from raytr.errors import TrainingDivergedError
from raytr.data.loaders import DataLoader
from raytr.evaluation import update_next_item_metrics
from raytr.features import FeatureSpec, SessionBatch
from raytr.metrics import RankingMetrics
from raytr.models import SessionModel
from raytr.models.head import triton_kernel
from raytr.training.arguments import LossKernel, TrainingArguments

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, picklable: paths and dataclasses, no tensors."""

    spec: FeatureSpec
    model_config: ModelConfig
    args: TrainingArguments
    init_model_dir: str  # the starting weights (a SessionModel.save directory)
    train_paths: tuple[str, ...]
    eval_paths: tuple[str, ...] = ()
    reset_scheduler: bool = False  # start a fresh LR schedule even when resuming optimizer state
    init_training_state: str | None = None  # optimizer/scheduler state to continue from


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m
    report: Callable[[dict[str, float], Path | None], None] = lambda metrics, checkpoint: None
    restored_checkpoint: str | Path | None = None  # a checkpoint directory, local or a URL
    train_batches: Callable[[int], Iterable[SessionBatch]] | None = None  # Ray Data engine, per epoch
    steps_per_epoch: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _autocast(args: TrainingArguments, device: torch.device):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision or "")
    if dtype is None:
        return nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("training.fp16 needs a CUDA GPU (use bf16 on CPU, or set training.use_gpu)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def decays(name: str, param: nn.Parameter, exempt: set[int]) -> bool:
    """Whether weight decay applies to `param`: not to vectors, biases (XLNet's [heads, head_dim]
    r_w_bias too), norms and embeddings (`exempt`: the parameters of Embedding and norm modules, such
    as GPT-2's position table `wpe`; XLNet's `mask_emb` is a bare parameter)."""
    leaf = name.rsplit(".", 1)[-1]
    return not (param.ndim < 2 or id(param) in exempt or "bias" in leaf or "emb" in leaf
                or "embedding" in name or "norm" in name)


def build_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (the usual transformer recipe)."""
    exempt = {id(p) for module in model.modules()
              if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()
              for p in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decays(name, param, exempt) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CUDA the fused kernel: one launch per group instead of a dozen (steps of small models are launch-bound).
    fused = args.optim == "adamw_torch_fused" and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), fused=fused)


def warmup_steps(args: TrainingArguments, total_steps: int) -> int:
    return args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, total_steps: int,
                    warmup: int | None = None):
    """`args.lr_scheduler_type` over `total_steps`, warming up `warmup` steps (default: from args)."""
    from transformers import get_scheduler

    warmup = warmup_steps(args, total_steps) if warmup is None else warmup
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _lr_at_schedule_step(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Each group's LR as the schedule gives it at its current step: a loaded optimizer state holds
    the LR the schedule that saved it had reached, not this schedule's."""
    for group, base, lr_at in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lr_at(scheduler.last_epoch)


def _seed_epoch(model: SessionModel, seed: int, rank: int, epoch: int) -> None:
    """Dropout (torch's generator) and the model's own draws (MLM masks, sampled negatives) seeded by
    (seed, rank, epoch): a run resumed at an epoch's end continues the streams an uninterrupted run
    would have drawn, and ranks draw differently."""
    torch.manual_seed((seed * 7_919 + rank) * 1_009 + epoch)
    model.generator.manual_seed((seed * 7_919 + rank) * 1_013 + epoch)


class _LateRead:
    """A small device tensor read on the host one step late, without stalling the GPU queue.

    `put(t)` starts copying `t` into a pinned buffer (allocated once) and records a CUDA event;
    `take()` waits for that event only, not for the work queued after it, and returns the copy.
    Every `put` must be preceded by a `take` of the previous value. On CPU it holds the tensor."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._buffer = torch.empty(shape, dtype=dtype, pin_memory=self._cuda)
        self._event = torch.cuda.Event() if self._cuda else None
        self._value: torch.Tensor | None = None

    def put(self, value: torch.Tensor) -> None:
        if self._cuda:
            self._buffer.copy_(value, non_blocking=True)
            self._event.record()
            self._value = self._buffer
        else:
            self._value = value

    def take(self) -> torch.Tensor | None:
        if self._value is not None and self._event is not None:
            self._event.synchronize()
        value, self._value = self._value, None
        return value


def _all_reduce(tensor: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    if ctx.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _use_loss_kernel(model: SessionModel, choice: LossKernel, device: torch.device) -> None:
    """Swap raytr's Triton chunk kernel into the head where `training.loss_kernel` asks for it:
    "triton" always (an error where it cannot run), "auto" on a GPU where it can. "torch" keeps
    the kernel the head has (compiled by `compile_regions` or eager)."""
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return
    try:
        model.head.kernel = triton_kernel(device)
    except ValueError as err:
        if choice == "triton":
            raise ValueError(f"training.loss_kernel='triton': {err}; use 'torch' there") from err
        log.warning("training.loss_kernel='auto' keeps the torch loss kernel: %s", err)


def _step_marker(args: TrainingArguments, device: torch.device) -> Callable[[], None]:
    """What to call before each forward. CUDA graphs replay into the same output memory, so with
    them each forward declares the previous one's graph outputs dead; otherwise nothing."""
    if args.uses_cuda_graphs and device.type == "cuda":
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def evaluate_paths(model: SessionModel, cfg: LoopConfig, ctx: WorkerContext) -> dict[str, float]:
    """Next-item metrics over this rank's share of the eval data, reduced across ranks."""
    args = cfg.args
    loader = DataLoader(cfg.spec, cfg.eval_paths, args.per_device_eval_batch_size, shuffle=False,
                        engine="pyarrow" if args.data_loader_engine == "ray" else args.data_loader_engine,
                        rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, equal_steps=False)
    metrics = RankingMetrics(args.metrics_top_k)
    mark_step = _step_marker(args, ctx.device)
    model.eval()
    with torch.no_grad(), _autocast(args, ctx.device):
        for batch in loader:
            mark_step()
            update_next_item_metrics(metrics, model, batch, args.exclude_seen)
    model.train()
    metrics.load_state(_all_reduce(metrics.state.to(ctx.device), ctx).cpu())
    return metrics.compute()


def _write_checkpoint(model: SessionModel, optimizer, scheduler, scaler, epoch: int, step: int,
                      metrics: dict[str, float], directory: Path, steps_into_epoch: int = 0,
                      steps_per_epoch: int | None = None, warmup: int = 0) -> Path:
    """`steps_into_epoch`: the steps `epoch` had taken when max_steps cut it short (0: it ended);
    `steps_per_epoch`: the run's, which a resumed run must share; `warmup`: the schedule's warmup
    steps, which a continued or resumed schedule keeps."""
    model.save(directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "warmup_steps": warmup}, directory / TRAINING_STATE)
    (directory / TRAINER_STATE).write_text(json.dumps({"epoch": epoch, "global_step": step, "metrics": metrics,
                                                       "steps_into_epoch": steps_into_epoch,
                                                       "steps_per_epoch": steps_per_epoch}))
    return directory


def _check_same_epochs(trainer_state: dict[str, Any], steps_per_epoch: int, checkpoint: str | None) -> None:
    """Refuse to resume a checkpoint whose run took another number of steps an epoch: its step count
    (where the schedule and the epochs stand) and its batch order do not carry over, and the run
    would stop inside its last epoch. (Checkpoints written before the count was kept pass.)"""
    saved = trainer_state.get("steps_per_epoch")
    if saved is not None and int(saved) != steps_per_epoch:
        raise ValueError(f"training.resume_from_checkpoint {checkpoint!r} was written by a run of {saved} steps an "
                         f"epoch, and this one takes {steps_per_epoch} (another training.num_workers, "
                         "per_device_train_batch_size, dataloader_drop_last or data): resume with the settings that "
                         "wrote it, or start a new run")


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(directory, TRAINER_STATE)))


def model_differences(saved: SessionModel, configured: SessionModel) -> list[str]:
    """The model settings and data facts (feature spec) in which `saved` differs from `configured`,
    as "model.body='gpt2' (configured 'xlnet')"."""
    pairs = [("model", dataclasses.asdict(saved.config), dataclasses.asdict(configured.config)),
             ("feature_spec", saved.spec.to_dict(), configured.spec.to_dict())]
    return [f"{section}.{key}={was!r} (configured {now.get(key)!r})"
            for section, old, now in pairs for key, was in old.items() if now.get(key) != was]


def check_checkpoint_model(saved: SessionModel, configured: SessionModel, checkpoint: str | Path) -> None:
    """Refuse to resume from a checkpoint whose weights do not fit the configured model (another
    body, width, depth or catalog): one line naming the checkpoint and what differs, not
    load_state_dict's list of every mismatched tensor. Settings that leave the weights' shapes alone
    (dropout, say) may change on resume."""
    mine = configured.state_dict()
    theirs = saved.state_dict()
    if mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine):
        return
    differences = model_differences(saved, configured)
    raise ValueError(f"training.resume_from_checkpoint {str(checkpoint)!r}: the checkpoint's model does not match "
                     f"the configured one ({', '.join(differences) or 'other weights'}): resume with the settings it "
                     "was trained with, or train without resume_from_checkpoint")


def train_loop(cfg: LoopConfig, ctx: WorkerContext) -> dict[str, float]:
    """Train for `args.num_train_epochs` (or `max_steps`). Every epoch ends with evaluation and a
    checkpoint; `eval_steps` adds evaluations inside epochs. Returns the last reported metrics."""
    args = cfg.args
    device = ctx.device
    model = SessionModel.load(cfg.init_model_dir, map_location=device)  # the weights: the same on every rank
    model.generator = torch.Generator(device=device)  # seeded every epoch (_seed_epoch), as dropout is
    model.train()

    if ctx.train_batches is None:
        loader = DataLoader(cfg.spec, cfg.train_paths, args.per_device_train_batch_size, shuffle=True,
                            drop_last=args.dataloader_drop_last, engine=args.data_loader_engine, seed=args.seed,
                            rank=ctx.rank, world_size=ctx.world_size, device=device)
        steps_per_epoch = len(loader)
        batches_for_epoch: Callable[[int], Iterable[SessionBatch]] = lambda e: (loader.set_epoch(e), loader)[1]
    else:
        steps_per_epoch = ctx.steps_per_epoch or 0
        batches_for_epoch = ctx.train_batches
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs
    epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    if args.stop_after_epoch > 0:  # the schedule (total_steps) stays; the run ends early
        epochs = min(epochs, args.stop_after_epoch)

    optimizer = build_optimizer(model, args)
    restored_state = None  # (model state, training state, trainer state) of the checkpoint resumed
    if ctx.restored_checkpoint is not None:
        with storage.local_copy(ctx.restored_checkpoint) as local:  # one copy of a URL checkpoint for its parts
            restored_state = (SessionModel.load(local, map_location=device).state_dict(),
                              torch.load(local / TRAINING_STATE, map_location=device, weights_only=True),
                              read_trainer_state(local))
    saved = None  # the previous train() call's optimizer and scheduler state; a resumed checkpoint holds its own
    if cfg.init_training_state and restored_state is None:
        with storage.local_copy(cfg.init_training_state) as path:
            saved = torch.load(path, map_location=device, weights_only=True)
    continued = saved is not None and not cfg.reset_scheduler
    # A continued schedule is one schedule over all the train() calls: its step count goes on from
    # the saved one and its end moves out by this run's steps. (Rebuilt over this run's steps alone,
    # an already finished linear schedule would train the whole run at LR 0.) A resumed checkpoint
    # knows its own run's steps that came before it: its schedule step less its run's global step.
    if restored_state is not None:
        _, state, trainer_state = restored_state
        _check_same_epochs(trainer_state, steps_per_epoch, ctx.restored_checkpoint)
        prior_steps = int(state["scheduler"]["last_epoch"]) - int(trainer_state["global_step"])
    else:
        prior_steps = int(saved["scheduler"]["last_epoch"]) if continued else 0
    # One schedule over the calls keeps the first call's warmup (a ratio of the longer total would
    # warm up again); state saved before it was kept falls back to the ratio.
    previous = restored_state[1] if restored_state is not None else saved if continued else None
    warmup = (int(previous["warmup_steps"]) if previous is not None and "warmup_steps" in previous
              else warmup_steps(args, prior_steps + total_steps))
    scheduler = build_scheduler(optimizer, args, prior_steps + total_steps, warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16 and device.type == "cuda")
    start_epoch, global_step, skip_steps = 0, 0, 0
    if saved is not None:
        fresh_lrs = scheduler.get_last_lr()  # the new schedule's LR for its first step (0 under warmup)
        optimizer.load_state_dict(saved["optimizer"])  # the moments; the settings below are this call's
        for group, lr, decay in zip(optimizer.param_groups, fresh_lrs, (args.weight_decay, 0.0)):
            group.update(initial_lr=args.learning_rate, lr=lr, weight_decay=decay,
                         betas=(args.adam_beta1, args.adam_beta2))
        if continued:
            scheduler.load_state_dict(saved["scheduler"])  # the step count; this run's schedule function stays
            scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
            _lr_at_schedule_step(optimizer, scheduler)
    if restored_state is not None:
        model_state, state, trainer_state = restored_state
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _lr_at_schedule_step(optimizer, scheduler)  # the saved LR is that of the schedule's step before
        scaler.load_state_dict(state["scaler"])
        global_step = trainer_state["global_step"]
        # An epoch cut short by max_steps goes on where it stopped (the merlin/pyarrow loaders' batch
        # order is seeded by epoch and rank; Ray Data's is not, so there the rest of the epoch's steps
        # come from a new shuffle of it); a finished one is followed by the next.
        skip_steps = int(trainer_state.get("steps_into_epoch", 0))
        start_epoch = trainer_state["epoch"] + (0 if skip_steps else 1)
        log.info("rank %d: resumed from %s at epoch %d (+%d steps), step %d", ctx.rank, ctx.restored_checkpoint,
                 start_epoch, skip_steps, global_step)

    if args.torch_compile:
        model.compile_regions(args.torch_compile_mode)  # in place, before DDP wraps it: same state_dict names
    _use_loss_kernel(model, args.loss_kernel, device)
    mark_step = _step_marker(args, device)
    ddp_model = ctx.prepare_model(model)
    scalars = _tensorboard(args) if ctx.is_main else None
    run_steps = min(total_steps, epochs * steps_per_epoch) if args.stop_after_epoch > 0 else total_steps
    progress = _progress(args, ctx, run_steps, global_step)
    last_metrics: dict[str, float] = {}
    started = time.perf_counter()
    sessions_seen = 0

    # The finiteness of each step's loss is read one step late: reading it at once would make the
    # host wait for the GPU every step. A NaN step is still caught before any report or checkpoint.
    last_step = _LateRead((3,), torch.float64, device)  # [loss x targets, targets, loss] of the last step
    last_step_at = (0, 0)  # its (epoch, step)

    def raise_if_diverged() -> None:
        values = last_step.take()
        if values is not None:
            at_epoch, at_step = last_step_at
            if not bool(torch.isfinite(values).all()):
                # The mean over all ranks (NaN if any rank's is): this rank's own loss may be finite.
                loss = float(values[0] / values[1]) if values[1] > 0 else float(values[2])
                raise TrainingDivergedError(
                    f"loss is {loss:.4g} at epoch {at_epoch}, step {at_step}: training stopped; the last "
                    "good checkpoint is kept. Lower training.learning_rate, use bf16 instead of fp16, or clip "
                    "gradients (training.max_grad_norm)"
                )

    def report(epoch: float, with_eval: bool, checkpoint_epoch: int | None, steps_into_epoch: int = 0) -> None:
        """Metrics (and, at an epoch's end, a checkpoint) to the context; every rank calls it."""
        nonlocal last_metrics
        raise_if_diverged()
        metrics = {"epoch": float(epoch), "step": float(global_step), "loss": running_loss()}
        if with_eval and cfg.eval_paths:
            metrics.update({f"eval_{k}": v for k, v in evaluate_paths(model, cfg, ctx).items()})
        elapsed = time.perf_counter() - started
        metrics["train_sessions_per_second"] = sessions_seen * ctx.world_size / max(elapsed, 1e-9)
        if scalars is not None:
            for key, value in metrics.items():
                scalars.add(key if "/" in key else f"train/{key}", value, global_step)
            scalars.flush()
        if ctx.is_main:
            log.info("epoch %d step %d: %s", epoch, global_step,
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step")))
        checkpoint_dir = None
        if checkpoint_epoch is not None and ctx.is_main:
            checkpoint_dir = Path(tempfile.mkdtemp(prefix="raytr-ckpt-"))
            _write_checkpoint(model, optimizer, scheduler, scaler, checkpoint_epoch, global_step, metrics,
                              checkpoint_dir, steps_into_epoch, steps_per_epoch, warmup)
        try:
            ctx.report(metrics, checkpoint_dir)  # a barrier on Ray: every rank calls it
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        last_metrics = metrics

    # [sum of losses x targets, targets] over all ranks: each step adds its already reduced `check`.
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)

    def running_loss() -> float:
        total = loss_sum.cpu()
        value = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        loss_sum.zero_()
        return value

    # GradScaler skips the optimizer step whose gradients overflowed (fp16), deciding on the host: a
    # hook tells whether the step ran, so a skipped one does not move the schedule (warmup included).
    stepped = [False]
    optimizer.register_step_post_hook(lambda *_: stepped.__setitem__(0, True))

    train_metrics = RankingMetrics(args.metrics_top_k)
    try:
        for epoch in range(start_epoch, epochs):
            _seed_epoch(model, args.seed, ctx.rank, epoch)
            steps_this_epoch = skip_steps if epoch == start_epoch else 0
            for batch in itertools.islice(batches_for_epoch(epoch), steps_this_epoch, None):
                if global_step >= total_steps or steps_this_epoch >= steps_per_epoch:
                    break
                optimizer.zero_grad(set_to_none=True)  # before the forward: no graph output outlives its step
                mark_step()
                with _autocast(args, device):
                    out = ddp_model(batch)
                loss = out.loss
                # One small all-reduce per step: every rank learns of a NaN on any rank and stops
                # together, instead of the others hanging in the next gradient all-reduce.
                num_targets = torch.full((), float(out.num_targets), device=device)
                check = _all_reduce(torch.stack([loss.detach().float() * num_targets, num_targets]).double(), ctx)
                raise_if_diverged()  # the previous step's
                last_step.put(torch.cat([check, loss.detach().double().view(1)]))
                last_step_at = (epoch, global_step)
                loss_sum += check
                scaler.scale(loss).backward()
                if args.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                stepped[0] = False
                scaler.step(optimizer)
                scaler.update()
                if stepped[0]:
                    scheduler.step()
                global_step += 1
                steps_this_epoch += 1
                sessions_seen += len(batch)
                if progress is not None:
                    progress.update(1)
                if args.compute_metrics_each_n_steps and global_step % args.compute_metrics_each_n_steps == 0:
                    train_metrics = RankingMetrics(args.metrics_top_k)
                    model.eval()
                    mark_step()
                    with _autocast(args, device):
                        update_next_item_metrics(train_metrics, model, batch, args.exclude_seen)
                    model.train()
                    train_metrics.load_state(_all_reduce(train_metrics.state.to(device), ctx).cpu())
                    if scalars is not None:
                        for key, value in train_metrics.compute().items():
                            scalars.add(f"train/{key}", value, global_step)
                if args.logging_steps and global_step % args.logging_steps == 0 and scalars is not None:
                    scalars.add("train/learning_rate", scheduler.get_last_lr()[0], global_step)
                if (args.eval_steps and global_step % args.eval_steps == 0 and steps_this_epoch < steps_per_epoch
                        and global_step < total_steps):  # the epoch-end report follows the last step
                    report(epoch + steps_this_epoch / steps_per_epoch, with_eval=True, checkpoint_epoch=None)
            report(epoch + 1, with_eval=True, checkpoint_epoch=epoch,
                   # cut short by max_steps (a user's loader that simply ran out has ended its epoch)
                   steps_into_epoch=steps_this_epoch if global_step >= total_steps
                   and steps_this_epoch < steps_per_epoch else 0)
            if global_step >= total_steps:
                break
    finally:  # also when a step raises: the curves so far reach the output (a URL's are uploaded)
        if progress is not None:
            progress.close()
        if scalars is not None:
            scalars.close()
    return last_metrics


class ScalarLog:
    """TensorBoard scalars for the training loop, written to the SummaryWriter in bursts.

    Every `add_scalar` wakes the writer's background thread, and trading the GIL with it (every torch
    op releases it) costs the loop far more than the call's ~30 us: a scalar every step added 0.2-0.5
    ms to a 4 ms step on 2 CPU cores (bench/profiles.py --only tensorboard) and 2.7-3.5 ms per step
    on an H100's host (bench/profile_gpu.py, trainer vs trainer-quiet). Held back and written
    `burst` at a time (or once the oldest has waited `max_delay_s`, or at `flush`), each scalar keeps
    its own step and wall time, so the curves are the same."""

    def __init__(self, writer: Any, sync: Callable[[bool], None] = lambda closed: None, burst: int = 64,
                 max_delay_s: float = 30.0) -> None:
        self.writer, self._sync, self.burst, self.max_delay_s = writer, sync, burst, max_delay_s
        self._pending: list[tuple[str, float, int, float]] = []

    def add(self, tag: str, value: float, step: int) -> None:
        now = time.time()
        self._pending.append((tag, float(value), step, now))
        if len(self._pending) >= self.burst or now - self._pending[0][3] >= self.max_delay_s:
            self._write()

    def _write(self) -> None:
        for tag, value, step, walltime in self._pending:
            self.writer.add_scalar(tag, value, step, walltime=walltime)
        self._pending.clear()

    def flush(self) -> None:
        """Everything added so far on disk (and uploaded, for a URL output)."""
        self._write()
        self.writer.flush()
        self._sync(False)

    def close(self) -> None:
        self._write()
        self.writer.close()
        self._sync(True)


def _tensorboard(args: TrainingArguments) -> ScalarLog | None:
    """A ScalarLog under output_dir/tensorboard/<run>, or None without "tensorboard" in report_to.
    For a URL output the events are written locally and uploaded at every flush and at close (the
    local copy is then removed)."""
    if "tensorboard" not in args.report_to:
        return None
    from torch.utils.tensorboard import SummaryWriter

    # One subdirectory per run: every train() call restarts global_step at 0, so runs sharing a
    # directory would overwrite each other's curves.
    target = storage.join(args.output_dir, "tensorboard", *([args.run_name] if args.run_name else []))
    if not storage.is_url(target):
        return ScalarLog(SummaryWriter(log_dir=target))
    local = tempfile.mkdtemp(prefix="raytr-tensorboard-")

    def sync(closed: bool) -> None:
        storage.put_dir(local, target)
        if closed:
            shutil.rmtree(local, ignore_errors=True)

    return ScalarLog(SummaryWriter(log_dir=local), sync)


def _progress(args: TrainingArguments, ctx: WorkerContext, total: int, done: int):
    if args.disable_tqdm or not ctx.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)


def local_context(output_dir: str | Path, keep: int, metric: str, greater_is_better: bool,
                  device: torch.device | None = None) -> tuple[WorkerContext, list[tuple[dict, str]]]:
    """A one-process context that keeps the best `keep` checkpoints under output_dir/checkpoints
    (a local path or a URL)."""
    saved: list[tuple[dict, str]] = []
    root = storage.join(output_dir, "checkpoints")

    def report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        target = storage.join(root, f"checkpoint-{int(metrics['step']):08d}")
        storage.remove(target)
        storage.put_dir(checkpoint, target)
        saved.append((metrics, target))
        key = f"eval_{metric}"
        # Keep the latest always (for resuming), plus the best by the metric; without eval metrics
        # (or on ties), the most recent.
        def rank(mp: tuple[dict, str]) -> tuple[float, float]:
            value = mp[0].get(key)
            return (0.0 if value is None else value if greater_is_better else -value), mp[0]["step"]

        ranked = sorted(saved[:-1], key=rank, reverse=True)
        for _, path in ranked[max(keep - 1, 0):]:
            storage.remove(path)
            saved.remove(next(s for s in saved if s[1] == path))

    ctx = WorkerContext(device=device or torch.device("cpu"), report=report)
    return ctx, saved
