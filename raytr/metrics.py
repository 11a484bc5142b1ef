"""Ranking metrics for next-item prediction, kept as sums and a count so they add up exactly.

One relevant item per session (the true next item) at rank r (1 = best):
    recall@k = hit = [r <= k]        precision@k = hit / k
    ndcg@k   = hit / log2(r + 1)     map@k = mrr@k = hit / r
Each is averaged over sessions (not over batches): `state` holds the per-metric sums and the
session count in one float64 tensor, so batches add with `merge` and ranks with `all_reduce`.

Tie rule (pessimistic): a target ranks after every other item with its score,
    rank = #items with a score >= the target's (the target included).
So a scorer gains nothing from ties: scoring every item 0 is a miss at every k < V. (`top_k` orders
tied recommendations by id; ranking the target by id here too would reward a tie whenever item ids
carry information, and Categorify's ids are ordered by frequency over all the data it was fitted on,
evaluation days included.)
A target scored -inf or NaN (a reserved/OOV id, or an item excluded as already seen) cannot be
recommended, so it is a miss at every k (rank UNRANKED) but still counts as a session. For k larger
than the catalog every other session is a hit; precision@k still divides by k.

Shape legend: N = sessions scored, V = item cardinality.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from raytr.features import PAD_ID

logger = logging.getLogger(__name__)

METRIC_NAMES = ("precision", "recall", "ndcg", "map", "mrr")
# Rank of a target that cannot be recommended: above any cut-off, so every metric of it is 0.
UNRANKED = torch.iinfo(torch.int64).max


def ranks_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target under the tie rule. scores [N, V], targets [N] -> [N] int64.
    A target scored -inf or NaN gets UNRANKED: a reserved or excluded target (which `top_k` never
    returns) must not turn into a hit once k covers the catalog. Other NaN scores never compare
    greater or equal, so they rank last, as -inf does."""
    target_scores = scores.gather(1, targets[:, None])  # [N, 1]
    rank = (scores >= target_scores).sum(dim=1)  # the target and everything above or tied with it
    rankable = target_scores[:, 0] > float("-inf")  # False for -inf and NaN; a mask, so no host sync
    return rank.masked_fill(~rankable, UNRANKED)


class RankingMetrics:
    """Accumulates precision/recall/ndcg/map/mrr@k over sessions.

    `state` layout (float64): [count, then for each k in `top_k` the five sums in METRIC_NAMES order].
    """

    def __init__(self, top_k: Sequence[int], device: torch.device | str = "cpu") -> None:
        ks = [int(k) for k in top_k]
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"top_k={list(top_k)}: expected distinct cut-offs >= 1")
        self.top_k = tuple(ks)
        self._state = torch.zeros(1 + len(METRIC_NAMES) * len(ks), dtype=torch.float64, device=device)

    @property
    def keys(self) -> list[str]:
        """Metric names in `compute()` order, e.g. 'ndcg@10'."""
        return [f"{name}@{k}" for k in self.top_k for name in METRIC_NAMES]

    @property
    def state(self) -> torch.Tensor:
        """The float64 [1 + 5 * len(top_k)] sums-and-count tensor (the object itself, for all_reduce)."""
        return self._state

    @property
    def count(self) -> int:
        return int(self._state[0])

    def reset(self) -> None:
        self._state.zero_()

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the state, e.g. with the all_reduced sum of every rank's `state`."""
        if state.shape != self._state.shape:
            raise ValueError(
                f"state has shape {tuple(state.shape)}, expected {tuple(self._state.shape)} for top_k={self.top_k}"
            )
        self._state = state.detach().to(self._state.device, torch.float64).clone()

    def merge(self, other: "RankingMetrics") -> None:
        """Add another accumulator's sums and count (same top_k)."""
        if other.top_k != self.top_k:
            raise ValueError(f"cannot merge metrics with top_k={other.top_k} into top_k={self.top_k}")
        self._state += other.state.to(self._state.device)

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """scores [N, V], targets [N] item ids; sessions whose target is padding (0) are skipped.
        Returns the 1-based ranks added, one per session kept."""
        if scores.ndim != 2 or targets.shape != (scores.shape[0],):
            raise ValueError(
                f"expected scores [N, V] and targets [N], got {tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        keep = targets != PAD_ID
        if bool((targets[keep] < 0).any()) or bool((targets[keep] >= scores.shape[1]).any()):
            raise ValueError(f"targets must lie in 0..{scores.shape[1] - 1} (the score columns)")
        ranks = ranks_of_targets(scores[keep], targets[keep])
        self.update_ranks(ranks)
        return ranks

    def update_ranks(self, ranks: torch.Tensor) -> None:
        """ranks [N]: 1-based rank of each session's target (UNRANKED: a miss at every k)."""
        if ranks.numel() == 0:
            return
        if bool((ranks < 1).any()):
            raise ValueError("ranks are 1-based; got a rank < 1")
        r = ranks.to(torch.float64)
        parts = [torch.tensor([float(r.numel())], dtype=torch.float64, device=r.device)]
        for k in self.top_k:
            hit = (r <= k).to(torch.float64)
            # order matches METRIC_NAMES: precision, recall, ndcg, map, mrr
            parts.append(torch.stack([
                (hit / k).sum(), hit.sum(), (hit / torch.log2(r + 1.0)).sum(), (hit / r).sum(), (hit / r).sum(),
            ]))
        self._state += torch.cat(parts).to(self._state.device)

    def compute(self) -> dict[str, float]:
        """Mean of each metric over all sessions seen (0.0 for all when none were seen)."""
        count = float(self._state[0])
        if count == 0:
            logger.warning("RankingMetrics.compute() with no sessions; returning zeros")
            return {key: 0.0 for key in self.keys}
        means = (self._state[1:] / count).tolist()
        return dict(zip(self.keys, means))
