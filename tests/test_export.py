"""raytr.models.export: the torch.export scoring program gives what SessionModel.score_next gives."""

from __future__ import annotations

import pytest
import torch

from raytr.models import SessionModel
from raytr.models.export import ExportedScorer, export_scorer
from _model_fixtures import ALLOWED, V, random_batch, tiny_config, tiny_spec


@pytest.mark.parametrize("body, objective", ALLOWED)
def test_exported_scorer_equals_score_next_for_any_batch_size(tmp_path, body, objective):
    model = SessionModel(tiny_spec(), tiny_config(body, objective), seed=0).eval()
    path = export_scorer(model, tmp_path / "scorer.pt2")
    scorer = ExportedScorer.load(path)
    assert scorer.spec == model.spec
    for B, seed in ((5, 1), (1, 2), (33, 3)):  # none of them the size export traced with (2)
        batch = random_batch(B, seed=seed)
        assert torch.allclose(scorer(batch), model.score_next(batch), atol=1e-5), (B, body, objective)


def test_exported_scorer_rejects_what_score_next_rejects(tmp_path):
    model = SessionModel(tiny_spec(), tiny_config(), seed=0).eval()
    scorer = ExportedScorer.load(export_scorer(model, tmp_path / "scorer.pt2"))
    batch = random_batch(3)
    batch.item_ids[0, 0] = V  # beyond the catalog
    empty = random_batch(3)
    empty.item_ids[1] = 0
    longer = random_batch(3)
    longer.item_ids = torch.cat([longer.item_ids, longer.item_ids], dim=1)
    cases = [(batch, f"column 'item_id-list' has id {V}"), (empty, "no events"),
             (longer, f"T={longer.item_ids.shape[1]}[; ]")]
    for bad, match in cases:
        for score in (scorer, model.score_next):  # the same cases refused, each naming what is wrong
            with pytest.raises(ValueError, match=match):
                score(bad)


def _first_columns(batch, keep: int):
    return type(batch)(item_ids=batch.item_ids[:, :keep], categorical={k: v[:, :keep] for k, v in batch.categorical.items()},
                       continuous={k: v[:, :keep] for k, v in batch.continuous.items()})


@pytest.mark.parametrize("body", ["gpt2", "xlnet", "gru"])
def test_exported_causal_scorer_right_pads_shorter_batches(body):
    """The online path may hand over T below max_sequence_length: for CLM right padding changes no score."""
    model = SessionModel(tiny_spec(), tiny_config(body, "clm"), seed=0).eval()
    short = _first_columns(random_batch(4, seed=5), 4)  # full 4-event sessions among them
    assert torch.allclose(ExportedScorer.from_model(model)(short), model.score_next(short), atol=1e-5)


def test_exported_mlm_scorer_refuses_shorter_batches():
    model = SessionModel(tiny_spec(), tiny_config("bert", "mlm"), seed=0).eval()
    with pytest.raises(ValueError, match="MLM scorer takes exactly T="):
        ExportedScorer.from_model(model)(_first_columns(random_batch(4, seed=5), 4))


def test_raytr_export_command_writes_a_loadable_program(tmp_path, capsys):
    from raytr.cli import main

    model = SessionModel(tiny_spec(), tiny_config("xlnet", "mlm"), seed=0).eval()
    model.save(tmp_path / "run" / "model")
    assert main(["export", "--model", str(tmp_path / "run")]) == 0
    path = tmp_path / "run" / "model" / "scorer.pt2"
    assert str(path) in capsys.readouterr().out
    batch = random_batch(4, seed=9)
    assert torch.allclose(ExportedScorer.load(path)(batch), model.score_next(batch), atol=1e-5)
    assert main(["export", "--model", str(tmp_path / "missing")]) == 2  # a clear error, no traceback


def test_export_to_and_load_from_a_url():
    """Any fsspec URL: written through a local file and uploaded, loaded from a local copy."""
    import uuid

    from raytr import storage

    model = SessionModel(tiny_spec(), tiny_config(), seed=0).eval()
    url = f"memory://raytr-export-{uuid.uuid4().hex[:8]}/model/scorer.pt2"
    assert export_scorer(model, url) == url and storage.is_file(url)
    batch = random_batch(4)
    assert torch.allclose(ExportedScorer.load(url)(batch), model.score_next(batch), atol=1e-5)


@pytest.mark.parametrize("variant", ["repeat_bias", "repeat_mixture"])
def test_exported_scorer_keeps_the_repeat_scoring(tmp_path, variant):
    model = SessionModel(tiny_spec(), tiny_config("gpt2", **{variant: True}), seed=0).eval()
    with torch.no_grad():
        model.head.repeat_weight.copy_(torch.linspace(3.0, 0.5, model.spec.max_sequence_length))
        if variant == "repeat_mixture":  # p(repeat) = sigmoid(3), most of it on the last event
            model.head.repeat_gate.bias.fill_(3.0)
    scorer = ExportedScorer.load(export_scorer(model, tmp_path / "scorer.pt2"))
    for B, seed in ((5, 1), (1, 2)):
        batch = random_batch(B, seed=seed)
        assert torch.allclose(scorer(batch), model.score_next(batch), atol=1e-5)
        last = batch.item_ids[torch.arange(B), batch.lengths - 1]
        assert torch.equal(scorer(batch).argmax(dim=1), last)  # a weight of 3 on the last item wins here


