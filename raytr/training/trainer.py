"""The Trainer: a Transformers4Rec / Hugging Face style API over Ray Train.

    trainer = Trainer(model, args, train_dataset_or_path="prepared/", eval_dataset_or_path=[...])
    trainer.train()                      # TorchTrainer with args.num_workers DDP workers
    trainer.evaluate(metric_key_prefix="eval")
    trainer.predict()                    # top-k next items for each eval session

`train()` ships the model as files (the starting weights are saved under the run directory), runs
`raytr.training.loop.train_loop` on every worker, and loads the final weights back into `model`.
Calling `train()` again continues from the current weights and optimizer state (fine-tuning on a
new time window) and continues the LR schedule as one schedule over all the calls, its end moved out
by the new run's steps (a linear one decays from where it was, never sits at 0 for a whole run);
`reset_lr_scheduler()` makes the next call start a fresh schedule (warmup, then decay from the
learning rate), as `raytr incremental` does for each window.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raytr import storage
from raytr.data.layout import available_days, day_paths, sessions_root
from raytr.data.loaders import DataLoader, check_session_files
from raytr.evaluation import data_workflow_digest, evaluate_next_item
from raytr.config import ConfigError
from raytr.features import FIRST_ITEM_ID, SessionBatch
from raytr.models import SessionModel
from raytr.models.masking import split_last_item
from raytr.training.arguments import TrainingArguments
from raytr.training.loop import (
    TRAINING_STATE,
    LoopConfig,
    check_checkpoint_model,
    local_context,
    read_trainer_state,
    train_loop,
)

if TYPE_CHECKING:
    from raytr.config import RaytrConfig

log = logging.getLogger(__name__)

DatasetOrPath = str | Path | Sequence[str] | Any  # a prepared dir, parquet files, or a ray.data.Dataset


@dataclass(frozen=True)
class TrainOutput:
    metrics: dict[str, float]
    checkpoint: str  # the final checkpoint directory (model + optimizer state)
    best_checkpoint: str | None
    model_dir: str  # output_dir/model: the final model, ready for `raytr evaluate` and serving
    run_name: str


@dataclass(frozen=True)
class Predictions:
    item_ids: np.ndarray  # [N, k] recommended ids, best first
    scores: np.ndarray  # [N, k]
    targets: np.ndarray  # [N] the true next (last) item of each session


def resolve_paths(data: DatasetOrPath) -> list[str]:
    """Absolute paths (or URLs) of the parquet files in a prepared directory (all days), a directory of
    parquet, a file or a list of those. Absolute because Ray workers do not run in the caller's directory."""
    if isinstance(data, (list, tuple)):
        return [p for item in data for p in resolve_paths(item)]
    files = storage.list_files(sessions_root(data))
    if not files:
        raise FileNotFoundError(f"no parquet files at {str(data)!r}: pass a `raytr prepare` output or parquet files")
    return files


# What makes a directory an earlier training output that `train()` may write into again (replacing
# its model/): the result of a finished call, or the starting weights that a call writes first
# (runs/<run>/init/config.json: a crashed run, which the same run_name resumes). A bare runs/ is
# not one: TensorBoard's SummaryWriter writes runs/ into whatever directory it runs in.
TRAIN_OUTPUT_MARKERS = ("train_result.json", "runs/*/init/config.json")


def check_train_output(output_dir: str | Path, inputs: Sequence[str | Path] = (),
                       markers: Sequence[str] = TRAIN_OUTPUT_MARKERS) -> None:
    """Refuse an `output_dir` where training would destroy data: a file, a non-empty directory that
    is not an earlier training output (none of `markers`: its model/ would be replaced), one that is
    or holds an input, or one inside an input directory (training would write into the data)."""
    out_fs, out = storage.filesystem(output_dir)
    for path in inputs:
        in_fs, data = storage.filesystem(path)
        if type(in_fs) is type(out_fs) and out != data and storage.is_within(out, data):
            raise ValueError(f"output {str(output_dir)!r} is inside the input data {str(path)!r}: training would "
                             "write its model, checkpoints and workflow into the data; choose a directory outside it")
    storage.check_output(output_dir, markers, inputs)


