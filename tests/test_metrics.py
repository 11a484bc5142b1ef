"""RankingMetrics against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raytr.features import FIRST_ITEM_ID
from raytr.metrics import RankingMetrics, ranks_of_targets

NEG_INF = float("-inf")
RESERVED = [NEG_INF] * FIRST_ITEM_ID  # padding, null and OOV score -inf, as the head sets them


def brute_force(scores: np.ndarray, targets: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Rank = position in the list sorted by (score descending, id ascending); average over sessions."""
    sums: dict[str, float] = {}
    count = 0
    for row, target in zip(scores.tolist(), targets.tolist()):
        if target == 0:
            continue
        count += 1
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        rank = order.index(target) + 1
        for k in ks:
            hit = 1.0 if rank <= k else 0.0
            for name, value in (("precision", hit / k), ("recall", hit), ("ndcg", hit / math.log2(rank + 1)),
                                ("map", hit / rank), ("mrr", hit / rank)):
                sums[f"{name}@{k}"] = sums.get(f"{name}@{k}", 0.0) + value
    return {key: value / count for key, value in sums.items()}


def test_hand_computed_example():
    scores = torch.tensor([RESERVED + [0.5, 0.9, 0.1],
                           RESERVED + [0.5, 0.9, 0.1]])
    m = RankingMetrics([1, 2])
    m.update(scores, torch.tensor([FIRST_ITEM_ID, FIRST_ITEM_ID + 1]))  # ranks 2 and 1
    out = m.compute()
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(1.0)
    assert out["precision@2"] == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    assert out["mrr@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["map@1"] == pytest.approx(0.5)
    assert set(out) == {f"{n}@{k}" for n in ("precision", "recall", "ndcg", "map", "mrr") for k in (1, 2)}


def test_tie_rule_smaller_id_wins():
    a = FIRST_ITEM_ID  # items a..a+3 score 1, 1, 1, 0
    scores = torch.tensor([RESERVED + [1.0, 1.0, 1.0, 0.0]])
    assert ranks_of_targets(scores, torch.tensor([a])).tolist() == [1]
    assert ranks_of_targets(scores, torch.tensor([a + 2])).tolist() == [3]
    assert ranks_of_targets(scores, torch.tensor([a + 3])).tolist() == [4]


def test_nan_scores_rank_last_not_first():
    """A diverged model's NaN scores must not read as perfect hits."""
    a = FIRST_ITEM_ID
    nan = float("nan")
    scores = torch.tensor([RESERVED + [nan, 0.5, 0.9], RESERVED + [nan, nan, nan]])
    assert ranks_of_targets(scores, torch.tensor([a, a + 1])).tolist() == [6, 5]  # as -inf: after every smaller id
    m = RankingMetrics([1])
    m.update(torch.full((2, 8), nan), torch.tensor([a + 2, a + 4]))
    assert m.compute()["recall@1"] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_ties_and_k_beyond_catalog(seed):
    rng = np.random.default_rng(seed)
    V = 12
    ks = [1, 3, 5, 10, 20]  # 20 > V
    m = RankingMetrics(ks)
    all_scores, all_targets = [], []
    for batch_size in (1, 7, 16, 3):  # batches of different sizes: averages are over sessions
        scores = rng.integers(0, 4, size=(batch_size, V)).astype(np.float32)  # many ties
        scores[:, :FIRST_ITEM_ID] = NEG_INF
        targets = rng.integers(0, V, size=batch_size)
        targets[rng.random(batch_size) < 0.2] = 0  # padding targets are skipped
        m.update(torch.from_numpy(scores), torch.from_numpy(targets))
        all_scores.append(scores)
        all_targets.append(targets)
    expected = brute_force(np.concatenate(all_scores), np.concatenate(all_targets), ks)
    got = m.compute()
    assert m.count == int((np.concatenate(all_targets) != 0).sum())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["recall@20"] == 1.0 and got["precision@20"] == pytest.approx(1 / 20)


def test_session_average_not_mean_of_batch_means():
    m = RankingMetrics([1])
    hit = torch.tensor([RESERVED + [1.0, 0.0]])
    m.update(hit, torch.tensor([FIRST_ITEM_ID]))  # batch 1: 1 hit
    m.update(hit.repeat(3, 1), torch.tensor([FIRST_ITEM_ID + 1] * 3))  # batch 2: 3 misses
    assert m.compute()["recall@1"] == pytest.approx(0.25)  # mean of batch means would be 0.5


def test_merge_and_load_state_equal_one_pass():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(size=(30, 20)).astype(np.float32))
    targets = torch.from_numpy(rng.integers(FIRST_ITEM_ID, 20, size=30))
    whole = RankingMetrics([5, 10])
    whole.update(scores, targets)

    a, b = RankingMetrics([5, 10]), RankingMetrics([5, 10])
    a.update(scores[:11], targets[:11])
    b.update(scores[11:], targets[11:])
    summed = a.state + b.state  # what all_reduce(SUM) of two ranks' states gives
    a.merge(b)
    assert torch.allclose(a.state, whole.state, rtol=0, atol=1e-12)  # float sums in another order
    c = RankingMetrics([5, 10])
    c.load_state(summed)
    assert c.compute() == pytest.approx(whole.compute())
    assert whole.state.dtype == torch.float64 and whole.state.shape == (1 + 5 * 2,)

    with pytest.raises(ValueError, match="top_k"):
        a.merge(RankingMetrics([5]))
    with pytest.raises(ValueError, match="shape"):
        c.load_state(torch.zeros(3, dtype=torch.float64))


def test_update_ranks_and_reset():
    m = RankingMetrics([2])
    m.update_ranks(torch.tensor([1, 2, 3, 4]))
    out = m.compute()
    assert out["recall@2"] == pytest.approx(0.5)
    assert out["mrr@2"] == pytest.approx((1 + 0.5) / 4)
    with pytest.raises(ValueError, match="1-based"):
        m.update_ranks(torch.tensor([0]))
    m.reset()
    assert m.count == 0
    assert m.compute()["recall@2"] == 0.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        RankingMetrics([0])
    with pytest.raises(ValueError, match="top_k"):
        RankingMetrics([5, 5])
    m = RankingMetrics([1])
    with pytest.raises(ValueError, match="targets must lie"):
        m.update(torch.zeros(1, 4), torch.tensor([4]))


def test_models_metrics_and_baselines_never_import_ray():
    import subprocess
    import sys

    code = (
        "import sys, raytr.models, raytr.metrics, raytr.baselines; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'merlin', 'nvtabular')); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
