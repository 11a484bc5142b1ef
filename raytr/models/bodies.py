"""Sequence bodies behind one interface: Hugging Face transformers (XLNet, GPT-2, BERT, LLaMA, or
any config with `inputs_embeds` support) and a GRU.

`hf_config_for` is the single place where a `ModelConfig` becomes a Hugging Face config;
`model_config_values` reads the same values back (the pair is round-trip tested). Hugging Face
configs silently accept misspelled keyword arguments, so `model.hf_config` extras are checked
here against the config class's real fields.

Shape legend: B = batch (sessions), T = max sequence length, D = d_model.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import typing
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    XLNetConfig,
    XLNetModel,
)

from raytr.config import ConfigError, ModelConfig
from raytr.errors import one_line

logger = logging.getLogger(__name__)

HF_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "xlnet": XLNetConfig,
    "gpt2": GPT2Config,
    "bert": BertConfig,
    "llama": LlamaConfig,
}


def _owned_fields(body: str) -> dict[str, str]:
    """HF field -> the `ModelConfig` field (or fact) it comes from; extras may not set these."""
    common = {"is_decoder": "model.objective"}
    if body == "xlnet":
        return {"d_model": "model.d_model", "n_layer": "model.n_layers", "n_head": "model.n_heads",
                "d_head": "model.d_model / model.n_heads", "dropout": "model.dropout",
                "attn_type": "model.objective"}
    if body == "gpt2":
        return {**common, "n_embd": "model.d_model", "n_layer": "model.n_layers", "n_head": "model.n_heads",
                "resid_pdrop": "model.dropout", "embd_pdrop": "model.dropout", "attn_pdrop": "model.dropout",
                "n_positions": "the feature spec's max_sequence_length"}
    if body == "bert":
        return {**common, "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers",
                "num_attention_heads": "model.n_heads", "hidden_dropout_prob": "model.dropout",
                "attention_probs_dropout_prob": "model.dropout",
                "max_position_embeddings": "the feature spec's max_sequence_length"}
    if body == "llama":
        return {**common, "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers",
                "num_attention_heads": "model.n_heads", "head_dim": "model.d_model / model.n_heads",
                "attention_dropout": "model.dropout",
                "max_position_embeddings": "the feature spec's max_sequence_length"}
    raise ConfigError(f"model.body={body!r} has no Hugging Face config; expected one of {sorted(HF_CONFIG_CLASSES)}")


def known_config_keys(cls: type[PretrainedConfig]) -> set[str]:
    """Every keyword a Hugging Face config class really understands (fields, aliases, init args)."""
    keys = set(cls.attribute_map)
    if dataclasses.is_dataclass(cls):
        keys |= {f.name for f in dataclasses.fields(cls)}
    keys |= {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}
    keys |= set(cls().to_dict())
    return keys - {"model_type", "transformers_version", "_name_or_path"}


def validate_hf_extras(body: str, extras: dict[str, Any]) -> None:
    """Raise ConfigError naming any `model.hf_config` key the body's config class does not have,
    or one that would override a value `ModelConfig` already sets."""
    cls = HF_CONFIG_CLASSES.get(body)
    if cls is None:
        if extras:
            raise ConfigError(f"model.hf_config={extras!r} given, but model.body={body!r} is not a Hugging Face body")
        return
    known = known_config_keys(cls)
    owned = _owned_fields(body)
    for key in extras:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"model.hf_config: unknown key {key!r} for {cls.__name__} (body={body!r}){hint}")
        field = cls.attribute_map.get(key, key)
        if field in owned:
            raise ConfigError(
                f"model.hf_config: key {key!r} is set from {owned[field]}; set that instead of hf_config.{key}"
            )


def _float_fields(cls: type[PretrainedConfig]) -> set[str]:
    """The fields of a Hugging Face config class typed `float` (or `float | None`), which its
    strict validation refuses a plain int for (`layer_norm_epsilon: 1`, as YAML writes 1.0)."""
    if not dataclasses.is_dataclass(cls):
        return set()
    floats = {float, "float", "float | None", "Optional[float]"}
    return {f.name for f in dataclasses.fields(cls)
            if f.type in floats or set(typing.get_args(f.type)) == {float, type(None)}}


def _with_floats(cls: type[PretrainedConfig], extras: dict[str, Any]) -> dict[str, Any]:
    """`extras` with the ints given for `cls`'s float fields made floats (by field or alias)."""
    floats = _float_fields(cls)
    return {key: float(value) if cls.attribute_map.get(key, key) in floats and type(value) is int else value
            for key, value in extras.items()}


