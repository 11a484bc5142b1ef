"""Next-item evaluation shared by the Trainer, the baselines and incremental runs.

Each session is scored on its prefix and judged on its last item (`split_last_item`). Anything
with `score_next(batch) -> [B, V]` can be evaluated: SessionModel, Popularity, SessionItemKNN.
Plain PyTorch; the metric state is a tensor that callers may all-reduce across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from raytr import storage
from raytr.data.layout import categories_digest, prepared_root
from raytr.features import SessionBatch
from raytr.metrics import RankingMetrics
from raytr.models.head import seen_items
from raytr.models.masking import split_last_item


class Scorer(Protocol):
    def score_next(self, batch: SessionBatch) -> torch.Tensor: ...


@torch.no_grad()
def update_next_item_metrics(
    metrics: RankingMetrics, scorer: Scorer, batch: SessionBatch, exclude_seen: bool = False,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score each session's prefix and add the rank of its last item to `metrics`; returns those
    ranks [B] (every session has a target: `split_last_item` refuses shorter ones). `exclude_seen`
    drops the prefix's items from the ranking; `exclude` [B, V] bool drops more (e.g. a user's
    history before the window)."""
    return metrics.update(*next_item_scores(scorer, batch, exclude_seen, exclude))


@torch.no_grad()
def next_item_scores(
    scorer: Scorer, batch: SessionBatch, exclude_seen: bool = False, exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 scores [B, V] of each session's prefix, its last item [B]), the excluded items at -inf:
    what `update_next_item_metrics` ranks."""
    prefix, targets = split_last_item(batch)
    scores = scorer.score_next(prefix).float()  # [B, V]
    mask = seen_items(prefix.item_ids, scores.shape[1]) if exclude_seen else None
    if exclude is not None:
        mask = exclude if mask is None else mask | exclude
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores, targets


@torch.no_grad()
def evaluate_next_item(
    scorer: Scorer,
    batches: Iterable[SessionBatch],
    top_k: Sequence[int],
    exclude_seen: bool = False,
) -> RankingMetrics:
    """Metrics of `scorer` over all `batches` (sums and counts: averages over sessions)."""
    metrics = RankingMetrics(top_k)
    was_training = getattr(scorer, "training", False)
    if hasattr(scorer, "eval"):
        scorer.eval()
    try:
        for batch in batches:
            if len(batch):
                update_next_item_metrics(metrics, scorer, batch, exclude_seen)
    finally:
        if was_training:
            scorer.train()
    return metrics


def check_same_workflow(bundle: str, data: str) -> None:
    """Refuse prepared `data` whose workflow is not the model `bundle`'s: its ids would stand for
    other items, and the metrics would be wrong without any error. `data` may be a prepared dataset
    or lie in one (its sessions/, a day, a file); either side without a workflow is not checked."""
    theirs, ours = categories_digest(prepared_root(data) or data), categories_digest(bundle)
    if theirs is not None and ours is not None and theirs != ours:
        raise ValueError(f"{data} was prepared by another `raytr prepare` run than the model in {bundle} was "
                         "trained on: its item ids stand for other items. Evaluate on days of the data the model "
                         "was trained with (prepare every day together, then choose them with --days)")


def data_workflow_digest(paths: Sequence[str]) -> str | None:
    """The categories digest of the prepared dataset the session files `paths` lie in (None where
    none does: files outside a `raytr prepare` output). Files of two prepare runs whose workflows
    differ are refused: the same id stands for other items in each."""
    roots = sorted({root for root in (prepared_root(d) for d in {storage.parent(p) for p in paths}) if root})
    digests = {root: categories_digest(root) for root in roots}
    known = {root: digest for root, digest in digests.items() if digest is not None}
    if len(set(known.values())) > 1:
        (first, digest), *rest = known.items()
        other = next(root for root, d in rest if d != digest)
        raise ValueError(f"the data mixes sessions of two `raytr prepare` runs ({first} and {other}): their item ids "
                         "stand for different items; prepare every day together, then choose days from that output")
    return next(iter(known.values()), None)
