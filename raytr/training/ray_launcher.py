"""Running `train_loop` on Ray Train: the only module of raytr.training that imports Ray.

One `TorchTrainer` per `Trainer.train()` call: DDP through `ray.train.torch.prepare_model`, gloo on
CPU and NCCL on GPU, checkpoints reported through `ray.train.report` (the best
`save_total_limit` kept by `metric_for_best_model`), worker-group restarts with `max_failures`
resuming from the last reported checkpoint. The "ray" data engine feeds workers from Ray Data
shards instead of the merlin/pyarrow loaders.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raytr import storage
from raytr.errors import user_error_message
from raytr.data.loaders import (
    BadValuesError,
    DataLoader,
    causal_target_counts,
    check_column_values,
    check_distinct_paths,
    check_no_nulls,
    check_session_files,
    gather_batches,
    ragged_from_arrow,
)
from raytr.features import FeatureSpec, SessionBatch
from raytr.config import ConfigError
from raytr.ray_runtime import cluster_limit, ensure_ray
from raytr.training.arguments import TrainingArguments
from raytr.training.loop import LoopConfig, WorkerContext, train_loop

log = logging.getLogger(__name__)


def located_in_files(error: BadValuesError, spec: FeatureSpec, paths: Sequence[str]) -> ValueError:
    """A Ray Data batch's bad value as an error naming its file, where the dataset was read from
    `paths`: its rows do not say which file they came from, so (on this error path only) the files
    are checked again one by one, a file without the column first (Ray Data reads its rows as null
    lists). Where none is found (an in-memory dataset), the error names the batch."""
    check_session_files(spec, paths)
    for path in paths:
        DataLoader(spec, [path], 1, shuffle=False, engine="pyarrow", equal_steps=False)  # checks it, naming it
    return error.located("a Ray Data batch of the training dataset")


def ray_data_batches(shard: Any, cfg: LoopConfig, device: torch.device, rows_per_worker: int):
    """(batches(epoch), steps per epoch) from one worker's Ray Data shard (a DataIterator, as
    `ray.train.get_dataset_shard` or `Dataset.streaming_split(n, equal=True)` give). The shards have
    equal row counts, so every worker runs the same number of steps; the block order is reshuffled
    every epoch and rows are shuffled inside a window of 16 batches (no local shuffle buffer: it can
    yield short batches mid-stream, ray #66085). Each window arrives as Arrow lists, is checked once
    and moved to the device as ragged columns, and its batches are gathered and padded there, as
    the merlin/pyarrow loaders do with their resident columns. With `dataloader_drop_last`, the
    short last batch is left out, as by the other engines: rows_per_worker // batch_size steps."""
    spec, batch_size = cfg.spec, cfg.args.per_device_train_batch_size
    drop_last = cfg.args.dataloader_drop_last

    def batches(epoch: int) -> Iterator[SessionBatch]:
        rng = np.random.default_rng(cfg.args.seed * 1_000_003 + epoch)
        for table in shard.iter_batches(batch_size=16 * batch_size, batch_format="pyarrow", drop_last=False):
            try:  # on the host, before the copy
                for name in spec.columns:
                    check_no_nulls(name, table.column(name))
                columns = {name: ragged_from_arrow(table.column(name)) for name in spec.columns}
                check_column_values(spec, columns)
            except BadValuesError as error:
                raise located_in_files(error, spec, cfg.train_paths) from None
            targets = causal_target_counts(columns[spec.item_id], spec.max_sequence_length)
            columns = {name: column.to(device) for name, column in columns.items()}
            order = torch.from_numpy(rng.permutation(table.num_rows))
            if drop_last:  # only the shard's last window is short: its rows past the last full batch
                order = order[: len(order) // batch_size * batch_size]
            if len(order):
                yield from gather_batches(spec, columns, targets, order, batch_size)

    return batches, rows_per_worker // batch_size if drop_last else math.ceil(rows_per_worker / batch_size)


def ray_train_dataset(cfg: LoopConfig, dataset: Any = None) -> tuple[Any, int]:
    """The Ray Data engine's training dataset (the given one, or `cfg.train_paths` read) and the rows
    each of `num_workers` shards gets (Ray's equal split drops the remainder rows)."""
    if dataset is None:
        check_distinct_paths(cfg.train_paths)  # Ray Data would read a file given twice twice
        paths, fs = storage.pyarrow_location(cfg.train_paths)
        dataset = ray.data.read_parquet(paths, filesystem=fs).select_columns(cfg.spec.columns)
    ds = dataset
    # Read once into the object store (spilled to disk when larger): otherwise every epoch re-reads
    # and re-decodes every parquet file, which bounds the engine near 15k sessions/s on an H100
    # host for prepare's many small files. The block order is still reshuffled every epoch.
    ds = ds.materialize().randomize_block_order()
    total, workers = ds.count(), cfg.args.num_workers
    if total < workers:
        raise ValueError(f"{total} sessions cannot feed {workers} workers")
    batch_size = cfg.args.per_device_train_batch_size
    if cfg.args.dataloader_drop_last and total // workers < batch_size:
        raise ValueError(f"{total} sessions over {workers} worker(s) make no full batch of {batch_size} "
                         "(training.dataloader_drop_last=true)")
    return ds, total // workers


def _worker(config: dict[str, Any]) -> None:
    cfg: LoopConfig = config["loop"]
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    restored: str | Path | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue from the last report
        restored = Path(tempfile.mkdtemp(prefix="raytr-restore-"))
        with checkpoint.as_directory() as src:
            shutil.copytree(src, restored, dirs_exist_ok=True)
    elif cfg.args.resume_from_checkpoint:
        restored = cfg.args.resume_from_checkpoint  # the loop reads it (a local path or a URL)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)

    ctx = WorkerContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=device,
        prepare_model=ray.train.torch.prepare_model,
        report=report,
        restored_checkpoint=restored,
    )
    if cfg.args.data_loader_engine == "ray":
        ctx.train_batches, ctx.steps_per_epoch = ray_data_batches(ray.train.get_dataset_shard("train"), cfg, device,
                                                                  config["rows_per_worker"])
    try:
        train_loop(cfg, ctx)
    finally:
        if checkpoint is not None:
            shutil.rmtree(restored, ignore_errors=True)


def user_error_of(error: BaseException) -> BaseException | None:
    """The worker exception to raise in place of Ray Train's WorkerGroupError (which wraps every
    failed worker's exception in a traceback dump): the lowest rank's user error (one that
    `user_error_message` prints: a bad setting, bad data, a divergence; or an OS error naming a
    path), with its message intact; None for anything else."""
    failures = getattr(error, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        if user_error_message(failure) is not None:
            return failure
    return None


def resource_shortfall(needed: dict[str, float], limit: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{resource: (needed, limit)} for each resource that `needed` asks more of than `limit` holds
    (a resource missing from `limit`: 0 of it)."""
    return {name: (amount, limit.get(name, 0.0)) for name, amount in sorted(needed.items())
            if amount > limit.get(name, 0.0) + 1e-9}


def _amount(value: float) -> str:
    return f"{value:g}" if value < 1e6 else f"{value / 2 ** 30:.1f} GiB"  # memory resources are in bytes


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    """What Ray reserves for each worker, all on one node: resources_per_worker (1 GPU added with
    use_gpu), else 1 GPU with use_gpu, else 1 CPU."""
    if scaling.resources_per_worker is None:
        per_worker = {"GPU": 1.0} if scaling.use_gpu else {"CPU": 1.0}
    else:
        per_worker = {name: float(amount) for name, amount in scaling.resources_per_worker.items() if amount}
    if scaling.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return per_worker


def check_cluster_fits(scaling: ScalingConfig) -> None:
    """Refuse a worker group (`scaling`, made from training.num_workers, use_gpu and
    resources_per_worker) that the cluster can never place, in all or one worker on one node: Ray
    Train would wait for it forever, logging "No available node types can fulfill resource request"
    every minute. Where the cluster may still grow, only a warning that the run waits for nodes."""
    needed = {name: float(amount) for name, amount in scaling.total_resources.items() if amount}
    per_worker = worker_resources(scaling)
    bound = cluster_limit()
    limit = bound.total if bound is not None else {k: float(v) for k, v in ray.cluster_resources().items()}
    short = resource_shortfall(needed, limit)
    settings = (f"training.use_gpu={str(scaling.use_gpu).lower()}, "
                f"training.resources_per_worker={dict(scaling.resources_per_worker or {})}")
    if bound is None:
        if short:
            text = ", ".join(f"{_amount(need)} {name} (the cluster has {_amount(has)})"
                             for name, (need, has) in short.items())
            log.warning("the worker group needs %s now: the run waits until the cluster adds nodes (with no "
                        "autoscaler it waits forever: stop it and lower training.num_workers)", text)
        return
    fixes = ["lower training.num_workers"] if scaling.num_workers > 1 else []
    if "GPU" in short and scaling.use_gpu:
        fixes.append("set training.use_gpu=false")
    if scaling.resources_per_worker:
        fixes.append("lower training.resources_per_worker")
    advice = ", or ".join([*fixes, "run on a larger cluster (RAY_ADDRESS)"])
    if short:
        text = ", ".join(f"{_amount(need)} {name} (the cluster holds at most {_amount(has)})"
                         for name, (need, has) in short.items())
        raise ConfigError(f"training.num_workers={scaling.num_workers} x {per_worker} per worker ({settings}) "
                          f"needs {text}; the cluster is {bound.why}: {advice}")
    if bound.nodes and all(resource_shortfall(per_worker, node) for node in bound.nodes):
        # Enough in all, but a worker's resources must come from one node.
        shapes = "; ".join(sorted({", ".join(f"{_amount(v)} {k}" for k, v in sorted(node.items())
                                             if k in per_worker) or "none of it" for node in bound.nodes}))
        gpu_short = scaling.use_gpu and all("GPU" in resource_shortfall(per_worker, node) for node in bound.nodes)
        advice = ", or ".join([*(["set training.use_gpu=false"] if gpu_short else []),
                               *(["lower training.resources_per_worker"] if scaling.resources_per_worker else []),
                               "run on a cluster with larger nodes (RAY_ADDRESS)"])
        raise ConfigError(f"one worker needs {per_worker} on one node ({settings}) and no node of the cluster "
                          f"holds that (its nodes hold: {shapes}); the cluster is {bound.why}: {advice}")


def ready_cluster(args: TrainingArguments) -> ScalingConfig:
    """Join or start Ray and refuse a worker group it can never hold: the Trainer calls it before it
    writes anything, `fit_on_ray` before Ray Data reads the data and Ray Train waits for workers."""
    ensure_ray()
    scaling = ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                            resources_per_worker=args.resources_per_worker or None)
    check_cluster_fits(scaling)
    return scaling


def fit_on_ray(cfg: LoopConfig, run_dir: str, run_name: str, train_dataset: Any = None
               ) -> tuple[dict[str, float], str, str | None]:
    """Run the loop on a TorchTrainer; returns (final metrics, latest checkpoint dir, best one)."""
    args = cfg.args
    scaling = ready_cluster(args)
    datasets, rows_per_worker = None, 0
    if args.data_loader_engine == "ray":
        given = train_dataset if train_dataset is not None and not isinstance(train_dataset, (str, Path, list, tuple)) \
            else None
        ds, rows_per_worker = ray_train_dataset(cfg, given)
        datasets = {"train": ds}
    results = storage.join(cfg.args.output_dir, "ray_results")
    [results_path], results_fs = storage.pyarrow_location([results])
    metric = f"eval_{args.metric_for_best_model}"
    # Ray always keeps the latest checkpoint on top of the `num_to_keep` best: keep the best
    # save_total_limit - 1 by the metric, so at most save_total_limit are on disk (as with the local
    # launcher). Without eval data, or with a limit of 1, keep the most recent by step.
    by_metric = bool(cfg.eval_paths) and args.save_total_limit > 1
    num_to_keep = args.save_total_limit - 1 if by_metric else max(args.save_total_limit, 1)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"loop": cfg, "rows_per_worker": rows_per_worker},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name,
            storage_path=results_path,
            storage_filesystem=results_fs,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=num_to_keep,
                checkpoint_score_attribute=metric if by_metric else "step",
                checkpoint_score_order=("max" if args.greater_is_better else "min") if by_metric else "max",
            ),
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:
        cause = user_error_of(error)
        if cause is None:
            raise  # a crash or a bug: Ray's error, with every worker's traceback
        log.debug("run %s failed on its workers: %s", run_name, error)
        raise cause from None
    latest = result.checkpoint
    if latest is None:
        raise RuntimeError(f"run {run_name} reported no checkpoint")
    best = None
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if scored:
        sign = 1 if args.greater_is_better else -1
        best = max(scored, key=lambda cm: sign * cm[1][metric])[0]
    # Copy the final checkpoint under the run directory so the output is self-contained.
    final_dir = storage.join(run_dir, "final_checkpoint")
    with latest.as_directory() as src:
        storage.put_dir(src, final_dir)
    # Ray names checkpoints as its filesystem does (no scheme): give the best one back as a URL.
    best_dir = None if best is None else best.path if results_fs is None else results + best.path[len(results_path):]
    return dict(result.metrics or {}), final_dir, best_dir
