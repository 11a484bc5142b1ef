"""Popularity and session item-kNN on tiny hand-made sessions."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from raytr.baselines import Popularity, SessionItemKNN
from raytr.features import FIRST_ITEM_ID, NULL_ID, OOV_ID, SessionBatch

# Real items, in id order: the first real id is FIRST_ITEM_ID (0, 1, 2 are padding, null and OOV).
A, B, C, D, E, F, G, H = range(FIRST_ITEM_ID, FIRST_ITEM_ID + 8)


def catalog(n_items: int) -> int:
    """Item cardinality of a catalog holding the reserved ids and n_items real items."""
    return FIRST_ITEM_ID + n_items


def batch(rows: list[list[int]], T: int = 4) -> SessionBatch:
    return SessionBatch(item_ids=torch.tensor([r + [0] * (T - len(r)) for r in rows]))


def test_popularity_ranks_most_frequent_first():
    V = catalog(6)  # A..F
    pop = Popularity(item_cardinality=V).fit([batch([[A, B, B], [B, C], [D, B]])])
    ids, scores = pop.recommend(batch([[E], [F, A]]), k=3)
    # item B has 4 events; A, C, D have one each and tie: the smaller id comes first
    assert ids.tolist() == [[B, A, C], [B, A, C]]
    assert scores[0].tolist() == [4.0, 1.0, 1.0]
    ids, _ = pop.recommend(batch([[B, A]]), k=2, exclude_seen=True)
    assert ids.tolist() == [[C, D]]
    s = pop.score_next(batch([[A]]))
    assert s.shape == (1, V) and torch.all(s[:, :FIRST_ITEM_ID] == float("-inf"))
    # null and OOV events are never counted, however frequent
    ids, _ = Popularity(V).fit([[OOV_ID, OOV_ID, NULL_ID, NULL_ID, C]]).recommend(batch([[A]]), k=1)
    assert ids.tolist() == [[C]]


def test_knn_recommends_the_item_that_always_follows():
    sessions = [[A, D], [A, D], [B, E], [B, E], [C, F], [A, D, G]]
    knn = SessionItemKNN(item_cardinality=catalog(8)).fit(sessions)
    ids, scores = knn.recommend(batch([[A], [B], [C]]), k=1)
    assert ids.flatten().tolist() == [D, E, F]
    assert scores[0, 0].item() == pytest.approx(1.0)  # D occurs exactly in A's sessions: cosine 1


def test_knn_cosine_values_by_hand():
    knn = SessionItemKNN(item_cardinality=catalog(4)).fit([np.array([A, B]), np.array([A, C]), np.array([A, B, B])])
    sim = knn.similarity.toarray()
    # n(A)=3, n(B)=2, n(C)=1; c(A,B)=2, c(A,C)=1, c(B,C)=0
    assert sim[A, B] == pytest.approx(2 / math.sqrt(6))
    assert sim[A, C] == pytest.approx(1 / math.sqrt(3))
    assert sim[B, C] == 0.0 and sim[A, A] == 0.0
    assert np.allclose(sim, sim.T)


def test_knn_recency_decay_weights_recent_items_more():
    V = catalog(8)
    sessions = [[A, D], [B, E]]
    query = batch([[A, B]])  # B is the most recent event
    equal = SessionItemKNN(V, recency_decay=1.0).fit(sessions).recommend(query, k=2)[0]
    recent = SessionItemKNN(V, recency_decay=0.5).fit(sessions).recommend(query, k=2)[0]
    last_only = SessionItemKNN(V, recency_decay=0.0).fit(sessions).score_next(query)
    assert equal.tolist() == [[D, E]]  # equal scores: tie to the smaller id
    assert recent.tolist() == [[E, D]]
    assert last_only[0, D].item() == 0.0 and last_only[0, E].item() > 0.0


def test_knn_max_neighbors_keeps_the_most_similar():
    V = catalog(6)
    sessions = [[A, B], [A, B], [A, B], [A, C], [A, C], [A, D]]
    full = SessionItemKNN(V).fit(sessions).similarity
    pruned = SessionItemKNN(V, max_neighbors=1).fit(sessions).similarity
    assert full[A].nnz == 3
    assert pruned[A].nnz == 1 and pruned[A, B] == pytest.approx(full[A, B])


def test_knn_self_similarity_recommends_the_session_own_items():
    V = catalog(8)
    sessions = [[A, B], [A, B], [A, C], [B, D]]
    query = batch([[B, A]])  # A is the last event
    plain = SessionItemKNN(V, recency_decay=0.5).fit(sessions)
    assert plain.similarity[A, A] == 0.0
    assert plain.recommend(query, k=1)[0].tolist() == [[B]]  # A's best neighbour, never A itself
    repeat = SessionItemKNN(V, recency_decay=0.5, self_similarity=1.0).fit(sessions)
    # A scores 1 (itself, weight 1) + sim(B, A) / 2; B scores sim(A, B) + 1/2 (itself, weight 1/2)
    sim_ab = 2 / math.sqrt(3 * 3)
    scores = repeat.score_next(query)[0]
    assert scores[A].item() == pytest.approx(1.0 + sim_ab / 2)
    assert scores[B].item() == pytest.approx(sim_ab + 0.5)
    assert repeat.recommend(query, k=2)[0].tolist() == [[A, B]]
    # only items seen in training get a self-similarity; set after pruning, it displaces no neighbour
    assert repeat.similarity[E, E] == 0.0
    pruned = SessionItemKNN(V, max_neighbors=1, self_similarity=0.25).fit(sessions).similarity
    assert pruned[A].nnz == 2 and pruned[A, A] == pytest.approx(0.25) and pruned[A, B] > 0


def test_fit_accepts_batches_arrays_and_lists_alike():
    V = catalog(6)
    rows = [[A, D, 0, 0], [B, E, C, 0]]
    a = SessionItemKNN(V).fit([batch([r[:r.index(0)] for r in rows])]).similarity.toarray()
    b = SessionItemKNN(V).fit([np.array(rows)]).similarity.toarray()
    c = SessionItemKNN(V).fit([[A, D], [B, E, C]]).similarity.toarray()
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_same_evaluation_loop_as_session_model():
    """Baselines go through `evaluate_next_item`, the loop that scores SessionModel, with the ranks
    worked out by hand."""
    from raytr.evaluation import evaluate_next_item, update_next_item_metrics
    from raytr.metrics import RankingMetrics

    V = catalog(7)
    train = [[A, D, E], [A, D, F], [B, E, G], [C, F, D]]
    test = batch([[A, D], [C, F]])  # predict D after A, F after C
    popularity = evaluate_next_item(Popularity(V).fit(train), [test], [1, 3], exclude_seen=False)
    # D (3 events) first, then A, E, F (2 each) by id: D hits at rank 1, F is rank 4.
    assert popularity.count == 2 and popularity.compute()["recall@1"] == 0.5
    assert popularity.compute()["recall@3"] == 0.5 and popularity.compute()["mrr@3"] == 0.5
    knn = evaluate_next_item(SessionItemKNN(V).fit(train), [test], [1], exclude_seen=False)
    assert knn.compute()["recall@1"] == 1.0  # A -> D and C -> F co-occur most

    # More items excluded per session (as MovieLens's earlier history): without D and A, F is rank 2.
    exclude = torch.zeros(2, V, dtype=torch.bool)
    exclude[1, [D, A]] = True
    metrics = RankingMetrics([3])
    update_next_item_metrics(metrics, Popularity(V).fit(train), test, exclude_seen=False, exclude=exclude)
    assert metrics.compute()["recall@3"] == 1.0 and metrics.compute()["mrr@3"] == 0.75
    # Both, as bench/quality.py's MovieLens evaluation asks: after [E], F is rank 4 (D, A, E, F);
    # without D and A rank 2, and without the prefix's E as well rank 1.
    after_e = batch([[A, D], [E, F]])
    for exclude_seen, mrr in ((False, 0.75), (True, 1.0)):
        metrics = RankingMetrics([3])
        update_next_item_metrics(metrics, Popularity(V).fit(train), after_e, exclude_seen, exclude=exclude)
        assert metrics.compute()["mrr@3"] == mrr


def test_errors_name_the_problem():
    V = catalog(6)
    with pytest.raises(ValueError, match=f"item id {V + 1}"):
        Popularity(V).fit([[A, V + 1]])
    with pytest.raises(ValueError, match="recency_decay"):
        SessionItemKNN(V, recency_decay=1.5)
    with pytest.raises(ValueError, match="self_similarity=-0.1"):
        SessionItemKNN(V, self_similarity=-0.1)
    for cls in (Popularity, SessionItemKNN):  # a catalog of reserved ids only
        with pytest.raises(ValueError, match=f"item_cardinality={FIRST_ITEM_ID}: expected >= {FIRST_ITEM_ID + 1}"):
            cls(FIRST_ITEM_ID)
    pop = Popularity(catalog(3)).fit([[A, B]])
    with pytest.raises(ValueError, match="k=4"):
        pop.recommend(batch([[A]]), k=4)  # only 3 items are recommendable


def test_knn_scales_to_a_large_sparse_catalog():
    V = 50_000
    rng = np.random.default_rng(0)
    sessions = [rng.integers(FIRST_ITEM_ID, V, size=rng.integers(2, 10)) for _ in range(3000)]
    start = time.perf_counter()
    knn = SessionItemKNN(V, recency_decay=0.8, max_neighbors=50).fit(sessions)
    scores = knn.score_next(batch([list(s[:4]) for s in sessions[:64]]))
    elapsed = time.perf_counter() - start
    assert scores.shape == (64, V)
    assert knn.similarity.shape == (V, V) and knn.similarity.nnz < 3000 * 90
    assert elapsed < 10.0, elapsed
