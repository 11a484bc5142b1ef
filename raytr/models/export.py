"""The next-item scorer as a `torch.export` program: serving without the Python model code.

    program = export_scorer(model, "runs/model/scorer.pt2")     # after training
    scorer = ExportedScorer.load("runs/model/scorer.pt2")         # later, anywhere torch runs
    scores = scorer(batch)                                        # [B, V], as model.score_next(batch)

The program takes the batch's tensors positionally, in `FeatureSpec.columns` order (item ids, then
the categorical columns, then the continuous ones), each [B, T] with B dynamic (1..MAX_BATCH) and
T = max_sequence_length (`ExportedScorer` right-pads shorter batches for CLM models). The ids are
not checked inside (a check is a data-dependent branch, which export cannot trace):
`ExportedScorer` checks them on the host first, as `score_next` does.
"""

from __future__ import annotations

import os
import uuid
import zipfile
import zlib
from pathlib import Path

import torch
from torch import nn

from raytr import storage
from raytr.config import from_dict
from raytr.errors import one_line
from raytr.features import FeatureSpec, SessionBatch, check_id_ranges

MAX_BATCH = 65_536
EXPORT_SUFFIX = ".pt2"  # what torch.export.load expects


class _ScoreNext(nn.Module):
    """Tensor-in, tensor-out wrapper of `SessionModel` scoring: (columns in spec order) -> [B, V]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spec: FeatureSpec = model.spec

    def forward(self, *columns: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        n_cat = len(spec.categorical)
        batch = SessionBatch(
            item_ids=columns[0],
            categorical=dict(zip(spec.categorical, columns[1: 1 + n_cat])),
            continuous=dict(zip(spec.continuous, columns[1 + n_cat:])),
        )
        model = self.model
        return model.head.scores(model.next_hidden_unchecked(batch), model.repeat_context(batch))


def _example(spec: FeatureSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    B, T = 2, spec.max_sequence_length
    ids = torch.full((B, T), 3, dtype=torch.int64, device=device)
    ids[:, T // 2:] = 0  # right-padded, so the traced code sees the general case
    cats = [torch.ones(B, T, dtype=torch.int64, device=device) for _ in spec.categorical]
    conts = [torch.zeros(B, T, device=device) for _ in spec.continuous]
    return (ids, *cats, *conts)


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """`model` (a SessionModel, put in eval mode) as a scoring program for its device."""
    model.eval()
    device = next(model.parameters()).device
    example = _example(model.spec, device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # forward(*columns): the varargs are one argument holding a tuple of tensors.
    return torch.export.export(_ScoreNext(model), example, dynamic_shapes=(tuple({0: batch} for _ in example),))


def export_scorer(model: nn.Module, path: str | Path) -> str:
    """Export `model` (a SessionModel, put in eval mode) as a scoring program saved at `path` (.pt2,
    a local path or an fsspec URL); returns the path as `ExportedScorer.load` takes it. `path` may
    replace an earlier export only (`check_export_path`)."""
    check_export_path(path)
    program = export_program(model)
    extra = {"feature_spec.json": _spec_json(model.spec), "objective": model.config.objective}
    with storage.writable_dir(storage.parent(path)) as local:
        target = local / storage.name(path)
        # Written beside the target and renamed: a failed save leaves an earlier export whole.
        partial = local / f".{target.stem}.{uuid.uuid4().hex[:8]}.partial{EXPORT_SUFFIX}"
        try:
            torch.export.save(program, str(partial), extra_files=extra)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return storage.normalize(path)


def check_export_path(path: str | Path) -> None:
    """Refuse a `path` whose writing would lose data: one not ending in .pt2 (so never a model's
    model.safetensors or config.json, nor a bundle's directory), or an existing entry that is not an
    earlier export (`is_export`)."""
    shown = str(path)
    if not storage.name(path).endswith(EXPORT_SUFFIX) or storage.name(path) == EXPORT_SUFFIX:
        raise ValueError(f"export output {shown!r}: expected a file name ending in {EXPORT_SUFFIX} "
                         "(e.g. scorer.pt2), so that no model or bundle file is overwritten")
    if storage.exists(path) and not is_export(path):
        raise ValueError(f"export output {shown!r} exists and is not an earlier export (a {EXPORT_SUFFIX} archive "
                         "written by raytr export): choose another output, or move that file away first")


def is_export(path: str | Path) -> bool:
    """True when `path` is a file holding a torch.export archive with the feature spec this module
    saves in it: what `ExportedScorer.load` reads, so replacing it loses nothing raytr cannot rewrite."""
    fs, p = storage.filesystem(path)
    if not fs.isfile(p):
        return False
    try:
        with fs.open(p, "rb") as f, zipfile.ZipFile(f) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/archive_format") for n in names) and any(n.endswith("/extra/feature_spec.json")
                                                                     for n in names)


def _damaged_entry(local: Path) -> str | None:
    """What is wrong with the zip archive at `local` (an entry whose CRC does not match, say), or
    None when every entry reads back whole. Reads the whole archive once (CRCs are computed in C)."""
    try:
        with zipfile.ZipFile(local) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        return one_line(error, 200)
    return None if bad is None else f"entry {bad} fails its CRC check"


def _spec_json(spec: FeatureSpec) -> str:
    import json

    return json.dumps(spec.to_dict(), sort_keys=True)


class ExportedScorer:
    """A loaded scoring program: `scorer(batch) -> [B, V]` float32 scores, reserved ids at -inf."""

    def __init__(self, program: torch.export.ExportedProgram, spec: FeatureSpec, objective: str) -> None:
        self.module = program.module()
        self.spec = spec
        self.objective = objective

    @classmethod
    def from_model(cls, model: nn.Module) -> "ExportedScorer":
        """Export in memory, on the model's device (what the Serve app does at load)."""
        return cls(export_program(model), model.spec, model.config.objective)

    @classmethod
    def load(cls, path: str | Path) -> "ExportedScorer":
        import json

        if not storage.exists(path):
            raise FileNotFoundError(f"{path} does not exist: write it with `raytr export`")
        if not is_export(path):  # torch.export.load's own error is a traceback from deep in its reader
            fs, p = storage.filesystem(path)
            if fs.isfile(p):
                with fs.open(p, "rb") as f:
                    if f.read(4) == b"PK\x03\x04":  # a zip archive without its end: cut short
                        raise ValueError(f"{path} is damaged (not a complete zip archive): export it again "
                                         "with `raytr export`")
            raise ValueError(f"{path} is not a scorer written by export_scorer (`raytr export`): export the model "
                             "again")
        extra = {"feature_spec.json": "", "objective": ""}
        with storage.local_copy(path) as local:
            # torch.export.load checks no CRC: flipped weight bytes would load and score NaN.
            damaged = _damaged_entry(local)
            if damaged is not None:
                raise ValueError(f"{path} is damaged ({damaged}): export it again with `raytr export`")
            try:
                program = torch.export.load(str(local), extra_files=extra)
                spec = from_dict(FeatureSpec, json.loads(extra["feature_spec.json"]), where="extra/feature_spec.json")
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # e.g. a program exported on a GPU, where none is visible
                raise ValueError(f"{path} cannot be loaded here ({one_line(error, 200)}): export the model on the "
                                 "device it will run on") from None
            except (ValueError, KeyError, AssertionError, TypeError, zipfile.BadZipFile) as error:
                raise ValueError(f"{path} is damaged ({one_line(error, 200)}): export it again with `raytr export`"
                                 ) from None
        if extra["objective"] not in ("clm", "mlm"):
            raise ValueError(f"{path} is damaged (objective={extra['objective']!r}, expected 'clm' or 'mlm'): "
                             "export it again with `raytr export`")
        return cls(program, spec, extra["objective"])

    @torch.no_grad()
    def __call__(self, batch: SessionBatch) -> torch.Tensor:
        spec = self.spec
        T = batch.item_ids.shape[1]
        if T > spec.max_sequence_length:
            raise ValueError(f"batch has T={T}; the exported scorer takes at most "
                             f"T={spec.max_sequence_length} (keep the last max_sequence_length events)")
        if T < spec.max_sequence_length:
            if self.objective != "clm":  # MLM drops the first event of a full session for its mask slot
                raise ValueError(f"batch has T={T}; this MLM scorer takes exactly T={spec.max_sequence_length} "
                                 "(padding would change the scores of full sessions)")
            batch = _right_pad(batch, spec.max_sequence_length)  # causal: more right padding changes no score
        if batch.ids_checked != spec:
            check_id_ranges({spec.item_id: batch.item_ids, **batch.categorical},
                            {spec.item_id: spec.item_cardinality, **spec.categorical})
        if bool((batch.lengths == 0).any()):
            raise ValueError("a session has no events; there is nothing to continue")
        columns = (batch.item_ids, *(batch.categorical[n] for n in spec.categorical),
                   *(batch.continuous[n] for n in spec.continuous))
        return self.module(*columns)


def _right_pad(batch: SessionBatch, length: int) -> SessionBatch:
    def pad(col: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(col, (0, length - col.shape[1]))

    return SessionBatch(item_ids=pad(batch.item_ids), categorical={k: pad(v) for k, v in batch.categorical.items()},
                        continuous={k: pad(v) for k, v in batch.continuous.items()}, ids_checked=batch.ids_checked)
