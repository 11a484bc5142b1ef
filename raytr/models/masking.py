"""Training targets and inference inputs for the causal (CLM) and masked (MLM) objectives.

Every function here is pure: tensors in, tensors out, randomness only from an explicit
`torch.Generator` (torch's default generator when none is given).

Shape legend: B = batch (sessions), T = max sequence length.
Item ids (Categorify's): 0 = padding, 1 = null, 2 = out of vocabulary, FIRST_ITEM_ID (3)..V-1 =
real items. Only real items are ever targets: the head cannot score the reserved ids, so positions
whose target would be one of them get `IGNORE_INDEX`.
"""

from __future__ import annotations

import dataclasses

import torch

from raytr.features import FIRST_ITEM_ID, NULL_ID, OOV_ID, PAD_ID, SessionBatch

__all__ = ["FIRST_ITEM_ID", "IGNORE_INDEX", "MASK_SLOT_ID", "OOV_ID", "PAD_ID"]

IGNORE_INDEX = -100  # label at positions that carry no target (same convention as F.cross_entropy)
MASK_SLOT_ID = NULL_ID  # placeholder item id of the appended MLM slot (its embedding is replaced)


def _predictable(item_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: ids that can be targets (real catalog items, not padding, null or OOV)."""
    return item_ids >= FIRST_ITEM_ID


def causal_targets(item_ids: torch.Tensor) -> torch.Tensor:
    """Next-item labels: `labels[:, t] = item_ids[:, t + 1]`.

    item_ids: [B, T] right-padded. Returns labels [B, T] int64, `IGNORE_INDEX` at the last column
    and wherever the next id is a reserved id (padding, null or OOV).

    Example: [[5, 9, 3, 0]] -> [[9, 3, -100, -100]].
    """
    nxt = torch.full_like(item_ids, IGNORE_INDEX)
    nxt[:, :-1] = item_ids[:, 1:]
    return torch.where(_predictable(nxt), nxt, torch.full_like(nxt, IGNORE_INDEX))


def _rand(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on `like`'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def mlm_mask(
    item_ids: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to mask for the masked-item objective.

    Each predictable item (id >= FIRST_ITEM_ID) is masked independently with `probability`; a session with at
    least one predictable item and no position drawn gets one chosen uniformly among them, so
    every such session contributes a target. Sessions with no predictable item get no mask.

    item_ids: [B, T]. Returns (masked [B, T] bool, labels [B, T] int64) where labels hold the
    original item at masked positions and `IGNORE_INDEX` elsewhere.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mlm probability={probability}: expected 0 < p < 1")
    candidates = _predictable(item_ids)
    masked = (_rand(tuple(item_ids.shape), item_ids, generator) < probability) & candidates
    # At least one mask per session: among candidates, the position with the largest fresh
    # uniform draw is a uniformly random candidate.
    need = candidates.any(dim=1) & ~masked.any(dim=1)  # [B]
    draw = _rand(tuple(item_ids.shape), item_ids, generator).masked_fill(~candidates, -1.0)
    pick = torch.zeros_like(masked).scatter_(1, draw.argmax(dim=1, keepdim=True), True)  # [B, T]
    masked = masked | (pick & need[:, None])
    labels = torch.where(masked, item_ids, torch.full_like(item_ids, IGNORE_INDEX))
    return masked, labels


def _shift_left_if_full(x: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Rows flagged `full` [B] lose their first column (the rest moves left, last column zeroed)."""
    shifted = torch.zeros_like(x)
    shifted[:, :-1] = x[:, 1:]
    return torch.where(full[:, None], shifted, x)


def widen_by_one(batch: SessionBatch) -> SessionBatch:
    """`batch` with one more (padding) column on the right: a batch narrower than the model's T gives
    the MLM slot a column of its own instead of dropping a full row's first event."""
    def widen(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)

    return dataclasses.replace(batch, item_ids=widen(batch.item_ids),
                               categorical={k: widen(v) for k, v in batch.categorical.items()},
                               continuous={k: widen(v) for k, v in batch.continuous.items()})


def mlm_inference_input(batch: SessionBatch) -> tuple[SessionBatch, torch.Tensor]:
    """The MLM input for predicting the next item: a mask slot right after each session's last item.

    A session that already fills all T columns drops its first event to make room. The slot holds
    item id `MASK_SLOT_ID` (so it counts as an event in `batch.mask`) and 0 in every other
    feature; the model replaces the slot's whole embedding with its learned mask embedding.

    Returns (batch with the slot [B, T], slot positions [B] int64).

    Example (T=3): [[5, 9, 0], [4, 6, 8]] -> [[5, 9, 1], [6, 8, 1]], positions [2, 2].
    """
    T = batch.item_ids.shape[1]
    lengths = batch.lengths
    full = lengths >= T  # [B]
    positions = torch.where(full, torch.full_like(lengths, T - 1), lengths)  # [B]
    rows = torch.arange(batch.item_ids.shape[0], device=batch.item_ids.device)  # a SymInt under export, not len()

    item_ids = _shift_left_if_full(batch.item_ids, full)
    item_ids[rows, positions] = MASK_SLOT_ID
    categorical = {}
    for name, col in batch.categorical.items():
        col = _shift_left_if_full(col, full)
        col[rows, positions] = PAD_ID
        categorical[name] = col
    continuous = {}
    for name, col in batch.continuous.items():
        col = _shift_left_if_full(col, full)
        col[rows, positions] = 0.0
        continuous[name] = col
    # The slot ids (MASK_SLOT_ID, PAD_ID) are valid in every spec: an id check still holds.
    return SessionBatch(item_ids=item_ids, categorical=categorical, continuous=continuous,
                        ids_checked=batch.ids_checked), positions


def split_last_item(batch: SessionBatch) -> tuple[SessionBatch, torch.Tensor]:
    """Evaluation split: predict the last item of each session from its prefix.

    Returns (prefix batch [B, T] with the last event of each session replaced by padding in every
    column, targets [B] int64 = the removed item ids). Raises ValueError when a session has fewer
    than 2 events (its prefix would be empty).

    Example: [[5, 9, 3, 0], [7, 4, 0, 0]] -> prefix [[5, 9, 0, 0], [7, 0, 0, 0]], targets [3, 4].
    """
    lengths = batch.lengths
    short = lengths < 2
    if bool(short.any()):
        bad = short.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"split_last_item: {int(short.sum())} session(s) have fewer than 2 events (rows {bad}, "
            f"lengths {lengths[short][:5].tolist()}); each needs a prefix and a target: drop sessions "
            "shorter than 2 (data.min_session_length >= 2)"
        )
    rows = torch.arange(batch.item_ids.shape[0], device=batch.item_ids.device)  # a SymInt under export, not len()
    last = lengths - 1  # [B]
    targets = batch.item_ids[rows, last].clone()

    def drop_last(col: torch.Tensor, fill: float | int) -> torch.Tensor:
        col = col.clone()
        col[rows, last] = fill
        return col

    prefix = SessionBatch(
        item_ids=drop_last(batch.item_ids, PAD_ID),
        categorical={k: drop_last(v, PAD_ID) for k, v in batch.categorical.items()},
        continuous={k: drop_last(v, 0.0) for k, v in batch.continuous.items()},
        ids_checked=batch.ids_checked,
    )
    return prefix, targets
