"""Popularity and session item-kNN on tiny hand-made sessions."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from raytr.baselines import Popularity, SessionItemKNN
from raytr.features import SessionBatch
from raytr.metrics import RankingMetrics
from raytr.models.masking import split_last_item


def batch(rows: list[list[int]], T: int = 4) -> SessionBatch:
    return SessionBatch(item_ids=torch.tensor([r + [0] * (T - len(r)) for r in rows]))


def test_popularity_ranks_most_frequent_first():
    pop = Popularity(item_cardinality=8).fit([batch([[2, 3, 3], [3, 4], [5, 3]])])
    ids, scores = pop.recommend(batch([[6], [7, 2]]), k=3)
    # item 3 has 4 events; 2, 4, 5 have one each and tie: the smaller id comes first
    assert ids.tolist() == [[3, 2, 4], [3, 2, 4]]
    assert scores[0].tolist() == [4.0, 1.0, 1.0]
    ids, _ = pop.recommend(batch([[3, 2]]), k=2, exclude_seen=True)
    assert ids.tolist() == [[4, 5]]
    s = pop.score_next(batch([[2]]))
    assert s.shape == (1, 8) and torch.all(s[:, :2] == float("-inf"))


def test_knn_recommends_the_item_that_always_follows():
    sessions = [[2, 5], [2, 5], [3, 6], [3, 6], [4, 7], [2, 5, 8]]
    knn = SessionItemKNN(item_cardinality=10).fit(sessions)
    ids, scores = knn.recommend(batch([[2], [3], [4]]), k=1)
    assert ids.flatten().tolist() == [5, 6, 7]
    assert scores[0, 0].item() == pytest.approx(1.0)  # 5 occurs exactly in 2's sessions: cosine 1


def test_knn_cosine_values_by_hand():
    knn = SessionItemKNN(item_cardinality=6).fit([np.array([2, 3]), np.array([2, 4]), np.array([2, 3, 3])])
    sim = knn.similarity.toarray()
    # n(2)=3, n(3)=2, n(4)=1; c(2,3)=2, c(2,4)=1, c(3,4)=0
    assert sim[2, 3] == pytest.approx(2 / math.sqrt(6))
    assert sim[2, 4] == pytest.approx(1 / math.sqrt(3))
    assert sim[3, 4] == 0.0 and sim[2, 2] == 0.0
    assert np.allclose(sim, sim.T)


def test_knn_recency_decay_weights_recent_items_more():
    sessions = [[2, 5], [3, 6]]
    query = batch([[2, 3]])  # 3 is the most recent event
    equal = SessionItemKNN(10, recency_decay=1.0).fit(sessions).recommend(query, k=2)[0]
    recent = SessionItemKNN(10, recency_decay=0.5).fit(sessions).recommend(query, k=2)[0]
    last_only = SessionItemKNN(10, recency_decay=0.0).fit(sessions).score_next(query)
    assert equal.tolist() == [[5, 6]]  # equal scores: tie to the smaller id
    assert recent.tolist() == [[6, 5]]
    assert last_only[0, 5].item() == 0.0 and last_only[0, 6].item() > 0.0


def test_knn_max_neighbors_keeps_the_most_similar():
    sessions = [[2, 3], [2, 3], [2, 3], [2, 4], [2, 4], [2, 5]]
    full = SessionItemKNN(8).fit(sessions).similarity
    pruned = SessionItemKNN(8, max_neighbors=1).fit(sessions).similarity
    assert full[2].nnz == 3
    assert pruned[2].nnz == 1 and pruned[2, 3] == pytest.approx(full[2, 3])


def test_fit_accepts_batches_arrays_and_lists_alike():
    rows = [[2, 5, 0, 0], [3, 6, 4, 0]]
    a = SessionItemKNN(8).fit([batch([r[:r.index(0)] for r in rows])]).similarity.toarray()
    b = SessionItemKNN(8).fit([np.array(rows)]).similarity.toarray()
    c = SessionItemKNN(8).fit([[2, 5], [3, 6, 4]]).similarity.toarray()
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_same_evaluation_loop_as_session_model():
    train = [[2, 5, 6], [2, 5, 7], [3, 6, 8], [4, 7, 5]]
    test = batch([[2, 5], [4, 7]])
    for model in (Popularity(9).fit(train), SessionItemKNN(9).fit(train)):
        prefix, targets = split_last_item(test)
        metrics = RankingMetrics([1, 3])
        metrics.update(model.score_next(prefix), targets)
        out = metrics.compute()
        assert metrics.count == 2 and 0.0 <= out["recall@1"] <= out["recall@3"] <= 1.0
    knn = SessionItemKNN(9).fit(train)
    prefix, targets = split_last_item(test)
    metrics = RankingMetrics([1])
    metrics.update(knn.score_next(prefix), targets)
    assert metrics.compute()["recall@1"] == 1.0  # 2 -> 5 and 4 -> 7 co-occur most


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="item id 9"):
        Popularity(8).fit([[2, 9]])
    with pytest.raises(ValueError, match="recency_decay"):
        SessionItemKNN(8, recency_decay=1.5)
    pop = Popularity(5).fit([[2, 3]])
    with pytest.raises(ValueError, match="k=4"):
        pop.recommend(batch([[2]]), k=4)


def test_knn_scales_to_a_large_sparse_catalog():
    V = 50_000
    rng = np.random.default_rng(0)
    sessions = [rng.integers(2, V, size=rng.integers(2, 10)) for _ in range(3000)]
    start = time.perf_counter()
    knn = SessionItemKNN(V, recency_decay=0.8, max_neighbors=50).fit(sessions)
    scores = knn.score_next(batch([list(s[:4]) for s in sessions[:64]]))
    elapsed = time.perf_counter() - start
    assert scores.shape == (64, V)
    assert knn.similarity.shape == (V, V) and knn.similarity.nnz < 3000 * 90
    assert elapsed < 10.0, elapsed
