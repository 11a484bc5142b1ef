"""The session model: inputs -> (masking) -> body -> weight-tied next-item head.

Shape legend: B = batch (sessions), T = max sequence length, D = d_model, V = item cardinality,
N = positions with a target, k = recommendations per session.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from raytr import storage
from raytr.config import ModelConfig, from_dict
from raytr.errors import one_line
from raytr.features import FeatureSpec, SessionBatch, check_id_ranges
from raytr.models.bodies import build_body
from raytr.models.head import NextItemHead, RepeatContext, seen_items, top_k
from raytr.models.inputs import SessionInputs
from raytr.models.masking import IGNORE_INDEX, causal_targets, mlm_inference_input, mlm_mask, widen_by_one

logger = logging.getLogger(__name__)

# 2 (2026-11-29): the repeat bias scores an item by its latest occurrence only (format 1 summed its
# occurrences); format 1 still loads unless the model has a repeat bias, which it would score differently.
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class SessionOutput:
    """What `SessionModel.forward` returns.

    loss: scalar mean loss over the N targets (0 with a graph when N = 0).
    num_targets: N, for weighting losses across batches and ranks.
    hidden: [B, T, D] body outputs; `model.head.scores(hidden[labels != -100])` gives the [N, V]
        logits when a caller wants metrics on the training batch (they are not built here: [N, V]
        is the tensor the chunked loss avoids).
    labels: [B, T] targets, `IGNORE_INDEX` (-100) where there is none.
    """

    loss: torch.Tensor
    num_targets: int
    hidden: torch.Tensor
    labels: torch.Tensor


class SessionModel(nn.Module):
    """Next-item recommendation over right-padded sessions.

    Entry points: `forward(batch) -> SessionOutput` (training loss for `config.objective`),
    `score_next(batch) -> [B, V]` and `recommend(batch, k, exclude_seen) -> (ids [B, k], scores [B, k])`.

    hf_config: any Hugging Face config whose base model accepts `inputs_embeds` (e.g.
        `MistralConfig(hidden_size=config.d_model, ...)`); it replaces the body chosen by
        `config.body`. Its causality is probed against `config.objective` at construction.
    seed: seeds the initial weights (from a generator of their own: torch's global one is left as it
        was, so models built one after another in a process get the same weights for the same seed)
        and this model's generator for MLM masks and sampled negatives; None uses torch's default
        generator for both. `forward(batch, generator=...)` overrides the latter per call.
    """

    def __init__(self, spec: FeatureSpec, config: ModelConfig, hf_config: PretrainedConfig | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.config = config
        self.custom_hf_config = hf_config
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.default_generator.manual_seed(seed)  # the CPU's: weights are made there; CUDA's untouched
            self.inputs = SessionInputs(spec, config)
            self.body = build_body(config, spec.max_sequence_length, hf_config)
            tied = self.inputs.item_embedding.weight if config.tie_weights else None
            self.head = NextItemHead(config, spec.item_cardinality, tied_weight=tied,
                                     max_sequence_length=spec.max_sequence_length)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    # ---------------------------------------------------------------- checks
    def check_batch(self, batch: SessionBatch) -> None:
        """Raise ValueError when `batch` does not fit this model's FeatureSpec (named column, value, fix).

        Shapes cost nothing; the id ranges cost one host sync for all id columns together, skipped
        when `batch.ids_checked` says a loader already checked them against the same spec."""
        spec = self.spec
        ids = batch.item_ids
        if ids.ndim != 2 or ids.dtype != torch.int64:
            raise ValueError(
                f"column {spec.item_id!r}: expected a [B, T] int64 tensor, got {tuple(ids.shape)} {ids.dtype}"
            )
        T = ids.shape[1]
        if T > spec.max_sequence_length:
            raise ValueError(
                f"batch has T={T} columns but max_sequence_length={spec.max_sequence_length}; "
                "keep the last max_sequence_length events of each session"
            )
        id_columns = {spec.item_id: (ids, spec.item_cardinality)}
        for name, card in spec.categorical.items():
            col = batch.categorical.get(name)
            if col is None:
                raise ValueError(f"batch is missing categorical column {name!r} (spec columns: {spec.columns})")
            self._check_shape(name, col, batch)
            id_columns[name] = (col, card)
        for name in spec.continuous:
            col = batch.continuous.get(name)
            if col is None:
                raise ValueError(f"batch is missing continuous column {name!r} (spec columns: {spec.columns})")
            self._check_shape(name, col, batch)
        if ids.numel() and batch.ids_checked != spec:
            check_id_ranges({name: col for name, (col, _) in id_columns.items()},
                            {name: card for name, (_, card) in id_columns.items()})

    def _check_shape(self, name: str, col: torch.Tensor, batch: SessionBatch) -> None:
        if col.shape != batch.item_ids.shape:
            raise ValueError(
                f"column {name!r} has shape {tuple(col.shape)}, expected {tuple(batch.item_ids.shape)} "
                f"like {self.spec.item_id!r}"
            )

    def compile_regions(self, mode: str | None = None) -> "SessionModel":
        """torch.compile the fixed-shape parts in place: the input layer, the body and (on CUDA) the
        loss's per-chunk kernel. The checks and target selection stay eager: their data-dependent
        shapes would break one whole-model graph. Parameter names do not change.

        `mode` (torch.compile's) applies to the input layer and body; "reduce-overhead" replays them
        as CUDA graphs on a GPU, and the caller then marks each training step's start
        (`torch.compiler.cudagraph_mark_step_begin`). The chunk kernel keeps the default mode: its
        row count changes every batch, and a graph per count would hold memory for each."""
        self.inputs.compile(mode=mode)
        self.body.compile(mode=mode)
        if next(self.parameters()).device.type == "cuda":
            self.head.compile_chunk_kernel()
        return self

    # ---------------------------------------------------------------- training
    def forward(self, batch: SessionBatch, generator: torch.Generator | None = None) -> SessionOutput:
        """Training loss. CLM: the next item at every position; MLM: the items at masked positions.

        batch: [B, T] columns. Checks the batch first (one host sync for the id range, skipped for
        loader batches). Sizing the targets reads the GPU once, unless the batch carries its
        `num_causal_targets` (loader batches, CLM): a loader's CLM step then never waits for the GPU.
        """
        self.check_batch(batch)
        generator = generator if generator is not None else self.generator
        masked = None
        if self.config.objective == "clm":
            labels = causal_targets(batch.item_ids)  # [B, T]
        else:
            masked, labels = mlm_mask(batch.item_ids, self.config.mlm_probability, generator)  # [B, T] x2
        has_target = labels.view(-1) != IGNORE_INDEX  # [B*T]
        known = batch.num_causal_targets if self.config.objective == "clm" else None
        if known is not None:  # counted by the loader on the host: no GPU read
            positions = torch.nonzero_static(has_target, size=known).squeeze(1)  # [N] flat indices
        else:  # a host sync, taken before the body is queued so the GPU is not left idle
            positions = has_target.nonzero().squeeze(1)
        hidden = self.body(self.inputs(batch, mask_positions=masked), batch.mask)  # [B, T, D]
        targets = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # [N, D]
        repeat = None
        if self.config.scores_repeats:  # CLM only: position t scores the item after event t
            T = batch.item_ids.shape[1]
            repeat = RepeatContext.at(batch.item_ids, positions // T, positions % T)
        loss = self.head(targets, labels.view(-1).index_select(0, positions), generator, check_targets=False,
                         repeat=repeat)
        return SessionOutput(loss=loss, num_targets=positions.numel(), hidden=hidden, labels=labels)

    # ---------------------------------------------------------------- inference
    def next_hidden(self, batch: SessionBatch) -> torch.Tensor:
        """[B, D]: the representation that scores the item after each session's last event.

        CLM: body output at position length-1. MLM: body output at a mask slot appended after the
        last item (a full session drops its first event to make room).
        """
        self.check_batch(batch)
        lengths = batch.lengths
        if bool((lengths == 0).any()):
            raise ValueError(f"{int((lengths == 0).sum())} session(s) have no events; there is nothing to continue")
        return self.next_hidden_unchecked(batch)

    def next_hidden_unchecked(self, batch: SessionBatch) -> torch.Tensor:
        """`next_hidden` without the checks (no host syncs, no data-dependent branches: exportable).
        The caller guarantees ids in range and at least one event per session."""
        lengths = batch.lengths
        rows = torch.arange(batch.item_ids.shape[0], device=batch.item_ids.device)  # a SymInt under export, not len()
        if self.config.objective == "clm":
            hidden = self.body(self.inputs(batch), batch.mask)  # [B, T, D]
            return hidden[rows, lengths - 1]
        if batch.item_ids.shape[1] < self.spec.max_sequence_length:  # static under export
            batch = widen_by_one(batch)  # room for the slot: a full row keeps its first event
        slotted, positions = mlm_inference_input(batch)
        slot_mask = torch.zeros_like(slotted.item_ids, dtype=torch.bool)
        slot_mask[rows, positions] = True  # [B, T]
        hidden = self.body(self.inputs(slotted, mask_positions=slot_mask), slotted.mask)  # [B, T, D]
        return hidden[rows, positions]

    @torch.no_grad()
    def score_next(self, batch: SessionBatch) -> torch.Tensor:
        """[B, V] float32 scores for the next item of each session; reserved ids (padding, null, OOV) are -inf.
        Runs without gradients; call `eval()` first for deterministic scores (dropout)."""
        return self.head.scores(self.next_hidden(batch), self.repeat_context(batch))

    def repeat_context(self, batch: SessionBatch) -> RepeatContext | None:
        """What the repeat bias or mixture looks back on when scoring each session's next item (None
        without model.repeat_bias or model.repeat_mixture)."""
        if not self.config.scores_repeats:
            return None
        ids = batch.item_ids
        return RepeatContext.at(ids, torch.arange(ids.shape[0], device=ids.device), batch.lengths - 1)

    @torch.no_grad()
    def recommend(self, batch: SessionBatch, k: int, exclude_seen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k next items: (ids [B, k] int64, scores [B, k] float32), best first, ties to the
        smaller id. Reserved ids (padding, null, OOV) are never returned; `exclude_seen` drops items already in the session.
        Raises ValueError naming k when fewer than k items can be returned."""
        scores = self.score_next(batch)
        exclude = seen_items(batch.item_ids, scores.shape[1]) if exclude_seen else None
        return top_k(scores, k, exclude)

    def set_score_temperature(self, temperature: float) -> None:
        """Score with `model.score_temperature` = `temperature` from now on (saved with the model);
        the weights are unchanged. ConfigError for a value ModelConfig refuses."""
        self.config = dataclasses.replace(self.config, score_temperature=temperature)
        self.head.score_temperature = self.config.score_temperature

    # ---------------------------------------------------------------- artifacts
    def save(self, directory: str | Path) -> str:
        """Write `model.safetensors` and `config.json` into `directory` (a local path, created if
        needed, or an fsspec URL); returns the directory as `load` takes it."""
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "feature_spec": self.spec.to_dict(),
            "model_config": dataclasses.asdict(self.config),
            "hf_config": self.custom_hf_config.to_dict() if self.custom_hf_config is not None else None,
        }
        with storage.writable_dir(directory) as local:
            (local / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            # save_model (not save_file) because the tied head weight shares storage with the embedding.
            save_model(self, str(local / WEIGHTS_FILE))
            # safetensors writes through an owner-only temporary file: give the weights config.json's
            # mode (the umask's), or a bundle served by another user cannot be read.
            (local / WEIGHTS_FILE).chmod((local / CONFIG_FILE).stat().st_mode & 0o777)
        return storage.normalize(directory)

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "SessionModel":
        """Rebuild a saved model (in eval mode) on `map_location`, from a local path or a URL."""
        _check_device(map_location)
        with storage.local_copy(directory) as local:
            return cls._load_local(local, map_location, shown=str(directory))

    @classmethod
    def _load_local(cls, directory: Path, map_location: str | torch.device, shown: str) -> "SessionModel":
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{shown}/{path.name} does not exist; expected a directory written by "
                                        "SessionModel.save")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{shown}/{CONFIG_FILE} is not valid JSON ({error}): the model directory is "
                             "damaged; save the model again (or train it again)") from None
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict)
                                                 for k in ("feature_spec", "model_config")):
            raise ValueError(f"{shown}/{CONFIG_FILE} has no feature_spec and model_config mappings: not a "
                             "config.json written by SessionModel.save")
        version = meta.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"{shown}/{CONFIG_FILE}: format_version={version!r}, this raytr reads 1 and {FORMAT_VERSION}")
        # from_dict checks each field's type, so a malformed file is one ValueError naming the field.
        spec = from_dict(FeatureSpec, meta["feature_spec"], where=f"{shown}/{CONFIG_FILE}:feature_spec")
        config = from_dict(ModelConfig, meta["model_config"], where=f"{shown}/{CONFIG_FILE}:model_config")
        if version == 1 and config.repeat_bias:
            raise ValueError(f"{shown}/{CONFIG_FILE}: format_version=1 with model.repeat_bias: that model learned "
                             "its repeat bias summed over an item's occurrences, this raytr scores the latest "
                             "occurrence only; train it again")
        hf_config = None
        if meta.get("hf_config") is not None:
            hf_config = _hf_config(meta["hf_config"], where=f"{shown}/{CONFIG_FILE}:hf_config")
        model = cls(spec, config, hf_config=hf_config)
        model.to(map_location)
        try:
            missing, unexpected = load_model(model, str(weights_path), strict=True, device=str(map_location))
        except SafetensorError as error:  # not a safetensors file: truncated, overwritten, not ours
            raise ValueError(f"{shown}/{WEIGHTS_FILE} cannot be read ({error}): the model directory is damaged; "
                             "save the model again (or train it again)") from None
        except RuntimeError as error:
            if not str(error).startswith("Error(s) in loading state_dict"):
                raise  # a device error, say: not the file's fault
            # one line; the list of missing keys can be long
            raise ValueError(f"{shown}/{WEIGHTS_FILE} does not hold the weights {shown}/{CONFIG_FILE} describes "
                             f"({one_line(error, 300)}): save the model again (or train it again)") from None
        if missing or unexpected:  # strict=True raises first; kept for clarity of intent
            raise ValueError(f"{shown}/{WEIGHTS_FILE}: missing {missing}, unexpected {unexpected}")
        # safetensors has no checksum and training stops at a NaN step, so a non-finite weight means a damaged
        # or edited file: refused here rather than served as NaN scores.
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{shown}/{WEIGHTS_FILE}: weight {name} holds NaN or infinite values: the model "
                                 "directory is damaged; save the model again (or train it again)")
        return model.eval()