def hf_config_for(config: ModelConfig, max_length: int) -> PretrainedConfig:
    """The Hugging Face config for `config.body`, for sequences of at most `max_length` events.

    The body only ever receives `inputs_embeds`, so its own vocabulary is a single unused row
    (`vocab_size=1`, frozen by `HFBody`). `config.hf_config` extras are validated, then applied
    over the defaults chosen here (FFN width 4*D, no caches); they may not override the fields that
    come from `ModelConfig` (see `_owned_fields`).
    """
    validate_hf_extras(config.body, config.hf_config)
    D, L, H, p = config.d_model, config.n_layers, config.n_heads, config.dropout
    causal = config.objective == "clm"
    no_tokens = {"vocab_size": 1, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
                 "tie_word_embeddings": False}
    if config.body == "xlnet":
        owned = {"d_model": D, "n_layer": L, "n_head": H, "d_head": D // H, "dropout": p,
                 "attn_type": "uni" if causal else "bi"}
        defaults = {"d_inner": 4 * D, "use_mems_train": False, "use_mems_eval": False, "mem_len": None}
    elif config.body == "gpt2":
        owned = {"n_embd": D, "n_layer": L, "n_head": H, "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
                 "n_positions": max_length}
        defaults = {"n_inner": 4 * D, "use_cache": False}
    elif config.body == "bert":
        owned = {"hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H, "hidden_dropout_prob": p,
                 "attention_probs_dropout_prob": p, "max_position_embeddings": max_length, "is_decoder": causal}
        defaults = {"intermediate_size": 4 * D, "use_cache": False, "type_vocab_size": 1}
    elif config.body == "llama":
        owned = {"hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H, "head_dim": D // H,
                 "attention_dropout": p, "max_position_embeddings": max_length}
        defaults = {"intermediate_size": 4 * D, "num_key_value_heads": H, "use_cache": False}
    else:
        raise ConfigError(
            f"model.body={config.body!r} has no Hugging Face config; expected one of {sorted(HF_CONFIG_CLASSES)}"
        )
    cls = HF_CONFIG_CLASSES[config.body]
    try:
        return cls(**{**no_tokens, **defaults, **_with_floats(cls, config.hf_config), **owned})
    except Exception as error:  # transformers' validation raises its own types (strict dataclass errors)
        if not config.hf_config:
            raise
        raise ConfigError(f"model.hf_config={config.hf_config!r}: Hugging Face's {cls.__name__} refuses it: "
                          f"{one_line(error)}") from None


def model_config_values(hf_config: PretrainedConfig) -> dict[str, Any]:
    """Read back what `hf_config_for` wrote: body, d_model, n_layers, n_heads, dropout, objective,
    max_length (None for XLNet, whose positions are relative)."""
    if isinstance(hf_config, XLNetConfig):
        return {"body": "xlnet", "d_model": hf_config.d_model, "n_layers": hf_config.n_layer,
                "n_heads": hf_config.n_head, "dropout": hf_config.dropout,
                "objective": "clm" if hf_config.attn_type == "uni" else "mlm", "max_length": None}
    if isinstance(hf_config, GPT2Config):
        drops = {hf_config.resid_pdrop, hf_config.embd_pdrop, hf_config.attn_pdrop}
        if len(drops) != 1:
            raise ValueError(f"GPT2Config dropouts differ ({drops}); ModelConfig has one dropout")
        return {"body": "gpt2", "d_model": hf_config.n_embd, "n_layers": hf_config.n_layer,
                "n_heads": hf_config.n_head, "dropout": drops.pop(), "objective": "clm",
                "max_length": hf_config.n_positions}
    if isinstance(hf_config, BertConfig):
        return {"body": "bert", "d_model": hf_config.hidden_size, "n_layers": hf_config.num_hidden_layers,
                "n_heads": hf_config.num_attention_heads, "dropout": hf_config.hidden_dropout_prob,
                "objective": "clm" if hf_config.is_decoder else "mlm",
                "max_length": hf_config.max_position_embeddings}
    if isinstance(hf_config, LlamaConfig):
        return {"body": "llama", "d_model": hf_config.hidden_size, "n_layers": hf_config.num_hidden_layers,
                "n_heads": hf_config.num_attention_heads, "dropout": hf_config.attention_dropout,
                "objective": "clm", "max_length": hf_config.max_position_embeddings}
    raise ValueError(f"{type(hf_config).__name__} is not one of the configs hf_config_for builds")


