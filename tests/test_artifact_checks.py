"""Artifacts that are damaged, in the way or mismatched: a model whose weights file cannot be read is
a one-line error naming it, attaching the preprocessing to a bundle replaces raytr's own copies
only, and a bundle's workflow must be the one its model's data was encoded with."""

from __future__ import annotations

import json
import os
from dataclasses import replace
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


def test_a_bundle_whose_workflow_is_not_the_models_data_is_refused(prepared_dir, prepared_spec, tmp_path):
    """Training records the digest of the workflow that encoded its data; a bundle pairing the model
    with another prepare run's workflow (equal catalog, other items per id) was served silently with
    wrong items. Its version changes with the workflow too; data of two prepare runs is refused."""
    import shutil

    import pyarrow.parquet as pq

    from raytr.bundle import Bundle, attach_preprocessing
    from raytr.config import ModelConfig
    from raytr.data.layout import categories_digest, day_paths
    from raytr.training.arguments import TrainingArguments
    from raytr.training.trainer import Trainer

    out = tmp_path / "bundle"
    args = TrainingArguments(output_dir=str(out), launcher="local", num_train_epochs=1, data_loader_engine="pyarrow",
                             per_device_train_batch_size=256, disable_tqdm=True, report_to=(), save_total_limit=1)
    model = SessionModel(prepared_spec, ModelConfig(d_model=16, n_layers=1, n_heads=2, categorical_dim=4), seed=0)
    Trainer(model, args, train_dataset_or_path=day_paths(prepared_dir, [1])).train()
    attach_preprocessing(prepared_dir, out)
    assert json.loads((out / "train_result.json").read_text())["workflow_digest"] == categories_digest(prepared_dir)
    version = Bundle.load(out).version

    items = out / "workflow" / "categories" / "unique.item_id.parquet"
    table = pq.read_table(items)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), items)  # the same items, other ids
    with pytest.raises(ValueError, match=r"bundle/workflow is not the workflow the model in .*bundle/model was "
                                         r"trained with \(another `raytr prepare` run\)"):
        Bundle.load(out)
    result = json.loads((out / "train_result.json").read_text())
    (out / "train_result.json").write_text(json.dumps({**result, "workflow_digest": None}))  # e.g. a Ray Dataset's
    assert Bundle.load(out).version != version  # not checked then, but a new version

    other = tmp_path / "other"
    shutil.copytree(prepared_dir, other)
    shutil.copy(items, other / "workflow" / "categories" / "unique.item_id.parquet")
    trainer = Trainer(model, replace(args, output_dir=str(tmp_path / "mixed")),
                      train_dataset_or_path=[*day_paths(prepared_dir, [1]), *day_paths(other, [2])])
    with pytest.raises(ValueError, match=r"the data mixes sessions of two `raytr prepare` runs"):
        trainer.train()
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("content", [b'{"data": {', b"\xff\xfe{}"])
def test_a_bundles_prepare_json_that_is_not_json_is_named(tmp_path, content):
    from raytr.bundle import read_data_config

    (tmp_path / "prepare.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"prepare\.json is not valid JSON .*copy it again from the `raytr prepare` "):
        read_data_config(tmp_path)
