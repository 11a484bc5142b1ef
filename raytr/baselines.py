"""Non-neural baselines with the same scoring interface as `SessionModel`, so one evaluation loop
(`split_last_item` -> `score_next` -> `RankingMetrics`) serves all of them.

- `Popularity`: scores every item by its number of events in the training sessions.
- `SessionItemKNN`: session-based item-kNN. Item-item similarity is the cosine of their session
  co-occurrence vectors, sim(i, j) = c(i, j) / sqrt(n(i) n(j)) with c the number of sessions holding
  both and n(i) the number holding i. A query session scores item j as sum over its events e of
  w(e) * sim(item(e), j), with w = recency_decay ** (events after e), so recency_decay=1 weights
  all events equally and recency_decay=0 uses the last event only.

In recommendations (`top_k`) ties (items scored equal, e.g. unseen co-occurrence) are broken
towards the smaller id, which Categorify assigns to more frequent items; the metrics rank a tied
target after the items it ties with (`raytr.metrics`). The reserved ids 0 (padding), 1 (null)
and 2 (OOV), i.e. ids < FIRST_ITEM_ID, are never scored or learned.

Shape legend: B = batch (sessions), T = max sequence length, V = item cardinality, k = items returned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from raytr.features import SessionBatch
from raytr.models.head import seen_items, top_k
from raytr.models.masking import FIRST_ITEM_ID

logger = logging.getLogger(__name__)

SessionsLike = Iterable[SessionBatch | np.ndarray | torch.Tensor | list[int]]


def iter_sessions(sessions: SessionsLike) -> Iterator[np.ndarray]:
    """One int64 array of item ids per session, padding removed. Accepts SessionBatch objects,
    [B, T] arrays/tensors (one session per row) and 1-D arrays/lists (one session)."""
    for item in sessions:
        if isinstance(item, SessionBatch):
            rows = item.item_ids.cpu().numpy()
        else:
            arr = item.cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            rows = arr if arr.ndim == 2 else arr.reshape(1, -1)  # [L] -> [1, L]
        for row in rows.astype(np.int64, copy=False):
            yield row[row != 0]


def _check_ids(ids: np.ndarray, num_items: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_items):
        raise ValueError(f"item id {int(ids.max())} (min {int(ids.min())}) outside 0..{num_items - 1} "
                         f"(item_cardinality={num_items})")


def _recommend(
    scores: torch.Tensor, batch: SessionBatch, k: int, exclude_seen: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    exclude = seen_items(batch.item_ids.to(scores.device), scores.shape[1]) if exclude_seen else None
    return top_k(scores, k, exclude)


def _no_special_ids(scores: np.ndarray) -> torch.Tensor:
    out = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    out[:, :FIRST_ITEM_ID] = float("-inf")
    return out


class Popularity:
    """Most popular items by event count in the fitted sessions, the same for every session."""

    def __init__(self, item_cardinality: int) -> None:
        if item_cardinality < FIRST_ITEM_ID + 1:
            raise ValueError(
                f"item_cardinality={item_cardinality}: expected >= {FIRST_ITEM_ID + 1} "
                f"(ids 0..{FIRST_ITEM_ID - 1} are reserved: padding, null, OOV)"
            )
        self.item_cardinality = item_cardinality
        self.counts = np.zeros(item_cardinality, dtype=np.float64)

    def fit(self, sessions: SessionsLike) -> "Popularity":
        counts = np.zeros(self.item_cardinality, dtype=np.float64)
        for ids in iter_sessions(sessions):
            _check_ids(ids, self.item_cardinality)
            counts += np.bincount(ids, minlength=self.item_cardinality)
        counts[:FIRST_ITEM_ID] = 0.0
        self.counts = counts
        return self

    def score_next(self, batch: SessionBatch) -> torch.Tensor:
        """[B, V] float32: the item's event count; reserved ids (< FIRST_ITEM_ID) at -inf."""
        return _no_special_ids(np.broadcast_to(self.counts, (len(batch), self.item_cardinality)))

    def recommend(self, batch: SessionBatch, k: int, exclude_seen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return _recommend(self.score_next(batch), batch, k, exclude_seen)


class SessionItemKNN:
    """Session-based item-kNN over a sparse [V, V] cosine co-occurrence matrix.

    recency_decay: weight of an event = recency_decay ** (number of events after it), in [0, 1].
    max_neighbors: keep only each item's most similar items (None keeps all), bounding memory on
        large catalogs.
    self_similarity: similarity of a training item with itself, in [0, 1]. 0 (classic item-kNN)
        never recommends an item already in the session; 1 ranks the session's own items like
        perfect neighbours, which pays where users return to what they just viewed (e-commerce
        clicks). It is set after the max_neighbors pruning, so it never displaces a neighbour.
    """

    def __init__(
        self,
        item_cardinality: int,
        recency_decay: float = 1.0,
        max_neighbors: int | None = None,
        self_similarity: float = 0.0,
    ) -> None:
        if item_cardinality < FIRST_ITEM_ID + 1:
            raise ValueError(
                f"item_cardinality={item_cardinality}: expected >= {FIRST_ITEM_ID + 1} "
                f"(ids 0..{FIRST_ITEM_ID - 1} are reserved: padding, null, OOV)"
            )
        if not 0.0 <= recency_decay <= 1.0:
            raise ValueError(f"recency_decay={recency_decay}: expected 0 <= decay <= 1")
        if max_neighbors is not None and max_neighbors < 1:
            raise ValueError(f"max_neighbors={max_neighbors}: expected >= 1 or None")
        if not 0.0 <= self_similarity <= 1.0:
            raise ValueError(f"self_similarity={self_similarity}: expected 0 <= similarity <= 1")
        self.item_cardinality = item_cardinality
        self.recency_decay = recency_decay
        self.max_neighbors = max_neighbors
        self.self_similarity = self_similarity
        self.similarity: sp.csr_matrix = sp.csr_matrix((item_cardinality, item_cardinality), dtype=np.float32)

    def fit(self, sessions: SessionsLike) -> "SessionItemKNN":
        V = self.item_cardinality
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        n_sessions = 0
        for ids in iter_sessions(sessions):
            _check_ids(ids, V)
            items = np.unique(ids[ids >= FIRST_ITEM_ID])
            rows.append(np.full(items.size, n_sessions, dtype=np.int64))
            cols.append(items)
            n_sessions += 1
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        sessions_items = sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(n_sessions, V))  # [S, V]
        co = (sessions_items.T @ sessions_items).tocsr()  # [V, V] sessions holding both items
        co.setdiag(0.0)
        co.eliminate_zeros()
        n = np.asarray(sessions_items.sum(axis=0)).ravel()  # [V] sessions holding each item
        inv = np.zeros(V, dtype=np.float64)
        inv[n > 0] = 1.0 / np.sqrt(n[n > 0])
        sim = sp.diags(inv) @ co @ sp.diags(inv)  # cosine: c(i, j) / sqrt(n(i) n(j))
        sim = sp.csr_matrix(sim, dtype=np.float32)
        if self.max_neighbors is not None:
            sim = _keep_top_per_row(sim, self.max_neighbors)
        if self.self_similarity > 0.0:
            sim = sp.csr_matrix(sim + sp.diags(np.where(n > 0, self.self_similarity, 0.0)), dtype=np.float32)
        self.similarity = sim
        logger.info("SessionItemKNN: %d sessions, %d non-zero similarities", n_sessions, sim.nnz)
        return self

    def _query(self, batch: SessionBatch) -> sp.csr_matrix:
        """[B, V] sparse event weights of each query session."""
        ids = batch.item_ids.cpu().numpy()  # [B, T]
        _check_ids(ids, self.item_cardinality)
        mask = ids != 0
        lengths = mask.sum(axis=1)
        after = lengths[:, None] - 1 - np.arange(ids.shape[1])[None, :]  # [B, T] events after each position
        weights = np.where(mask, np.power(self.recency_decay, np.maximum(after, 0)), 0.0)
        b, t = np.nonzero(mask & (ids >= FIRST_ITEM_ID))
        # duplicates (an item seen twice) are summed by the csr constructor
        return sp.csr_matrix((weights[b, t], (b, ids[b, t])), shape=(ids.shape[0], self.item_cardinality))

    def score_next(self, batch: SessionBatch) -> torch.Tensor:
        """[B, V] float32 kNN scores; reserved ids (< FIRST_ITEM_ID) at -inf."""
        scores = (self._query(batch) @ self.similarity).toarray()  # [B, V] @ [V, V] -> [B, V]
        return _no_special_ids(scores)

    def recommend(self, batch: SessionBatch, k: int, exclude_seen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return _recommend(self.score_next(batch), batch, k, exclude_seen)


def _keep_top_per_row(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    """Each row's n largest entries (ties to the smaller column id)."""
    m = m.tocsr()
    m.sort_indices()
    data, indices, indptr = [], [], [0]
    for i in range(m.shape[0]):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        d, c = m.data[lo:hi], m.indices[lo:hi]
        if d.size > n:
            keep = np.lexsort((c, -d))[:n]  # by value descending, then column ascending
            keep.sort()
            d, c = d[keep], c[keep]
        data.append(d)
        indices.append(c)
        indptr.append(indptr[-1] + d.size)
    return sp.csr_matrix(
        (np.concatenate(data) if data else np.zeros(0, np.float32),
         np.concatenate(indices) if indices else np.zeros(0, np.int32), np.asarray(indptr)),
        shape=m.shape,
    )