class SessionBody(nn.Module):
    """Contextualises event vectors.

    forward(inputs_embeds [B, T, D], attention_mask [B, T] bool, True at events; right-padded)
    -> [B, T, D]. When `is_causal`, output t depends only on inputs 0..t. Outputs at padded
    positions are unspecified; padding never changes outputs at real positions.
    """

    is_causal: bool

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HFBody(SessionBody):
    """A Hugging Face base model fed with `inputs_embeds`.

    Parameters that `inputs_embeds` cannot reach (its token embeddings, ...) are frozen at
    construction; `is_causal` is what the caller built it for (probed for user-supplied configs).
    """

    def __init__(self, model: nn.Module, is_causal: bool) -> None:
        super().__init__()
        self.model = model
        self.is_causal = is_causal
        self._is_xlnet = isinstance(model, XLNetModel)
        params = inspect.signature(model.forward).parameters
        self._extra_kwargs: dict[str, Any] = {}
        if "use_cache" in params:
            self._extra_kwargs["use_cache"] = False
        if self._is_xlnet:
            self._extra_kwargs["use_mems"] = False
        # Parameters that inputs_embeds never reaches get no gradient, and DDP would wait for them.
        embeddings = model.get_input_embeddings()
        if embeddings is not None:
            embeddings.requires_grad_(False)
        if self._is_xlnet:
            # mask_emb serves XLNet's permutation pretraining (target_mapping); the segment terms
            # need token_type_ids. raytr uses neither.
            model.mask_emb.requires_grad_(False)
            for layer in model.layer:
                layer.rel_attn.seg_embed.requires_grad_(False)
                layer.rel_attn.r_s_bias.requires_grad_(False)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.is_causal:
            # No padding mask: with right padding, padded positions come after every real one and
            # causality hides them. Given one, Hugging Face's SDPA path reads it on the host to
            # decide whether it may use is_causal (two GPU syncs per forward in eager mode) and
            # attends through a materialised [B, 1, T, T] mask; XLNetModel with attn_type="uni"
            # even fails on any padding mask when B > 1.
            mask_arg = None
        else:
            mask = attention_mask.clone()
            # Rows with no event at all would give fully masked attention rows (NaN in some kernels);
            # their outputs are never read, and for right-padded rows with events column 0 is set anyway.
            mask[:, 0] = True
            mask_arg = mask.to(inputs_embeds.dtype) if self._is_xlnet else mask.long()
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=mask_arg, **self._extra_kwargs)
        return out.last_hidden_state  # [B, T, D]


class GRUBody(SessionBody):
    """A stacked GRU. Causal by construction; with right padding, padded steps come after every
    real step and cannot affect it, so the mask is not needed."""

    is_causal = True

    def __init__(self, d_model: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.gru = nn.GRU(d_model, d_model, num_layers=n_layers, batch_first=True,
                          dropout=dropout if n_layers > 1 else 0.0)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(inputs_embeds)  # [B, T, D]
        return out


def probe_is_causal(body: SessionBody, d_model: int, length: int = 4) -> bool:
    """Empirically: do outputs 0..L-2 stay unchanged when the last of L inputs changes? (eval mode)"""
    gen = torch.Generator().manual_seed(0)
    param = next(body.parameters())
    x = torch.randn(2, length, d_model, generator=gen).to(param.device, param.dtype)
    x2 = x.clone()
    # a fresh random vector, not a constant shift (a LayerNorm on the input would erase that)
    x2[:, -1] = torch.randn(2, d_model, generator=gen).to(param.device, param.dtype)
    mask = torch.ones(2, length, dtype=torch.bool, device=param.device)
    was_training = body.training
    body.eval()
    with torch.no_grad():
        a, b = body(x, mask), body(x2, mask)
    body.train(was_training)
    return torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)