def _check_work_left(trainer_state: dict[str, Any], args: TrainingArguments, checkpoint: str) -> None:
    """A checkpoint to resume from must leave epochs (or steps) to train: else no run reports one."""
    step = int(trainer_state["global_step"])
    # An epoch that max_steps cut short is not finished: a resume goes on inside it.
    epoch = int(trainer_state["epoch"]) - (1 if trainer_state.get("steps_into_epoch") else 0)
    if args.max_steps > 0 and step >= args.max_steps:
        raise ValueError(f"training.resume_from_checkpoint {checkpoint!r} is at step {step}, and "
                         f"training.max_steps={args.max_steps} leaves nothing to train: raise max_steps")
    if args.stop_after_epoch > 0 and epoch + 1 >= args.stop_after_epoch:
        raise ValueError(f"training.resume_from_checkpoint {checkpoint!r} finished epoch {epoch + 1}, and "
                         f"training.stop_after_epoch={args.stop_after_epoch} leaves nothing to train")
    if args.max_steps <= 0 and epoch + 1 >= args.num_train_epochs:
        raise ValueError(f"training.resume_from_checkpoint {checkpoint!r} finished epoch {epoch + 1} of "
                         f"training.num_train_epochs={args.num_train_epochs}: nothing is left to train; raise "
                         "num_train_epochs")


def _is_ray_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("ray.data")


