"""Tiny specs, batches and configs shared by the model tests (kept out of conftest.py on purpose)."""

from __future__ import annotations

import torch

from raytr.config import ModelConfig
from raytr.features import FIRST_ITEM_ID, OOV_ID, FeatureSpec, SessionBatch

V = 40  # item cardinality: ids FIRST_ITEM_ID..39 are real items
T = 6

# Every body x objective combination ModelConfig allows.
ALLOWED = [
    ("gpt2", "clm"),
    ("llama", "clm"),
    ("bert", "clm"),
    ("bert", "mlm"),
    ("xlnet", "clm"),
    ("xlnet", "mlm"),
    ("gru", "clm"),
]
CAUSAL = [combo for combo in ALLOWED if combo[1] == "clm"]


def tiny_spec(with_features: bool = True) -> FeatureSpec:
    if not with_features:
        return FeatureSpec(item_id="item_id-list", item_cardinality=V, max_sequence_length=T)
    return FeatureSpec(
        item_id="item_id-list",
        item_cardinality=V,
        max_sequence_length=T,
        categorical={"category-list": 7},
        continuous=("price-list",),
    )


def tiny_config(body: str = "gpt2", objective: str = "clm", **overrides) -> ModelConfig:
    values = dict(body=body, objective=objective, d_model=16, n_layers=2, n_heads=2, dropout=0.1,
                  categorical_dim=4, num_negatives=16, logits_chunk_size=5)
    values.update(overrides)
    return ModelConfig(**values)


def make_batch(
    item_ids: list[list[int]] | torch.Tensor, spec: FeatureSpec | None = None, seed: int = 0
) -> SessionBatch:
    """A batch whose side features are derived from the ids (category = id % 7, random prices)."""
    spec = spec or tiny_spec()
    ids = torch.as_tensor(item_ids, dtype=torch.long)
    real = ids != 0
    gen = torch.Generator().manual_seed(seed)
    categorical = {name: torch.where(real, 1 + ids % (card - 1), 0) for name, card in spec.categorical.items()}
    continuous = {name: torch.randn(ids.shape, generator=gen) * real for name in spec.continuous}
    return SessionBatch(item_ids=ids, categorical=categorical, continuous=continuous)


def random_batch(B: int = 5, seed: int = 0, spec: FeatureSpec | None = None, min_len: int = 2) -> SessionBatch:
    """B right-padded sessions of random length in min_len..T, real items FIRST_ITEM_ID..V-1 with an
    OOV id now and then."""
    spec = spec or tiny_spec()
    gen = torch.Generator().manual_seed(seed)
    T_ = spec.max_sequence_length
    lengths = torch.randint(min_len, T_ + 1, (B,), generator=gen)
    lengths[0] = T_  # at least one full session
    ids = torch.randint(FIRST_ITEM_ID, spec.item_cardinality, (B, T_), generator=gen)
    ids[ids == 13] = OOV_ID  # an out-of-vocabulary item now and then
    ids = ids * (torch.arange(T_)[None, :] < lengths[:, None])
    return make_batch(ids, spec, seed=seed)