def unreached_parameters(body: HFBody) -> list[str]:
    """Trainable parameters that get no gradient from `inputs_embeds` in one tiny backward pass
    (eval mode). Run on user-supplied configs to warn about what would stall DDP."""
    param = next(body.parameters())
    d_model = int(body.model.config.hidden_size)
    x = torch.randn(2, 3, d_model, generator=torch.Generator().manual_seed(0))
    x = x.to(param.device, param.dtype).requires_grad_(True)
    was_training = body.training
    body.eval()
    body(x, torch.ones(2, 3, dtype=torch.bool, device=param.device)).sum().backward()
    body.train(was_training)
    names = [name for name, p in body.named_parameters() if p.requires_grad and p.grad is None]
    for p in body.parameters():
        p.grad = None
    return names


def build_body(config: ModelConfig, max_length: int, hf_config: PretrainedConfig | None = None) -> SessionBody:
    """The body for `config` (or for a user-supplied `hf_config`, which takes precedence over
    `config.body`, `n_layers`, `n_heads` and `dropout`; its hidden size must equal `config.d_model`).

    A user-supplied config is checked by probing: CLM needs a causal model, MLM a bidirectional
    one; the error names the mismatch.
    """
    if hf_config is not None:
        if config.hf_config:
            raise ConfigError(
                f"model.hf_config={config.hf_config!r} and a {type(hf_config).__name__} instance were both given; "
                "put those values into the instance"
            )
        hidden = getattr(hf_config, "hidden_size", None)
        if hidden != config.d_model:
            raise ConfigError(
                f"hf_config ({type(hf_config).__name__}) hidden_size={hidden} but model.d_model={config.d_model}; "
                "they must match (the input layer and the head are d_model wide)"
            )
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and 0 <= max_pos < max_length:  # XLNet's -1: relative positions, no limit
            raise ConfigError(
                f"hf_config max_position_embeddings={max_pos} < max_sequence_length={max_length}; raise it"
            )
        try:
            model = AutoModel.from_config(hf_config)
        except ValueError as exc:
            raise ConfigError(f"hf_config {type(hf_config).__name__}: AutoModel cannot build it: {exc}") from exc
        if "inputs_embeds" not in inspect.signature(model.forward).parameters:
            raise ConfigError(f"{type(model).__name__} does not accept inputs_embeds; it cannot be a session body")
        # Probed without a padding mask (the probe has no padding; XLNetModel with attn_type="uni"
        # fails on any mask when B > 1): whether the model itself lets a position see later ones.
        probe_body = HFBody(model, is_causal=True)
        causal = probe_is_causal(probe_body, config.d_model)
        if config.objective == "clm" and not causal:
            raise ConfigError(
                f"objective='clm' needs a causal body, but {type(model).__name__} built from the given hf_config "
                "lets position t see later positions (set is_decoder=True, or use objective='mlm')"
            )
        if config.objective == "mlm" and causal:
            raise ConfigError(
                f"objective='mlm' needs a bidirectional body, but {type(model).__name__} is causal; use objective='clm'"
            )
        probe_body.is_causal = causal
        unreached = unreached_parameters(probe_body)
        if unreached:
            # Not frozen: a mixture-of-experts layer, say, routes a tiny probe to only some experts.
            logger.warning(
                "%s: %d trainable parameter(s) got no gradient from inputs_embeds in a probe (%s); freeze them "
                "or use DDP with find_unused_parameters=True",
                type(model).__name__, len(unreached), unreached[:5],
            )
        return probe_body

    causal = config.objective == "clm"
    if config.body == "gru":
        validate_hf_extras(config.body, config.hf_config)
        if not causal:
            raise ConfigError("model.body='gru' is causal; it supports objective='clm' only")
        return GRUBody(config.d_model, config.n_layers, config.dropout)
    hf = hf_config_for(config, max_length)
    if config.body in ("gpt2", "llama") and not causal:
        raise ConfigError(f"model.body={config.body!r} is causal; it supports objective='clm' only")
    build = {"xlnet": XLNetModel, "gpt2": GPT2Model, "llama": LlamaModel,
             "bert": lambda hf: BertModel(hf, add_pooling_layer=False)}  # the pooler would be an unused parameter
    if config.body not in build:
        raise ConfigError(f"model.body={config.body!r}: expected one of xlnet, gpt2, bert, llama, gru")
    try:
        body = HFBody(build[config.body](hf), is_causal=causal)
        if config.hf_config:  # values the config class takes may still fail in the model or its forward
            probe_is_causal(body, config.d_model)
    except Exception as error:
        if not config.hf_config:
            raise
        raise ConfigError(f"model.hf_config={config.hf_config!r}: the {config.body} body cannot be built or run "
                          f"with it: {one_line(error)}") from None
    return body
