"""The hand-off between data and models: what the model's inputs are, and one batch of them.

`FeatureSpec` is derived once from the Merlin schema written by `raytr prepare`
(`raytr.data.schema.feature_spec`) and saved next to a model, so models never import merlin.

Shape legend used across raytr: B = batch (sessions), T = max sequence length,
D = d_model, V = item catalog size (item cardinality, id 0 = padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Categorify's reserved ids: 0 = padding (sequences are right-padded with it), 1 = null, 2 = out of
# vocabulary (unseen, or rarer than freq_threshold). Real items start at 3, ordered by frequency.
PAD_ID = 0
NULL_ID = 1
OOV_ID = 2
FIRST_ITEM_ID = 3  # ids below this are never recommended nor used as targets


@dataclass(frozen=True)
class FeatureSpec:
    """The sequence features a session model consumes, with their sizes.

    item_id: name of the item-id sequence column.
    item_cardinality: V; ids are 0..V-1, real items FIRST_ITEM_ID..V-1.
    max_sequence_length: T; sequences are cut to their last T events.
    categorical: other categorical sequence columns -> cardinality.
    continuous: continuous sequence columns (already normalised by the workflow).
    """

    item_id: str
    item_cardinality: int
    max_sequence_length: int
    categorical: dict[str, int] = field(default_factory=dict)
    continuous: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.item_cardinality <= FIRST_ITEM_ID:
            raise ValueError(
                f"item_cardinality={self.item_cardinality}: expected > {FIRST_ITEM_ID} "
                "(ids 0, 1, 2 are padding, null and out-of-vocabulary)"
            )
        if self.max_sequence_length < 2:
            raise ValueError(f"max_sequence_length={self.max_sequence_length}: expected >= 2")
        for name, card in self.categorical.items():
            if card < 2:
                raise ValueError(f"categorical feature {name!r} has cardinality {card}: expected >= 2")

    @property
    def columns(self) -> list[str]:
        return [self.item_id, *self.categorical, *self.continuous]

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "item_cardinality": self.item_cardinality,
            "max_sequence_length": self.max_sequence_length,
            "categorical": dict(self.categorical),
            "continuous": list(self.continuous),
        }



@dataclass
class SessionBatch:
    """A batch of right-padded sessions.

    Example with B=2, T=4 (item ids after Categorify, 0 = padding):
        item_ids   = [[5, 9, 3, 0],
                      [7, 2, 0, 0]]
        lengths    = [3, 2]
        categorical["category-list"] = [[2, 4, 2, 0], [3, 3, 0, 0]]
        continuous["price-list"]     = [[0.1, -1.2, 0.4, 0.0], [0.9, 0.3, 0.0, 0.0]]
    """

    item_ids: torch.Tensor  # [B, T] int64
    categorical: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T] int64
    continuous: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T] float32
    # The spec whose id ranges a loader already checked (on the whole resident columns, once), so
    # the model need not check them again with a host sync every step. None: unchecked.
    ids_checked: FeatureSpec | None = field(default=None, compare=False)
    # How many positions have a next-item (CLM) target: a next event that is a real item (id >=
    # FIRST_ITEM_ID). Loaders count them on the host, from the ragged columns, so that the model sizes
    # its targets without reading the GPU (a host sync every step). None: unknown, the model counts.
    num_causal_targets: int | None = field(default=None, compare=False)

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True where there is an event."""
        return self.item_ids != PAD_ID

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64 number of events per session."""
        return self.mask.sum(dim=1)

    def __len__(self) -> int:
        return self.item_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SessionBatch":
        return SessionBatch(
            item_ids=self.item_ids.to(device, non_blocking=non_blocking),
            categorical={k: v.to(device, non_blocking=non_blocking) for k, v in self.categorical.items()},
            continuous={k: v.to(device, non_blocking=non_blocking) for k, v in self.continuous.items()},
            ids_checked=self.ids_checked,
            num_causal_targets=self.num_causal_targets,
        )

    def select(self, index: torch.Tensor | slice) -> "SessionBatch":
        """Rows `index` of the batch (used to split evaluation inputs and for tests); their causal
        target count is not known (None)."""
        return SessionBatch(
            item_ids=self.item_ids[index],
            categorical={k: v[index] for k, v in self.categorical.items()},
            continuous={k: v[index] for k, v in self.continuous.items()},
            ids_checked=self.ids_checked,
        )


def check_id_ranges(columns: dict[str, torch.Tensor], cardinalities: dict[str, int]) -> None:
    """Raise ValueError naming the first column with an id outside 0..cardinality-1.

    One host sync for all columns together (their min and max are gathered into one tensor)."""
    names = [name for name, col in columns.items() if col.numel()]
    if not names:
        return
    bounds = torch.stack([torch.stack([columns[n].min(), columns[n].max()]) for n in names]).tolist()
    for name, (lo, hi) in zip(names, bounds):
        cardinality = cardinalities[name]
        if hi >= cardinality or lo < 0:
            bad = hi if hi >= cardinality else lo
            raise ValueError(
                f"column {name!r} has id {bad} (max {hi}, min {lo}) but its cardinality is {cardinality} "
                f"(valid ids 0..{cardinality - 1}); the batch was encoded with a different workflow than this model"
            )