def test_raytr_export_never_overwrites_the_models_own_files(tmp_path, capsys):
    """--output naming the weights was taken, the weights replaced by the program and the model lost;
    now any output not ending in .pt2 is refused, in one line naming it, with the model untouched."""
    from raytr.cli import main

    model = SessionModel(tiny_spec(), tiny_config(), seed=0).eval()
    model.save(tmp_path / "run" / "model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "model").iterdir()}
    for target in ("model/model.safetensors", "model/config.json", "model", "."):
        output = tmp_path / "run" / target
        assert main(["export", "--model", str(tmp_path / "run"), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"raytr export: error: export output {str(output)!r}: expected a file name ending "
                              "in .pt2") and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "model").iterdir()} == before
    batch = random_batch(3)
    assert torch.equal(SessionModel.load(tmp_path / "run" / "model").score_next(batch), model.score_next(batch))


def test_export_replaces_an_earlier_export_only(tmp_path):
    from raytr.models.export import is_export

    first, second = (SessionModel(tiny_spec(), tiny_config(), seed=s).eval() for s in (0, 1))
    path = tmp_path / "scorer.pt2"
    export_scorer(first, path)
    assert is_export(path)
    export_scorer(second, path)  # an earlier export: replaced
    batch = random_batch(4)
    assert torch.allclose(ExportedScorer.load(path)(batch), second.score_next(batch), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scorer.pt2"]  # no partial file left beside it
    other = tmp_path / "notes.pt2"
    other.write_bytes(b"someone else's file")
    (tmp_path / "dir.pt2").mkdir()
    for taken in (other, tmp_path / "dir.pt2"):
        assert not is_export(taken)
        with pytest.raises(ValueError, match=f"export output {str(taken)!r} exists and is not an earlier export"):
            export_scorer(first, taken)
    assert other.read_bytes() == b"someone else's file" and not any((tmp_path / "dir.pt2").iterdir())
    with pytest.raises(ValueError, match=f"{other} is not a scorer written by export_scorer"):
        ExportedScorer.load(other)  # one line, not torch.export's reader traceback
    with pytest.raises(FileNotFoundError, match="missing.pt2 does not exist"):
        ExportedScorer.load(tmp_path / "missing.pt2")


def _rewrite(source, target, drop=lambda name: False, replace=None) -> None:
    """Copy the zip archive `source` to `target`, dropping entries and replacing one's content."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            if drop(info.filename):
                continue
            content = zin.read(info.filename)
            if replace is not None and info.filename.endswith(replace[0]):
                content = replace[1]
            zout.writestr(info, content)


def test_a_damaged_export_is_one_error_naming_the_file(tmp_path):
    """torch.export.load checks no CRC: flipped weight bytes loaded and scored NaN. Every damage is a
    ValueError naming the file and the fix."""
    import struct
    import zipfile

    model = SessionModel(tiny_spec(), tiny_config(), seed=0).eval()
    good = export_scorer(model, tmp_path / "scorer.pt2")
    data = (tmp_path / "scorer.pt2").read_bytes()
    flipped = bytearray(data)
    with zipfile.ZipFile(good) as archive:
        weight = next(i for i in archive.infolist() if "/data/weights/weight_" in i.filename and i.file_size > 200)
    name_len, extra_len = struct.unpack("<HH", data[weight.header_offset + 26: weight.header_offset + 30])
    start = weight.header_offset + 30 + name_len + extra_len  # the entry's stored bytes
    flipped[start: start + 64] = bytes(b ^ 0x55 for b in flipped[start: start + 64])
    damaged = {"weights.pt2": lambda p: p.write_bytes(bytes(flipped)),
               "cut.pt2": lambda p: p.write_bytes(data[: len(data) // 2]),
               "spec.pt2": lambda p: _rewrite(good, p, replace=("extra/feature_spec.json", b"{oops")),
               "spec_key.pt2": lambda p: _rewrite(good, p, replace=("extra/feature_spec.json", b'{"item_id": "x"}')),
               "objective.pt2": lambda p: _rewrite(good, p, drop=lambda n: n.endswith("extra/objective")),
               "no_weights.pt2": lambda p: _rewrite(good, p, drop=lambda n: "/data/weights/" in n),
               "no_model.pt2": lambda p: _rewrite(good, p, drop=lambda n: "/models/" in n and n.endswith(".json"))}
    for name, damage in damaged.items():
        path = tmp_path / name
        damage(path)
        with pytest.raises(ValueError, match=f"{path} is damaged \\(.*\\): export it again with `raytr export`$"):
            ExportedScorer.load(path)
    assert torch.isfinite(ExportedScorer.load(good)(random_batch(2))).any()  # the good one still loads