class Trainer:
    def __init__(
        self,
        model: SessionModel,
        args: TrainingArguments,
        *,
        train_dataset_or_path: DatasetOrPath | None = None,
        eval_dataset_or_path: DatasetOrPath | None = None,
        train_dataloader: Iterable[SessionBatch] | None = None,
        eval_dataloader: Iterable[SessionBatch] | None = None,
    ) -> None:
        catalog = model.spec.item_cardinality - FIRST_ITEM_ID  # the items a ranking can hold
        beyond = [k for k in (*args.metrics_top_k, args.predict_top_k) if k > catalog]
        if beyond:  # metrics@k would count every session a hit; predict would fail after training
            raise ConfigError(f"training.metrics_top_k={list(args.metrics_top_k)}, predict_top_k={args.predict_top_k}: "
                              f"{beyond} above the model's catalog of {catalog} items")
        self.model = model
        self.args = args
        self.train_dataset = train_dataset_or_path
        self.eval_dataset = eval_dataset_or_path
        self.train_dataloader = train_dataloader
        self.eval_dataloader = eval_dataloader
        self._training_state: str | None = None  # optimizer/scheduler state of the last train()
        self._reset_scheduler = False
        self.state: dict[str, Any] = {"global_step": 0, "runs": []}

    # T4Rec names, kept as aliases of the attributes above.
    @property
    def train_dataset_or_path(self) -> DatasetOrPath | None:
        return self.train_dataset

    @train_dataset_or_path.setter
    def train_dataset_or_path(self, value: DatasetOrPath | None) -> None:
        self.train_dataset = value

    @property
    def eval_dataset_or_path(self) -> DatasetOrPath | None:
        return self.eval_dataset

    @eval_dataset_or_path.setter
    def eval_dataset_or_path(self, value: DatasetOrPath | None) -> None:
        self.eval_dataset = value

    def reset_lr_scheduler(self) -> None:
        """The next `train()` starts a fresh warmup/decay schedule (optimizer moments are kept)."""
        self._reset_scheduler = True

    def wipe_memory(self) -> None:
        """Free cached accelerator memory between time windows."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ training
    def train(self) -> TrainOutput:
        args = self.args
        if self.train_dataset is None and self.train_dataloader is None:
            raise ValueError("Trainer.train(): set train_dataset_or_path (or train_dataloader) first")
        output_dir = storage.normalize(args.output_dir)
        calls = len(self.state["runs"])
        # resume_from_checkpoint continues the first train() call; later calls continue from the previous one.
        resume = storage.normalize(args.resume_from_checkpoint) if args.resume_from_checkpoint and not calls else None
        if resume:  # settings errors before anything is written or started
            _check_work_left(read_trainer_state(resume), args, resume)
            check_checkpoint_model(SessionModel.load(resume, map_location="cpu"), self.model, resume)
        # A set run_name names the first train() call's run (run again, e.g. after a driver crash, Ray
        # Train resumes it); later calls of this Trainer add their number, so they never resume it.
        if args.run_name:
            run_name = args.run_name if calls == 0 else f"{args.run_name}-{calls + 1}"
        else:
            run_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{np.random.default_rng().integers(1 << 30):08x}"
        train_paths = () if self.train_dataset is None or _is_ray_dataset(self.train_dataset) else tuple(
            resolve_paths(self.train_dataset))
        eval_paths = () if self.eval_dataset is None or _is_ray_dataset(self.eval_dataset) else tuple(
            resolve_paths(self.eval_dataset))
        counts = check_session_files(self.model.spec, [*train_paths, *eval_paths])  # a file without the model's columns
        # Which workflow encoded the data: recorded, so a bundle pairing the model with another is refused.
        workflow_digest = data_workflow_digest([*train_paths, *eval_paths])
        if eval_paths and sum(counts[len(train_paths):]) == 0:
            raise ValueError(f"evaluation data {list(eval_paths)[:3]} has 0 sessions")  # before an epoch is spent
        check_train_output(output_dir, [*train_paths, *eval_paths])  # before anything is written
        if args.launcher == "local" and args.use_gpu and not torch.cuda.is_available():
            raise ValueError("training.use_gpu is true but no CUDA GPU is visible to this process "
                             "(training.launcher=local)")
        if args.launcher != "local" and self.train_dataloader is None:
            from raytr.training.ray_launcher import ready_cluster

            ready_cluster(args)  # a worker group the cluster can never hold is refused before anything is written
        run_dir = storage.join(output_dir, "runs", run_name)
        init_dir = self.model.save(storage.join(run_dir, "init"))
        init_state = None
        if self._training_state:
            init_state = storage.join(init_dir, TRAINING_STATE)
            storage.copy_file(self._training_state, init_state)
        loop_args = replace(args, output_dir=output_dir, run_name=run_name, resume_from_checkpoint=resume)
        cfg = LoopConfig(
            spec=self.model.spec, model_config=self.model.config, args=loop_args, init_model_dir=str(init_dir),
            train_paths=train_paths, eval_paths=eval_paths, reset_scheduler=self._reset_scheduler,
            init_training_state=init_state,
        )
        log.info("train: run %s, %d train file(s), %d eval file(s), launcher=%s, workers=%d", run_name,
                 len(train_paths), len(eval_paths), args.launcher, args.num_workers)
        if args.launcher == "local" or self.train_dataloader is not None:
            metrics, checkpoint, best = self._train_local(cfg, run_dir)
        else:
            from raytr.training.ray_launcher import fit_on_ray

            metrics, checkpoint, best = fit_on_ray(cfg, run_dir, run_name, self.train_dataset)
        if args.save_total_limit < 2:  # only the latest is kept (for resuming): none can be called the best
            best = None
        final = SessionModel.load(checkpoint, map_location="cpu")
        self.model.load_state_dict(final.state_dict())
        self._training_state = storage.join(checkpoint, TRAINING_STATE)
        self._reset_scheduler = False
        model_dir = storage.join(output_dir, "model")
        if storage.exists(model_dir):
            log.info("train: replacing the model of an earlier run in %s", model_dir)
        # Saved beside it, then moved in: a failed save keeps the earlier model.
        staging = final.save(storage.staging_path(model_dir, uuid.uuid4().hex[:8]))
        storage.commit_dir(staging, model_dir, marker="config.json")
        self.state["global_step"] = int(read_trainer_state(checkpoint)["global_step"])
        result = TrainOutput(metrics=metrics, checkpoint=str(checkpoint), best_checkpoint=best and str(best),
                             model_dir=str(model_dir), run_name=run_name)
        self.state["runs"].append(asdict(result))
        storage.write_text(storage.join(output_dir, "train_result.json"), json.dumps(
            {**asdict(result), "training_arguments": asdict(args), "model_config": asdict(self.model.config),
             "feature_spec": self.model.spec.to_dict(), "workflow_digest": workflow_digest}, indent=2, default=str))
        return result

    def _train_local(self, cfg: LoopConfig, run_dir: str) -> tuple[dict[str, float], str, str | None]:
        args = cfg.args
        device = torch.device("cuda" if args.use_gpu else "cpu")  # a GPU is there: checked in train()
        ctx, saved = local_context(run_dir, args.save_total_limit, args.metric_for_best_model,
                                   args.greater_is_better, device)
        if args.resume_from_checkpoint:
            ctx.restored_checkpoint = args.resume_from_checkpoint
        if self.train_dataloader is not None:
            loader = self.train_dataloader
            ctx.steps_per_epoch = len(loader)  # type: ignore[arg-type]

            def batches(epoch: int) -> Iterable[SessionBatch]:
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                return (b.to(device) for b in loader)

            ctx.train_batches = batches
        metrics = train_loop(cfg, ctx)
        latest = saved[-1][1]
        key = f"eval_{args.metric_for_best_model}"
        scored = [s for s in saved if key in s[0]]
        best = max(scored, key=lambda s: s[0][key] * (1 if args.greater_is_better else -1))[1] if scored else None
        return metrics, latest, best

    # ------------------------------------------------------------------ evaluation
    def _eval_batches(self, dataset: DatasetOrPath | None) -> Iterable[SessionBatch]:
        if dataset is None and self.eval_dataloader is not None:
            return self.eval_dataloader
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("no evaluation data: pass eval_dataset or set eval_dataset_or_path")
        paths = resolve_paths(dataset)
        check_session_files(self.model.spec, paths)
        return DataLoader(self.model.spec, paths, self.args.per_device_eval_batch_size,
                          shuffle=False, engine="pyarrow" if self.args.data_loader_engine == "ray"
                          else self.args.data_loader_engine)

    def evaluate(self, eval_dataset: DatasetOrPath | None = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Next-item metrics (last item of each session from its prefix), averaged over sessions."""
        from tqdm.auto import tqdm

        batches = tqdm(self._eval_batches(eval_dataset), desc="evaluate", unit="batch",
                       disable=self.args.disable_tqdm, leave=False)
        metrics = evaluate_next_item(self.model, batches, self.args.metrics_top_k, self.args.exclude_seen)
        if metrics.count == 0:
            raise ValueError("evaluation data has no session with >= 2 events")
        return {f"{metric_key_prefix}_{k}": v for k, v in metrics.compute().items()}

    @torch.no_grad()
    def predict(self, dataset: DatasetOrPath | None = None, k: int | None = None) -> Predictions:
        """Top-k next items for each session's prefix, with the true last item as target."""
        k = k or self.args.predict_top_k
        self.model.eval()
        ids, scores, targets = [], [], []
        for batch in self._eval_batches(dataset):
            prefix, target = split_last_item(batch)
            top_ids, top_scores = self.model.recommend(prefix, k, exclude_seen=self.args.exclude_seen)
            ids.append(top_ids.cpu().numpy())
            scores.append(top_scores.cpu().numpy())
            targets.append(target.cpu().numpy())
        if not ids:
            raise ValueError("prediction data is empty")
        return Predictions(np.concatenate(ids), np.concatenate(scores), np.concatenate(targets))


