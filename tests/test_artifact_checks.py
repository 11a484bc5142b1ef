"""Artifacts that are damaged or in the way: a model whose weights file cannot be read is a one-line
error naming it, and attaching the preprocessing to a bundle replaces raytr's own copies only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raytr.models import SessionModel
from _model_fixtures import random_batch, tiny_config, tiny_spec


@pytest.fixture
def saved(tmp_path) -> Path:
    SessionModel(tiny_spec(), tiny_config(), seed=0).save(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("damage", ["overwritten", "truncated", "empty"])
def test_an_unreadable_weights_file_is_one_line_naming_it(saved, capsys, damage):
    """What `raytr export --output model/model.safetensors` used to leave behind was a traceback
    ending in safetensors' 'header too large'."""
    from raytr.cli import main

    weights = saved / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes({"overwritten": b"PK\x03\x04" + b"\0" * 4096, "truncated": good[: len(good) // 2],
                         "empty": b""}[damage])
    with pytest.raises(ValueError, match=f"{weights} cannot be read .*the model directory is damaged"):
        SessionModel.load(saved)
    code = main(["evaluate", "--model", str(saved), "--data", str(saved.parent / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"raytr evaluate: error: {weights} cannot be read") and err.count("\n") == 1


def test_weights_of_another_shape_are_named_with_the_config(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["model_config"]["n_layers"] += 1
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{saved / 'model.safetensors'} does not hold the weights "
                                         f"{saved / 'config.json'} describes .*Missing key"):
        SessionModel.load(saved)
    meta["model_config"]["n_layers"] -= 1
    (saved / "config.json").write_text(json.dumps(meta))
    batch = random_batch(2)
    assert SessionModel.load(saved).score_next(batch).shape == (2, tiny_spec().item_cardinality)


# ------------------------------------------------------------------------------------ bundle copies
def _fake_prepared(root: Path, tag: str) -> Path:
    """The four entries `attach_preprocessing` copies, each holding `tag`."""
    (root / "workflow").mkdir(parents=True)
    (root / "workflow" / "workflow.pkl").write_text(tag)
    for name in ("schema.json", "schema.pbtxt", "prepare.json"):
        (root / name).write_text(tag)
    return root


def _tags(bundle: Path) -> dict[str, str]:
    return {name: (bundle / name / "workflow.pkl" if name == "workflow" else bundle / name).read_text()
            for name in ("workflow", "schema.json", "schema.pbtxt", "prepare.json")}


def test_attach_replaces_a_linked_workflow_not_the_directory_it_names(tmp_path):
    """storage.remove resolved links: removing a workflow/ link that way deleted the directory it
    named (here the user's own, elsewhere) instead of the link."""
    from raytr.bundle import attach_preprocessing

    prepared = _fake_prepared(tmp_path / "prepared", "new")
    elsewhere = _fake_prepared(tmp_path / "elsewhere", "kept")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.symlink(elsewhere / "workflow", bundle / "workflow")
    attach_preprocessing(prepared, bundle)
    assert _tags(bundle) == dict.fromkeys(_tags(bundle), "new") and not (bundle / "workflow").is_symlink()
    assert _tags(elsewhere) == dict.fromkeys(_tags(elsewhere), "kept")


def test_attach_checks_every_source_before_replacing_anything(tmp_path):
    from raytr.bundle import attach_preprocessing

    prepared = _fake_prepared(tmp_path / "prepared", "new")
    (prepared / "schema.pbtxt").unlink()
    bundle = _fake_prepared(tmp_path / "bundle", "old")
    with pytest.raises(FileNotFoundError, match=f"{prepared / 'schema.pbtxt'} is missing: {prepared} is not"):
        attach_preprocessing(prepared, bundle)
    assert _tags(bundle) == dict.fromkeys(_tags(bundle), "old")  # not a new workflow beside an old schema


def test_attach_refuses_an_output_whose_copy_would_replace_the_prepared_data(tmp_path):
    """A prepared directory at bundle/workflow (or a link there resolving to it) would be deleted
    before it is copied."""
    from raytr.bundle import attach_preprocessing

    bundle = tmp_path / "bundle"
    prepared = _fake_prepared(bundle / "workflow", "data")
    for source in (prepared, tmp_path / "link"):
        if source != prepared:
            os.symlink(prepared, source)
        with pytest.raises(ValueError, match=f"its workflow would replace the prepared data directory {str(source)!r}"):
            attach_preprocessing(source, bundle)
        assert _tags(prepared) == dict.fromkeys(_tags(prepared), "data")
