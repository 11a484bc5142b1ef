"""The jobs on an object store: synth, prepare, train and evaluate with every path an s3:// URL.

A local S3 server (moto, the `s3_bucket` fixture) stands in for the store; the Ray cluster's
processes reach it through AWS_* variables, as a cluster's nodes reach S3. What must hold: the
dataset prepared from events written there equals the one prepared from the same events on disk, training on 2 Ray Train workers reads it
in place and writes the bundle, checkpoints and TensorBoard events to the store, `raytr evaluate`
reads the model from there, and a failed prepare leaves nothing behind.
"""

from __future__ import annotations

import json

import fsspec
import pandas as pd
import pytest

from raytr import storage
from raytr.bundle import Bundle
from raytr.cli import main
from raytr.data.loaders import DataLoader
from raytr.data.layout import day_paths, load_prepare_info
from raytr.data.schema import load_schema
from raytr.evaluation import evaluate_next_item
from raytr.models import SessionModel

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = "configs/synthetic.yaml"
SMALL = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "training.num_workers=2", "--set", "training.disable_tqdm=true",
         "--set", "training.per_device_train_batch_size=64"]


def _sessions(paths: list[str]) -> pd.DataFrame:
    frame = pd.concat([storage.read_table(p).to_pandas() for p in paths], ignore_index=True)
    return frame.sort_values("session_id").reset_index(drop=True)


def _bucket_entries(bucket: str) -> list[str]:
    return sorted(storage.name(p) for p in fsspec.filesystem("s3").ls(bucket.removeprefix("s3://"), refresh=True))


def test_synth_prepare_train_evaluate_with_s3_urls(ray_cluster, s3_bucket, synth_config, prepared_dir,
                                                   prepare_summary, capsys, monkeypatch):
    monkeypatch.chdir(storage.parent(storage.parent(__file__)))  # configs/ relative to the repo
    raw, prepared, out = f"{s3_bucket}/raw", f"{s3_bucket}/prepared", f"{s3_bucket}/train"
    c = synth_config  # the events of the session's local `raw_dir`, written to the store this time
    assert main(["synth", "--output", raw, "--sessions", str(c.sessions), "--items", str(c.items), "--days",
                 str(c.days), "--seed", str(c.seed)]) == 0
    assert storage.is_file(f"{raw}/_SUCCESS") and raw in capsys.readouterr().out

    assert main(["prepare", "--config", CONFIG, "--input", raw, "--output", prepared]) == 0
    assert f"output: {prepared}" in capsys.readouterr().out
    summary = load_prepare_info(prepared)["summary"]
    assert summary["sessions"] == prepare_summary.sessions and summary["items"] == prepare_summary.items
    assert {int(d): n for d, n in summary["sessions_per_day"].items()} == prepare_summary.sessions_per_day
    assert _bucket_entries(s3_bucket) == ["prepared", "raw"]  # no staging directories left
    assert load_schema(prepared) == load_schema(prepared_dir)
    for day in prepare_summary.sessions_per_day:
        pd.testing.assert_frame_equal(_sessions(day_paths(prepared, [day])), _sessions(day_paths(prepared_dir, [day])))

    assert main(["train", "--config", CONFIG, "--data", prepared, "--output", out, "--epochs", "1", *SMALL]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_dir"] == f"{out}/model" and result["checkpoint"].startswith(f"{out}/runs/")
    for name in ("model/model.safetensors", "model/config.json", "train_result.json", "prepare.json",
                 "workflow/workflow.pkl", "schema.json"):
        assert storage.is_file(storage.join(out, name)), name
    train_result = json.loads(storage.read_text(storage.join(out, "train_result.json")))
    assert train_result["training_arguments"]["num_workers"] == 2
    events = storage.list_files(storage.join(out, "tensorboard"), suffixes=("",))
    assert any("tfevents" in e for e in events), events
    checkpoints = storage.list_files(storage.join(out, "ray_results"), suffixes=("model.safetensors",))
    assert checkpoints, "Ray Train wrote no checkpoint to the store"

    last_day = max(prepare_summary.sessions_per_day)
    assert main(["evaluate", "--model", out, "--data", prepared, "--days", str(last_day)]) == 0
    remote_metrics = json.loads(capsys.readouterr().out)
    model = SessionModel.load(result["model_dir"])
    loader = DataLoader(model.spec, day_paths(prepared_dir, [last_day]), 512, shuffle=False, engine="pyarrow")
    local_metrics = evaluate_next_item(model, loader, [5, 10, 20], False).compute()
    assert remote_metrics == {k: round(v, 6) for k, v in local_metrics.items()}

    bundle = Bundle.load(out)  # the serving path: a local copy of the bundle's files
    assert bundle.model_dir.is_dir() and (bundle.workflow_dir / "workflow.pkl").is_file()
    assert bundle.train_result["run_name"] == train_result["run_name"]
    assert Bundle.load(out).root == bundle.root  # a reload of the same version reuses the local copy


def test_failed_prepare_leaves_nothing_on_s3(ray_cluster, s3_bucket, raw_dir, capsys, monkeypatch):
    monkeypatch.chdir(storage.parent(storage.parent(__file__)))
    raw = f"{s3_bucket}/raw"
    storage.put_dir(raw_dir, raw)
    code = main(["prepare", "--config", CONFIG, "--input", raw, "--output", f"{s3_bucket}/prepared",
                 "--set", "data.min_session_length=1000"])
    assert code == 2
    assert "min_session_length=1000" in capsys.readouterr().err
    assert _bucket_entries(s3_bucket) == ["raw"]


def test_incremental_writes_its_table_and_runs_to_s3(s3_bucket, prepared_dir):
    from raytr.config import load_config
    from raytr.training.incremental import run_incremental

    config = load_config(storage.join(storage.parent(storage.parent(__file__)), CONFIG), {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
        "training": {"launcher": "local", "num_train_epochs": 1, "disable_tqdm": True},
    })
    out = f"{s3_bucket}/incremental"
    result = run_incremental(config, prepared_dir, out, start_day=2, end_day=3, baselines=False)
    assert result.output_dir == out and list(result.table["day"]) == [3]
    written = json.loads(storage.read_text(f"{out}/incremental.json"))
    assert written["per_day"][0]["ndcg@20"] == pytest.approx(result.table["ndcg@20"].iloc[0])
    with storage.local_copy(f"{out}/incremental.png") as png:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.is_file(f"{out}/train/model/model.safetensors")
    assert storage.list_files(f"{out}/train/runs", suffixes=("model.safetensors",))  # init + checkpoints
