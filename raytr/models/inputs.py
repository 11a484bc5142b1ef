"""Input layer: one vector per event from the item id and its side features.

Shape legend: B = batch (sessions), T = max sequence length, D = d_model, V = item cardinality,
C = number of continuous features, E = `categorical_dim`.
"""

from __future__ import annotations

import torch
from torch import nn

from raytr.config import ModelConfig
from raytr.features import PAD_ID, FeatureSpec, SessionBatch


class SessionInputs(nn.Module):
    """Embeds a `SessionBatch` into [B, T, D].

    - item ids: `item_embedding` [V, D] (also the output head's weight when `tie_weights`),
    - each categorical feature: an embedding [cardinality, E],
    - continuous features: one Linear over the C values of an event,
    - aggregation "concat": [item D | cat E ... | continuous E] -> Linear -> D;
      "sum": item D + each side feature projected to D,
    - then LayerNorm and dropout.

    Positions flagged in `mask_positions` (MLM) get a learned mask vector in place of the whole
    aggregated event vector, so no feature of a masked event (e.g. its category) leaks the target.
    """

    def __init__(self, spec: FeatureSpec, config: ModelConfig) -> None:
        super().__init__()
        self.spec = spec
        self.aggregation = config.aggregation
        D, E = config.d_model, config.categorical_dim
        self.categorical_names = list(spec.categorical)
        self.continuous_names = list(spec.continuous)

        self.item_embedding = nn.Embedding(spec.item_cardinality, D, padding_idx=PAD_ID)
        # ModuleList (not ModuleDict) because feature names may contain "." which ModuleDict rejects.
        self.categorical_embeddings = nn.ModuleList(
            nn.Embedding(card, E, padding_idx=PAD_ID) for card in spec.categorical.values()
        )
        n_cont = len(self.continuous_names)
        if config.aggregation == "concat":
            self.continuous_projection = nn.Linear(n_cont, E) if n_cont else None
            width = D + E * len(self.categorical_names) + (E if n_cont else 0)
            self.concat_projection: nn.Linear | None = nn.Linear(width, D)
            self.categorical_projections = nn.ModuleList()
        else:  # "sum"
            self.continuous_projection = nn.Linear(n_cont, D) if n_cont else None
            self.concat_projection = None
            self.categorical_projections = nn.ModuleList(
                nn.Linear(E, D, bias=False) for _ in self.categorical_names
            )
        self.mask_embedding = nn.Parameter(torch.empty(D)) if config.objective == "mlm" else None
        self.norm = nn.LayerNorm(D)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        for emb in self.categorical_embeddings:
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()
            for emb in self.categorical_embeddings:
                emb.weight[PAD_ID].zero_()
        if self.mask_embedding is not None:
            nn.init.normal_(self.mask_embedding, std=0.02)

    def forward(self, batch: SessionBatch, mask_positions: torch.Tensor | None = None) -> torch.Tensor:
        """batch: [B, T] columns; mask_positions: optional [B, T] bool. Returns [B, T, D]."""
        x = self.item_embedding(batch.item_ids)  # [B, T, D]
        cats = [emb(batch.categorical[n]) for n, emb in zip(self.categorical_names, self.categorical_embeddings)]
        cont = None
        if self.continuous_projection is not None:
            values = torch.stack([batch.continuous[n] for n in self.continuous_names], dim=-1)  # [B, T, C]
            cont = self.continuous_projection(values.to(x.dtype))  # [B, T, E] (concat) or [B, T, D] (sum)

        if self.concat_projection is not None:
            parts = [x, *cats] + ([cont] if cont is not None else [])
            x = self.concat_projection(torch.cat(parts, dim=-1))  # [B, T, D + k*E] -> [B, T, D]
        else:
            for proj, c in zip(self.categorical_projections, cats):
                x = x + proj(c)  # [B, T, E] -> [B, T, D]
            if cont is not None:
                x = x + cont

        if mask_positions is not None:
            if self.mask_embedding is None:
                raise ValueError("mask_positions given, but this model has no mask embedding (objective is 'clm')")
            x = torch.where(mask_positions[..., None], self.mask_embedding.to(x.dtype), x)
        return self.dropout(self.norm(x))
