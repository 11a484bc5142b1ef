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
    with pytest.raises(ValueError, match=f"column 'item_id-list' has id {V}"):
        scorer(batch)
    empty = random_batch(3)
    empty.item_ids[1] = 0
    with pytest.raises(ValueError, match="no events"):
        scorer(empty)
    short = random_batch(3).select(slice(None))
    short.item_ids = short.item_ids[:, :3]
    with pytest.raises(ValueError, match="T=3"):
        scorer(short)


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
