"""Incremental (time-window) evaluation: train on day t, evaluate on day t+1, for a range of days.

mode "finetune": the model trained up to day t-1 continues on day t (one model, a fresh LR
schedule per window); the baselines are fitted on the days start_day..t, the data the model has seen
(a day whose next day has no sessions is trained on, not evaluated).
mode "retrain": a new model per window, trained on day t only; baselines fitted on day t only.
mode "expanding": a new model per window, trained on the days start_day..t, the data the baselines
are fitted on (each window is a train/test split of its own, as one `raytr train` on those days).

Writes to the output directory: incremental.csv and incremental.json (metrics per evaluated day,
for the model and each baseline, and their averages), incremental.png (a plot per metric) and
train/, the last window's model with the data's workflow beside it (a model bundle).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pandas as pd

from raytr import storage
from raytr.baselines import Popularity, SessionItemKNN
from raytr.bundle import attach_preprocessing
from raytr.config import ConfigError, RaytrConfig
from raytr.data.loaders import DataLoader
from raytr.data.layout import available_days, day_paths
from raytr.data.schema import feature_spec, load_schema
from raytr.evaluation import evaluate_next_item
from raytr.features import FIRST_ITEM_ID
from raytr.models import SessionModel
from raytr.training.trainer import TRAIN_OUTPUT_MARKERS, Trainer, check_train_output

log = logging.getLogger(__name__)

# What makes a directory an earlier `run_incremental` output it may write into again: its tables,
# or what its train/ Trainer writes first (a crashed run); a bare train/ folder is anybody's.
INCREMENTAL_OUTPUT_MARKERS = ("incremental.json", *(f"train/{marker}" for marker in TRAIN_OUTPUT_MARKERS))


@dataclass(frozen=True)
class IncrementalResult:
    table: pd.DataFrame  # one row per (evaluated day, model name)
    averages: pd.DataFrame  # one row per model name
    output_dir: str  # a local path or a URL


def evaluate_baselines(spec, train_paths: list[str], eval_paths: list[str], top_k, exclude_seen: bool,
                       engine: str = "pyarrow", knn_recency_decay: float = 1.0,
                       knn_self_similarity: float = 0.0) -> dict[str, dict[str, float]]:
    """Popularity and session item-kNN fitted on `train_paths`, evaluated like the model. The kNN's
    recency decay and self-similarity are not tuned here: bench/quality.py chooses them on
    validation and passes them on."""
    def batches(paths: list[str]):
        return DataLoader(spec, paths, 1024, shuffle=False, engine=engine)

    results = {}
    for name, baseline in (("popularity", Popularity(spec.item_cardinality)),
                           ("item_knn", SessionItemKNN(spec.item_cardinality, recency_decay=knn_recency_decay,
                                                      self_similarity=knn_self_similarity))):
        baseline.fit(batches(train_paths))
        results[name] = evaluate_next_item(baseline, batches(eval_paths), top_k, exclude_seen).compute()
    return results


def run_incremental(
    config: RaytrConfig,
    data_dir: str | Path,
    output_dir: str | Path,
    start_day: int | None = None,
    end_day: int | None = None,
    mode: Literal["finetune", "retrain", "expanding"] = "finetune",
    baselines: bool = True,
    knn_recency_decay: float = 1.0,
    knn_self_similarity: float = 0.0,
) -> IncrementalResult:
    """Train on each day t in [start_day, end_day - 1] and evaluate on day t + 1 (with `baselines`,
    popularity and item-kNN fitted on the days seen so far; `knn_recency_decay` and
    `knn_self_similarity` as SessionItemKNN's recency_decay and self_similarity)."""
    output_dir = storage.normalize(output_dir)
    if config.training.resume_from_checkpoint:  # every window's Trainer would start from it
        raise ConfigError(f"training.resume_from_checkpoint={config.training.resume_from_checkpoint!r}: raytr "
                          "incremental trains its windows from a new model (finetune: one model through the "
                          "days), so it takes no checkpoint to resume; unset it")
    # Before a day is trained: the windows write train/ and the tables into it, never into the data.
    check_train_output(output_dir, [data_dir], markers=INCREMENTAL_OUTPUT_MARKERS)
    days = available_days(data_dir)
    if len(days) < 2:
        raise ValueError(f"{data_dir} has {len(days)} day(s) of sessions; incremental evaluation needs >= 2")
    start = start_day if start_day is not None else days[0]
    end = end_day if end_day is not None else days[-1]
    windows = [d for d in days if start <= d < end and d + 1 in days]
    if not windows:
        raise ValueError(f"no day t with t and t+1 both in {days} between start_day={start} and end_day={end}")
    if mode not in ("finetune", "retrain", "expanding"):
        raise ValueError(f"mode={mode!r}: expected 'finetune', 'retrain' or 'expanding'")
    # finetune: the model trains on every day of the range up to the last window, also one whose
    # next day has no sessions (it is not evaluated then), so that it has seen what the baselines
    # are fitted on.
    trained = [d for d in days if start <= d <= windows[-1]] if mode == "finetune" else windows
    skipped = [d for d in trained if d not in windows]
    log.info("incremental (%s): train on days %s, evaluate on days %s", mode, trained, [d + 1 for d in windows])
    if skipped:
        log.warning("incremental: no sessions on day(s) %s: day(s) %s are trained on, not evaluated",
                    [d + 1 for d in skipped], skipped)
    if end_day is not None and end_day > days[-1]:
        log.warning("incremental: end_day=%d is after the last day with sessions (%d)", end_day, days[-1])
    if baselines:  # a bad kNN setting fails now, not after the first day's training
        SessionItemKNN(FIRST_ITEM_ID + 1, recency_decay=knn_recency_decay, self_similarity=knn_self_similarity)
    spec = feature_spec(load_schema(data_dir), config.training.max_sequence_length)
    args = config.training
    rows = []
    model = SessionModel(spec, config.model, seed=args.seed)
    trainer = Trainer(model, replace(args, output_dir=storage.join(output_dir, "train")))
    for day in trained:
        if mode != "finetune":  # a new Trainer a window, so its own run name (one run per Trainer call else)
            window_args = replace(trainer.args, run_name=args.run_name and f"{args.run_name}-day{day}")
            trainer = Trainer(SessionModel(spec, config.model, seed=args.seed), window_args)
        else:
            trainer.reset_lr_scheduler()
        seen_days = [day] if mode == "retrain" else [d for d in days if start <= d <= day]  # the baselines'
        # finetune: the days before were trained on in the windows before
        window_days = seen_days if mode == "expanding" else [day]
        trainer.train_dataset = day_paths(data_dir, window_days)
        trainer.eval_dataset = day_paths(data_dir, [day + 1]) if day in windows else None
        log.info("incremental: train on day(s) %s%s", window_days, f", evaluate on day {day + 1}" if day in windows
                 else "")
        trainer.train()
        trainer.wipe_memory()
        if day not in windows:
            continue
        metrics = trainer.evaluate(metric_key_prefix="eval")
        rows.append({"day": day + 1, "model": config.model.body,
                     **{k.removeprefix("eval_"): v for k, v in metrics.items()}})
        if baselines:
            for name, values in evaluate_baselines(spec, day_paths(data_dir, seen_days),
                                                   day_paths(data_dir, [day + 1]), args.metrics_top_k,
                                                   args.exclude_seen,
                                                   knn_recency_decay=knn_recency_decay,
                                                   knn_self_similarity=knn_self_similarity).items():
                rows.append({"day": day + 1, "model": name, **values})
    # train/ holds the last window's model: with the workflow beside it, it is a model bundle that
    # `raytr evaluate` can check data against and `raytr serve` can serve.
    attach_preprocessing(data_dir, storage.join(output_dir, "train"))
    table = pd.DataFrame(rows)
    averages = table.drop(columns=["day"]).groupby("model", sort=False).mean().reset_index()
    with storage.writable_dir(output_dir) as local:
        table.to_csv(local / "incremental.csv", index=False)
        (local / "incremental.json").write_text(json.dumps(
            {"mode": mode, "per_day": table.to_dict(orient="records"), "average": averages.to_dict(orient="records")},
            indent=2))
        plot_incremental(table, local / "incremental.png", mode)
    return IncrementalResult(table=table, averages=averages, output_dir=output_dir)


def plot_incremental(table: pd.DataFrame, path: Path, mode: str = "finetune",
                     metrics: tuple[str, ...] = ("ndcg@20", "recall@20")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = tuple(m for m in metrics if m in table.columns) or tuple(
        c for c in table.columns if c not in ("day", "model"))[:2]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, group in table.groupby("model", sort=False):
            ax.plot(group["day"], group[metric], marker="o", label=name)
        ax.set_xlabel("evaluated day")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    trained = {"finetune": "day t, continuing", "retrain": "day t", "expanding": "days 1..t"}.get(mode, mode)
    fig.suptitle(f"{mode}: train on {trained}, evaluate on day t+1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
