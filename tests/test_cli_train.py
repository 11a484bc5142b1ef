"""`raytr train` and `raytr evaluate` as a user runs them: subprocesses, JSON on stdout, exit codes.

Training uses `--set training.launcher=local` (the same loop without Ray Train) and a tiny model, to
keep each command to seconds; tests/test_jobs.py runs `raytr train` on Ray Train through
`ray job submit`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raytr.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "training.launcher=local", "--set", "training.disable_tqdm=true",
         "--set", "training.per_device_train_batch_size=64"]

pytestmark = pytest.mark.slow


def raytr(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytr.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cli_trained(prepared_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cli") / "model"
    proc = raytr("train", "--config", "configs/synthetic.yaml", "--data", str(prepared_dir), "--output", str(out),
                 "--epochs", "1", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)  # stdout is the JSON summary and nothing else


def test_train_prints_json_summary_and_writes_a_bundle(cli_trained):
    out, summary = cli_trained
    assert set(summary) == {"model_dir", "checkpoint", "metrics"}
    assert summary["model_dir"] == str(out / "model")
    assert Path(summary["checkpoint"]).is_dir()
    assert {"eval_ndcg@10", "eval_recall@20", "eval_mrr@20"} <= set(summary["metrics"])
    assert all(k.startswith("eval_") and 0.0 <= v <= 1.0 for k, v in summary["metrics"].items())
    bundle = Bundle.load(out)  # model + workflow + schema + prepare.json
    assert (bundle.model_dir / "model.safetensors").is_file()
    result = json.loads((out / "train_result.json").read_text())
    assert result["training_arguments"]["launcher"] == "local"
    assert result["training_arguments"]["num_train_epochs"] == 1  # --epochs wins over the YAML's 5
    assert result["model_config"]["d_model"] == 32


def test_evaluate_prints_exactly_one_json_object(cli_trained, prepared_dir):
    out, summary = cli_trained
    proc = raytr("evaluate", "--model", str(out), "--data", str(prepared_dir), "--days", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    metrics = json.loads(proc.stdout)
    assert {"ndcg@10", "recall@20", "mrr@5", "precision@20", "map@10"} <= set(metrics)
    # `raytr train` evaluated the same model on the same (last) day.
    for key, value in metrics.items():
        assert value == pytest.approx(summary["metrics"][f"eval_{key}"], abs=1e-4), key

    # The model/ directory itself works too, and --top-k picks the cut-offs.
    proc = raytr("evaluate", "--model", str(out / "model"), "--data", str(prepared_dir), "--days", "3-4",
                 "--top-k", "3", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout)) == {f"{m}@{k}" for m in ("precision", "recall", "ndcg", "map", "mrr")
                                            for k in (3, 50)}


def test_evaluate_without_sessions_exits_2_with_one_line(cli_trained, tmp_path):
    out, _ = cli_trained
    empty = tmp_path / "nothing"
    empty.mkdir()
    proc = raytr("evaluate", "--model", str(out), "--data", str(empty))
    assert proc.returncode == 2
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raytr evaluate: error:")]
    assert len(errors) == 1 and "no parquet files" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_missing_day_exits_2(cli_trained, prepared_dir):
    out, _ = cli_trained
    proc = raytr("evaluate", "--model", str(out), "--data", str(prepared_dir), "--days", "9")
    assert proc.returncode == 2
    assert "raytr evaluate: error: day(s) [9] not in" in proc.stderr and "Traceback" not in proc.stderr


def test_train_refuses_an_output_that_would_destroy_data(prepared_dir, tmp_path, capsys):
    """Refused before training starts, leaving everything as it was: the prepared data as the output
    (its workflow/ would be copied onto itself, i.e. deleted), an output inside it, a directory that
    is not an earlier training output (its model/ would be replaced), a file."""
    from raytr.cli import main

    data = tmp_path / "prepared"  # a copy: the old code deleted the workflow of what it was given
    shutil.copytree(prepared_dir, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.bin").write_bytes(b"the user's own model")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, message in [(data, f"output {str(data)!r} holds the input {str(data)!r}"),
                            (data / "bundle", f"output {str(data / 'bundle')!r} is inside the input data"),
                            (mine, f"output {str(mine)!r} is a directory with other contents "
                                   "(no train_result.json or runs"),
                            (a_file, f"output {str(a_file)!r} is a file")]:
        code = main(["train", "--config", "configs/synthetic.yaml", "--data", str(data), "--output", str(output),
                     "--epochs", "1", *SMALL])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"raytr train: error: {message}"), err
    from raytr.bundle import attach_preprocessing

    with pytest.raises(ValueError, match="is the prepared data directory itself"):
        attach_preprocessing(data, str(data) + "/")  # the library function refuses it too
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert (mine / "model" / "weights.bin").read_bytes() == b"the user's own model"
    assert sorted(p.name for p in mine.iterdir()) == ["model"] and a_file.read_text() == "x"


def test_train_again_into_its_own_output_replaces_the_model(cli_trained, prepared_dir, tmp_path):
    """An earlier `raytr train` output is written again (its model/ replaced, nothing left beside it);
    so is one whose run crashed before train_result.json (it has runs/<run>/init/config.json, written
    first, which a set run_name resumes)."""
    out, _ = cli_trained
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "train_result.json").unlink()  # as a crashed run leaves it
    old_weights = (again / "model" / "model.safetensors").read_bytes()
    proc = raytr("train", "--config", "configs/synthetic.yaml", "--data", str(prepared_dir), "--output", str(again),
                 "--epochs", "1", *SMALL, "--set", "model.n_layers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "model" / "model.safetensors").read_bytes() != old_weights
    assert json.loads((again / "model" / "config.json").read_text())["model_config"]["n_layers"] == 2
    assert not [p.name for p in again.iterdir() if p.name.startswith(".")]  # no staging copy left


def test_evaluate_names_a_bad_data_file_a_missing_column_a_top_k_beyond_the_catalog_and_a_corrupt_model(
        prepared_dir, prepared_spec, tmp_path, capsys):
    import pyarrow.parquet as pq

    from raytr.cli import main
    from raytr.config import ModelConfig
    from raytr.data.layout import day_paths
    from raytr.features import FIRST_ITEM_ID
    from raytr.models import SessionModel

    model_dir = tmp_path / "bundle"
    SessionModel(prepared_spec, ModelConfig(d_model=16, n_layers=1, n_heads=2, categorical_dim=4), seed=0).save(
        model_dir / "model")
    column = next(iter(prepared_spec.categorical))
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(pq.read_table(day_paths(prepared_dir, [4])[0]).drop([column]), lacking)
    catalog = prepared_spec.item_cardinality - FIRST_ITEM_ID

    def error(*argv: str) -> str:
        assert main(["evaluate", "--model", str(model_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("raytr evaluate: error: "), err
        return err

    assert f"{prepared_dir / 'schema.json'} is not a parquet file" in error("--data", str(prepared_dir / "schema.json"))
    assert f"{lacking} has no column {column!r}, which the model reads" in error("--data", str(lacking))
    assert (f"--top-k {catalog + 1}: expected cut-offs from 1 to the model's catalog size, {catalog} items"
            in error("--data", str(prepared_dir), "--top-k", "5", str(catalog + 1)))
    config = model_dir / "model" / "config.json"
    config.write_text(config.read_text()[:40])
    assert f"{config} is not valid JSON" in error("--data", str(prepared_dir))


def test_evaluate_refuses_data_prepared_by_another_run_than_the_model(prepared_dir, prepared_spec, tmp_path, capsys):
    """Another `raytr prepare` run maps item ids to other items: scoring it would give wrong metrics
    without any error, so evaluate compares the workflows' category files first."""
    import shutil

    import pyarrow.parquet as pq

    from raytr.cli import main
    from raytr.config import ModelConfig
    from raytr.models import SessionModel

    bundle = tmp_path / "bundle"
    SessionModel(prepared_spec, ModelConfig(d_model=16, n_layers=1, n_heads=2, categorical_dim=4), seed=0).save(
        bundle / "model")
    shutil.copytree(prepared_dir / "workflow", bundle / "workflow")
    for model in (bundle, bundle / "model"):  # the bundle or its model directory
        assert main(["evaluate", "--model", str(model), "--data", str(prepared_dir), "--days", "4"]) == 0
        assert '"ndcg@10"' in capsys.readouterr().out
    items = bundle / "workflow" / "categories" / "unique.item_id.parquet"
    table = pq.read_table(items)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), items)  # the same items, other ids
    day = prepared_dir / "sessions" / "day=4"
    # The dataset, and its sessions, one day or one file given as the data (they lie in it).
    for model, data in [(bundle, prepared_dir), (bundle / "model", prepared_dir), (bundle, prepared_dir / "sessions"),
                        (bundle, day), (bundle, next(day.glob("*.parquet")))]:
        args = ["--days", "4"] if data in (prepared_dir, prepared_dir / "sessions") else []
        assert main(["evaluate", "--model", str(model), "--data", str(data), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was prepared by another `raytr prepare` run than the model" in err, err