def train_prepared(
    config: "RaytrConfig",
    data_dir: str | Path,
    train_days: Sequence[int] | None = None,
    eval_days: Sequence[int] | None = None,
) -> TrainOutput:
    """Train a new model on a `raytr prepare` output; the output directory becomes a model bundle.

    Default split: evaluate on the last day, train on the days before it (all days if only one).
    """
    from raytr.bundle import attach_preprocessing
    from raytr.data.schema import feature_spec, load_schema

    check_train_output(config.training.output_dir, [data_dir])  # before the days are read
    days = available_days(data_dir)
    if not days:
        raise FileNotFoundError(f"{data_dir} has no sessions/day=N/ partitions: run `raytr prepare` first")
    if eval_days is None:
        eval_days = days[-1:] if len(days) > 1 else []
    if train_days is None:
        train_days = [d for d in days if d not in eval_days] or days
    if set(train_days) & set(eval_days):
        log.warning("days %s are both trained and evaluated on: the metrics on them are not held out",
                    sorted(set(train_days) & set(eval_days)))
    spec = feature_spec(load_schema(data_dir), config.training.max_sequence_length)
    model = SessionModel(spec, config.model, seed=config.training.seed)
    trainer = Trainer(model, config.training, train_dataset_or_path=day_paths(data_dir, list(train_days)),
                      eval_dataset_or_path=day_paths(data_dir, list(eval_days)) if eval_days else None)
    result = trainer.train()
    attach_preprocessing(data_dir, config.training.output_dir)
    return result