def _hf_config(values: Any, where: str) -> PretrainedConfig:
    """The Hugging Face config saved as `PretrainedConfig.to_dict()`; ValueError naming `where`."""
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise ValueError(f"{where}: expected a mapping with a model_type (a Hugging Face config's to_dict()), got "
                         f"{str(values)[:80]}: the model directory is damaged; save the model again (or train it again)")
    values = dict(values)
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (ValueError, TypeError, KeyError) as error:  # an unknown model_type, a field of the wrong type
        raise ValueError(f"{where}: not a config transformers can build ({one_line(error, 200)}): save the model again "
                         "(or train it again)") from None


def _check_device(map_location: str | torch.device) -> None:
    """ValueError for a `map_location` that is no device, or a CUDA one where no GPU is visible."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"map_location={str(map_location)!r} is not a torch device ({error}); use e.g. 'cpu' "
                         "or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location={str(map_location)!r}: no CUDA GPU is visible to this process; load the "
                         "model with map_location='cpu', or run where a GPU is visible")
    if device.type == "meta":  # holds shapes only: there is nowhere to put the weights
        raise ValueError(f"map_location={str(map_location)!r} holds no data, so no weights can load there; use "
                         "e.g. 'cpu' or 'cuda'")
    try:
        torch.empty(0, device=device)  # a device type this torch build or machine cannot use (mps, xla, ...)
    except RuntimeError as error:
        raise ValueError(f"map_location={str(map_location)!r} cannot be used here ({one_line(error, 200)}); use "
                         "e.g. 'cpu' or 'cuda'") from None
