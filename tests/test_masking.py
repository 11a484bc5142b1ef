"""Causal / masked objectives on tiny tensors computed by hand."""

from __future__ import annotations

import pytest
import torch

from raytr.features import FIRST_ITEM_ID, NULL_ID, OOV_ID, SessionBatch
from raytr.models.masking import (
    IGNORE_INDEX,
    MASK_SLOT_ID,
    causal_targets,
    mlm_inference_input,
    mlm_mask,
    split_last_item,
)

X = IGNORE_INDEX


def test_causal_targets_shift_left_and_ignore_padding_null_and_oov():
    ids = torch.tensor([[5, 9, FIRST_ITEM_ID, 0],
                        [7, NULL_ID, 4, 6],
                        [7, OOV_ID, 4, 6],
                        [8, 0, 0, 0]])
    expected = torch.tensor([[9, FIRST_ITEM_ID, X, X],  # the first real item is a target
                             [X, 4, 6, X],  # the target NULL_ID cannot be predicted
                             [X, 4, 6, X],  # nor can OOV_ID
                             [X, X, X, X]])
    assert torch.equal(causal_targets(ids), expected)


def test_mlm_mask_only_real_items_and_labels_are_originals():
    ids = torch.tensor([[5, 9, FIRST_ITEM_ID, 0, 0],
                        [7, NULL_ID, 4, 6, OOV_ID],
                        [NULL_ID, OOV_ID, 0, 0, 0]])  # no predictable item: never masked
    for seed in range(20):
        masked, labels = mlm_mask(ids, 0.5, torch.Generator().manual_seed(seed))
        assert not masked[ids < FIRST_ITEM_ID].any()  # padding, null and OOV never masked
        assert masked[:2].any(dim=1).all()  # at least one per session with candidates
        assert not masked[2].any()
        assert torch.equal(labels[masked], ids[masked])
        assert (labels[~masked] == X).all()


def test_mlm_mask_is_seeded_and_roughly_respects_probability():
    ids = torch.randint(FIRST_ITEM_ID, 50, (400, 20), generator=torch.Generator().manual_seed(0))
    a = mlm_mask(ids, 0.2, torch.Generator().manual_seed(1))
    b = mlm_mask(ids, 0.2, torch.Generator().manual_seed(1))
    c = mlm_mask(ids, 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    rate = a[0].float().mean().item()
    assert 0.17 < rate < 0.23, rate


def test_mlm_mask_at_least_one_even_with_tiny_probability():
    ids = torch.tensor([[5, 9, 3, 0], [7, 8, 0, 0]])
    masked, labels = mlm_mask(ids, 1e-9, torch.Generator().manual_seed(0))
    assert masked.sum(dim=1).tolist() == [1, 1]
    assert (labels != X).sum().item() == 2


def test_mlm_mask_rejects_bad_probability():
    with pytest.raises(ValueError, match="probability"):
        mlm_mask(torch.tensor([[FIRST_ITEM_ID, FIRST_ITEM_ID + 1]]), 1.0)


def test_mlm_inference_input_appends_slot_and_drops_first_when_full():
    batch = SessionBatch(
        item_ids=torch.tensor([[5, 9, 0], [4, 6, 8]]),
        categorical={"c": torch.tensor([[2, 3, 0], [4, 5, 6]])},
        continuous={"p": torch.tensor([[0.5, 0.25, 0.0], [1.0, 2.0, 3.0]])},
    )
    slotted, positions = mlm_inference_input(batch)
    assert torch.equal(slotted.item_ids, torch.tensor([[5, 9, MASK_SLOT_ID], [6, 8, MASK_SLOT_ID]]))
    assert torch.equal(slotted.categorical["c"], torch.tensor([[2, 3, 0], [5, 6, 0]]))
    assert torch.equal(slotted.continuous["p"], torch.tensor([[0.5, 0.25, 0.0], [2.0, 3.0, 0.0]]))
    assert positions.tolist() == [2, 2]
    assert torch.equal(batch.item_ids, torch.tensor([[5, 9, 0], [4, 6, 8]]))  # input untouched


def test_mlm_inference_input_short_session():
    batch = SessionBatch(item_ids=torch.tensor([[7, 0, 0, 0]]))
    slotted, positions = mlm_inference_input(batch)
    assert slotted.item_ids.tolist() == [[7, MASK_SLOT_ID, 0, 0]]
    assert positions.tolist() == [1]


def test_split_last_item():
    batch = SessionBatch(
        item_ids=torch.tensor([[5, 9, 3, 0], [7, 4, 0, 0]]),
        categorical={"c": torch.tensor([[2, 4, 2, 0], [3, 3, 0, 0]])},
        continuous={"p": torch.tensor([[0.1, -1.2, 0.4, 0.0], [0.9, 0.3, 0.0, 0.0]])},
    )
    prefix, targets = split_last_item(batch)
    assert targets.tolist() == [3, 4]
    assert prefix.item_ids.tolist() == [[5, 9, 0, 0], [7, 0, 0, 0]]
    assert prefix.categorical["c"].tolist() == [[2, 4, 0, 0], [3, 0, 0, 0]]
    assert torch.allclose(prefix.continuous["p"], torch.tensor([[0.1, -1.2, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0]]))
    assert batch.item_ids.tolist() == [[5, 9, 3, 0], [7, 4, 0, 0]]  # input untouched


def test_split_last_item_rejects_short_sessions():
    batch = SessionBatch(item_ids=torch.tensor([[5, 9, 0], [7, 0, 0]]))
    with pytest.raises(ValueError, match="fewer than 2 events"):
        split_last_item(batch)
