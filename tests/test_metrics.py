"""RankingMetrics against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raytr.baselines import Popularity
from raytr.evaluation import update_next_item_metrics
from raytr.features import FIRST_ITEM_ID, OOV_ID, SessionBatch
from raytr.metrics import UNRANKED, RankingMetrics, ranks_of_targets
from raytr.models.head import seen_items, top_k
from raytr.models.masking import split_last_item

NEG_INF = float("-inf")
RESERVED = [NEG_INF] * FIRST_ITEM_ID  # padding, null and OOV score -inf, as the head sets them


def brute_force(scores: np.ndarray, targets: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Rank = the last position of the target's score in the list sorted by score descending (ties
    pessimistic); a target scored -inf (not recommendable) is a miss at every k. Average over sessions."""
    sums: dict[str, float] = {}
    count = 0
    for row, target in zip(scores.tolist(), targets.tolist()):
        if target == 0:
            continue
        count += 1
        ordered = sorted(row, reverse=True)
        rank = len(ordered) - ordered[::-1].index(row[target])  # 1-based position of its score's last copy
        for k in ks:
            hit = 1.0 if rank <= k and row[target] != NEG_INF else 0.0
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


def test_a_tied_target_ranks_after_the_items_it_ties_with():
    a = FIRST_ITEM_ID  # items a..a+3 score 1, 1, 1, 0
    scores = torch.tensor([RESERVED + [1.0, 1.0, 1.0, 0.0]])
    assert ranks_of_targets(scores, torch.tensor([a])).tolist() == [3]  # whatever its id
    assert ranks_of_targets(scores, torch.tensor([a + 2])).tolist() == [3]
    assert ranks_of_targets(scores, torch.tensor([a + 3])).tolist() == [4]


def test_a_scorer_gains_nothing_from_ties():
    """Scoring every item alike ranks every target last, whatever the ids are ordered by (Categorify's
    frequency order covers the evaluation days too): a miss at every k below the catalog size."""
    n = 50
    m = RankingMetrics([1, 10, 20])
    m.update(torch.tensor([RESERVED + [0.0] * n] * 4), torch.tensor([FIRST_ITEM_ID + i for i in (0, 1, 7, n - 1)]))
    assert all(value == 0.0 for value in m.compute().values())


def test_nan_scores_rank_last_not_first():
    """A diverged model's NaN scores must not read as perfect hits."""
    a = FIRST_ITEM_ID
    nan = float("nan")
    scores = torch.tensor([RESERVED + [nan, 0.5, 0.9], RESERVED + [nan, nan, nan]])
    assert ranks_of_targets(scores, torch.tensor([a + 1, a + 1])).tolist() == [2, UNRANKED]  # NaN item after 0.5
    assert ranks_of_targets(scores, torch.tensor([a, a])).tolist() == [UNRANKED] * 2  # as -inf: a miss
    m = RankingMetrics([1, 100])
    m.update(torch.full((2, 8), nan), torch.tensor([a + 2, a + 4]))
    assert m.count == 2 and m.compute()["recall@1"] == m.compute()["recall@100"] == 0.0


def test_oov_target_is_a_miss_even_when_k_covers_the_catalog():
    """An OOV/null target scores -inf; ranked among the reserved ids by id, it used to hit at k=10."""
    a = FIRST_ITEM_ID
    scores = torch.tensor([RESERVED + [5.0, 4.0, 3.0, 2.0, 1.0]] * 2)  # 5 real items, V = 8
    m = RankingMetrics([5, 8, 10, 100])
    m.update(scores, torch.tensor([OOV_ID, a + 1]))  # OOV target, and one at rank 2
    out = m.compute()
    assert m.count == 2  # the OOV session still counts in the mean
    for k in (5, 8, 10, 100):
        assert out[f"recall@{k}"] == 0.5
        assert out[f"ndcg@{k}"] == pytest.approx(0.5 / math.log2(3))
        assert out[f"mrr@{k}"] == out[f"map@{k}"] == pytest.approx(0.25)


def test_excluded_seen_target_is_a_miss_when_k_covers_the_remaining_items():
    """With exclude_seen the target, seen earlier in the session, is masked to -inf; `top_k` refuses
    k=5 on that row (1 item left), and the metrics must not count it as a hit there either."""
    a = FIRST_ITEM_ID
    pop = Popularity(a + 5)
    pop.counts[a:] = [5, 4, 3, 2, 1]
    batch = SessionBatch(item_ids=torch.tensor([[a + 1, a + 2, a + 3, a + 4, a + 1]]))  # target a+1 seen first
    m = RankingMetrics([1, 5, 10])
    update_next_item_metrics(m, pop, batch, exclude_seen=True)
    assert m.count == 1
    assert all(value == 0.0 for value in m.compute().values())
    prefix, _ = split_last_item(batch)
    with pytest.raises(ValueError, match="after exclusions"):
        top_k(pop.score_next(prefix), 5, seen_items(prefix.item_ids, a + 5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ranks_on_device_and_half_precision(device, dtype):
    """Same ranks as float32, without a host sync (CUDA raises on one under sync_debug_mode)."""
    a = FIRST_ITEM_ID
    nan = float("nan")
    scores = torch.tensor([RESERVED + [1.0, 2.0, 2.0, NEG_INF, nan]] * 5)
    targets = torch.tensor([a, a + 1, a + 2, a + 3, a + 4])
    expected = [3, 2, 2, UNRANKED, UNRANKED]
    assert ranks_of_targets(scores, targets).tolist() == expected
    scores, targets = scores.to(device, dtype), targets.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        ranks = ranks_of_targets(scores, targets)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert ranks.device.type == device and ranks.dtype == torch.int64
    assert ranks.tolist() == expected


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
    scored = np.concatenate(all_targets)
    recommendable = scored[scored != 0] >= FIRST_ITEM_ID
    assert got["recall@20"] == pytest.approx(recommendable.mean())  # reserved-id targets miss
    assert got["precision@20"] == pytest.approx(recommendable.mean() / 20)


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


def test_update_returns_the_ranks_it_added_one_per_session_kept():
    m = RankingMetrics([1, 2])
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.5], [0.0, 0.0, 0.0, 0.9, 0.5], [0.0, 0.0, 0.0, 0.1, 0.2]])
    ranks = m.update(scores, torch.tensor([4, 0, 3]))  # the padding target is skipped
    assert ranks.tolist() == [2, 2] and m.count == 2
