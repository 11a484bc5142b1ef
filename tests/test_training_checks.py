"""Training settings refused up front, one line naming the key: config combinations, the cut-offs,
report_to, a checkpoint of another model, an output directory that is not a training output, and a
worker group the Ray cluster can never hold (its limits faked here: the live cluster's checks are
in test_distributed.py). No Ray cluster and no training data: a tiny model built in code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import ray
from ray.train import ScalingConfig

from raytr import ray_runtime
from raytr.config import ConfigError, ModelConfig, load_config
from raytr.features import FeatureSpec
from raytr.models import SessionModel
from raytr.training import ray_launcher
from raytr.training.arguments import TrainingArguments
from raytr.training.loop import TRAINER_STATE, _tensorboard
from raytr.training.trainer import Trainer, check_train_output

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
SPEC = FeatureSpec(item_id="item_id", item_cardinality=40, max_sequence_length=8, categorical={"category": 6})


def tiny(body: str = "gpt2", **overrides) -> ModelConfig:
    return ModelConfig(**{"body": body, "d_model": 16, "n_layers": 1, "n_heads": 2, "categorical_dim": 4,
                          **overrides})


# --------------------------------------------------------------------------- TrainingArguments
def test_ray_data_engine_with_the_local_launcher_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"training.data_loader_engine='ray' needs training.launcher='ray'"):
        TrainingArguments(launcher="local", data_loader_engine="ray")
    assert TrainingArguments(launcher="ray", data_loader_engine="ray").data_loader_engine == "ray"


def test_the_yaml_config_refuses_it_before_training():
    with pytest.raises(ConfigError, match=r"data_loader_engine='ray'.*launcher='local'"):
        load_config(CONFIG, {"training": {"launcher": "local", "data_loader_engine": "ray"}})


@pytest.mark.parametrize("top_k", [[10, 10], [5, 0], [], [2.5, 10], [True, 10]])
def test_metrics_top_k_must_be_distinct_positive_integers(top_k):
    with pytest.raises(ConfigError, match=r"training.metrics_top_k=.*distinct integers >= 1"):
        TrainingArguments(metrics_top_k=tuple(top_k), metric_for_best_model="ndcg@10")


def test_repeated_cut_offs_are_refused_when_the_yaml_is_loaded():
    with pytest.raises(ConfigError, match=r"training.metrics_top_k=\[10, 10\]"):
        load_config(CONFIG, {"training": {"metrics_top_k": [10, 10]}})


@pytest.mark.parametrize("report_to", [["wandb"], ["tensorboard", "mlflow"], ["none", "tensorboard"]])
def test_report_to_refuses_what_the_loop_does_not_write(report_to):
    with pytest.raises(ConfigError, match=r"training.report_to=.*supported are \['tensorboard'\] and \[\] or "
                                          r"\['none'\]"):
        TrainingArguments(report_to=tuple(report_to))


@pytest.mark.parametrize("report_to, writes", [(("tensorboard",), True), ((), False), (("none",), False),
                                               ("none", False), ("tensorboard", True)])
def test_report_to_none_or_empty_writes_no_tensorboard_events(report_to, writes, tmp_path):
    args = TrainingArguments(report_to=report_to, output_dir=str(tmp_path), run_name="r")
    assert all(isinstance(name, str) for name in args.report_to) and not isinstance(args.report_to, str)
    scalars = _tensorboard(args)
    assert (scalars is not None) == writes
    if scalars is not None:
        scalars.close()
    assert (tmp_path / "tensorboard" / "r").is_dir() == writes


@pytest.mark.parametrize("name", ["none", "tensorboard"])
def test_report_to_takes_one_name_in_yaml_as_hugging_face_does(name):
    assert load_config(overrides={"training": {"report_to": name}}).training.report_to == (name,)


def test_report_to_of_one_unsupported_name_or_not_a_name_is_refused():
    with pytest.raises(ConfigError, match=r"training.report_to=\['wandb'\]: supported are"):
        load_config(overrides={"training": {"report_to": "wandb"}})
    with pytest.raises(ConfigError, match=r"report_to=5: expected a list of strings, or a string$"):
        load_config(overrides={"training": {"report_to": 5}})


@pytest.mark.parametrize("resources", [{"CPU:1.5": None}, {"CPU": -1}, {"GPU": "one"}, {"CPU": float("nan")},
                                       {"CPU": float("inf")}, {"CPU": 1, 5: 2}])
def test_resources_per_worker_must_be_named_finite_numbers(resources):
    with pytest.raises(ConfigError, match=r"training.resources_per_worker=.*expected a resource name mapped to a "
                                          r"finite number >= 0"):
        TrainingArguments(resources_per_worker=resources)


def test_fp16_without_a_gpu_is_refused_before_training_and_bf16_runs_on_the_cpu():
    """fp16 autocast and its GradScaler need CUDA: the workers would fail after writing the run."""
    with pytest.raises(ConfigError, match=r"^training.fp16=true needs a GPU \(training.use_gpu=true\); on the CPU "
                                          r"use training.bf16=true"):
        load_config(CONFIG, {"training": {"fp16": True}})
    for launcher in ("local", "ray"):
        with pytest.raises(ConfigError, match=r"^training.fp16=true needs a GPU"):
            TrainingArguments(fp16=True, launcher=launcher)
    assert TrainingArguments(fp16=True, use_gpu=True).mixed_precision == "fp16"
    assert TrainingArguments(bf16=True).mixed_precision == "bf16"


@pytest.mark.parametrize("seed", [-1, 2**32, 20_000_000_000_000, 18446744073709551616])
def test_seed_out_of_range_names_the_key(seed):
    """The loaders seed with seed * 1_000_003 + ...: a large seed would overflow torch's generator mid-run."""
    with pytest.raises(ConfigError, match=rf"^training.seed={seed}: expected an integer from 0 to 2\*\*32 - 1"):
        load_config(overrides={"training": {"seed": seed}})


def test_seeds_at_the_bounds_are_accepted():
    assert TrainingArguments(seed=0).seed == 0 and TrainingArguments(seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("length", [0, 1, -3])
def test_max_sequence_length_below_two_is_refused_naming_the_key(length):
    with pytest.raises(ConfigError, match=rf"^training.max_sequence_length={length}: expected >= 2"):
        load_config(overrides={"training": {"max_sequence_length": length}})


def test_the_schemas_length_is_used_only_when_none_is_given():
    from raytr.data.schema import feature_spec, schema_from_spec

    schema = schema_from_spec(SPEC)
    assert feature_spec(schema).max_sequence_length == 8 and feature_spec(schema, 5).max_sequence_length == 5
    with pytest.raises(ValueError, match=r"max_sequence_length=0: expected >= 2"):  # not the schema's 8
        feature_spec(schema, 0)
    assert TrainingArguments(max_sequence_length=2).max_sequence_length == 2
    assert TrainingArguments().max_sequence_length is None


@pytest.mark.parametrize("name", ["", ".", "..", "../..", "/tmp/x", "a/b", "a\\b"])
def test_run_name_must_be_one_directory_name(name):
    """The run is written to <output>/runs/<run_name>: a path there would write it elsewhere."""
    with pytest.raises(ConfigError, match=re.escape(f"training.run_name={name!r}: expected one plain directory name")):
        load_config(overrides={"training": {"run_name": name}})


def test_plain_run_names_are_accepted():
    for name in ("gpt2-day6", "run.1", "..x", None):
        assert TrainingArguments(run_name=name).run_name == name


def test_avg_session_length_is_no_longer_a_key():
    """Nothing read it: it is an unknown key now, as a misspelled one is."""
    with pytest.raises(ConfigError, match=r"unknown key; known keys of training"):
        load_config(overrides={"training": {"avg_session_length": 5}})


# --------------------------------------------------------------------------- resuming another model
def _resume(tmp_path: Path, saved: ModelConfig, configured: ModelConfig) -> None:
    """Resume a Trainer of `configured` from a checkpoint of `saved` (at step 0 of epoch 0)."""
    checkpoint = tmp_path / "checkpoint"
    SessionModel(SPEC, saved, seed=0).save(checkpoint)
    (checkpoint / TRAINER_STATE).write_text('{"global_step": 0, "epoch": 0}')
    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), launcher="local", data_loader_engine="pyarrow", report_to=(),
                             disable_tqdm=True, metrics_top_k=(5, 10), predict_top_k=5,
                             resume_from_checkpoint=str(checkpoint))
    try:
        Trainer(SessionModel(SPEC, configured, seed=1), args, train_dataset_or_path=str(tmp_path / "no-data")).train()
    finally:
        assert not out.exists()  # refused (or stopped by the missing data) before anything was written


def test_resuming_a_checkpoint_of_another_body_names_the_checkpoint_and_the_difference(tmp_path):
    with pytest.raises(ValueError) as caught:
        _resume(tmp_path, tiny("gpt2"), tiny("xlnet"))
    message = str(caught.value)
    assert "\n" not in message
    assert f"training.resume_from_checkpoint {str(tmp_path / 'checkpoint')!r}" in message
    assert "the checkpoint's model does not match the configured one (model.body='gpt2' (configured 'xlnet'))" \
        in message


def test_resuming_a_checkpoint_of_another_width_names_d_model(tmp_path):
    with pytest.raises(ValueError, match=r"model.d_model=16 \(configured 32\)"):
        _resume(tmp_path, tiny(), tiny(d_model=32))


def test_settings_that_keep_the_weights_shapes_may_change_on_resume(tmp_path):
    """Past the model check, the Trainer looks for its training data (there is none here)."""
    with pytest.raises(FileNotFoundError, match="no parquet files at .*no-data") as caught:
        _resume(tmp_path, tiny(), tiny(dropout=0.3))
    assert "resume_from_checkpoint" not in str(caught.value)


# --------------------------------------------------------------------------- the output directory
def test_a_tensorboard_runs_folder_does_not_make_a_training_output(tmp_path):
    project = tmp_path / "project"
    (project / "runs" / "Dec06_host").mkdir(parents=True)
    (project / "runs" / "Dec06_host" / "events.out.tfevents.1").write_bytes(b"x")
    (project / "prepare.json").write_text("{}")  # what a bundle's attach step would replace
    with pytest.raises(ValueError, match=r"is a directory with other contents \(no train_result.json or "
                                         r"runs/\*/init/config.json"):
        check_train_output(project)
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == [
        "prepare.json", "runs", "runs/Dec06_host", "runs/Dec06_host/events.out.tfevents.1"]


def test_earlier_training_outputs_are_accepted(tmp_path):
    finished, crashed, empty = tmp_path / "finished", tmp_path / "crashed", tmp_path / "empty"
    finished.mkdir()
    (finished / "train_result.json").write_text("{}")
    SessionModel(SPEC, tiny(), seed=0).save(crashed / "runs" / "run-1" / "init")  # what train() writes first
    empty.mkdir()
    bracketed = tmp_path / "run[1]?"  # glob characters in the output's own name match themselves
    SessionModel(SPEC, tiny(), seed=0).save(bracketed / "runs" / "run-1" / "init")
    for output in (finished, crashed, empty, bracketed, tmp_path / "new"):
        check_train_output(output)


def test_incremental_outputs_are_told_by_what_their_trainer_writes(tmp_path):
    """`raytr incremental` trains into <output>/train: a bare train/ folder is anybody's."""
    from raytr.training.incremental import INCREMENTAL_OUTPUT_MARKERS

    foreign, crashed = tmp_path / "foreign", tmp_path / "crashed"
    (foreign / "train").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a directory with other contents"):
        check_train_output(foreign, markers=INCREMENTAL_OUTPUT_MARKERS)
    SessionModel(SPEC, tiny(), seed=0).save(crashed / "train" / "runs" / "day-1" / "init")
    check_train_output(crashed, markers=INCREMENTAL_OUTPUT_MARKERS)


# --------------------------------------------------------------------------- the Ray cluster's limits
def _fake_cluster(monkeypatch, limits: dict[str, float] | None, groups: list[dict[str, float]] = (),
                  live: list[dict[str, float]] = ()) -> None:
    """A connected (not started here) cluster with `live` nodes whose autoscaler publishes `limits`
    (None: none) for node `groups` (the resources of one node of each)."""
    from types import SimpleNamespace

    config = SimpleNamespace(node_group_configs=[SimpleNamespace(resources=g, max_count=2) for g in groups])
    monkeypatch.setattr(ray._private.worker, "_global_node", None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node} for node in live])
    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", lambda: limits)
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)


def test_a_worker_group_beyond_the_autoscalers_limits_is_refused_naming_the_keys(monkeypatch):
    _fake_cluster(monkeypatch, {"CPU": 16, "GPU": 4}, groups=[{"CPU": 8, "GPU": 2}])
    assert ray_runtime.cluster_limit() == ray_runtime.ClusterLimit(
        {"CPU": 16.0, "GPU": 4.0}, [{"CPU": 8.0, "GPU": 2.0}], "the most that its autoscaler's node groups allow")
    with pytest.raises(ConfigError) as caught:
        ray_launcher.check_cluster_fits(ScalingConfig(num_workers=5, use_gpu=True))
    assert str(caught.value).startswith("training.num_workers=5 x {'GPU': 1.0} per worker (training.use_gpu=true, "
                                        "training.resources_per_worker={}) needs 5 GPU (the cluster holds at most 4)")
    assert str(caught.value).endswith("lower training.num_workers, or set training.use_gpu=false, or run on a "
                                      "larger cluster (RAY_ADDRESS)")
    ray_launcher.check_cluster_fits(ScalingConfig(num_workers=4, use_gpu=True))
    # One worker asking for nothing in particular: only a larger cluster helps.
    _fake_cluster(monkeypatch, {"GPU": 4}, groups=[{"GPU": 4}])
    with pytest.raises(ConfigError, match=r"needs 1 CPU \(the cluster holds at most 0\); the cluster is the most "
                                          r"that its autoscaler's node groups allow: run on a larger cluster"):
        ray_launcher.check_cluster_fits(ScalingConfig(num_workers=1))


def test_a_worker_larger_than_every_node_is_refused_though_the_cluster_holds_it_in_all(monkeypatch):
    """Ray places each worker's resources on one node: 12 CPUs fit in two 8-CPU nodes' 16, one
    12-CPU worker never does."""
    _fake_cluster(monkeypatch, {"CPU": 16, "GPU": 2}, groups=[{"CPU": 8, "GPU": 1}], live=[{"CPU": 2, "memory": 4e9}])
    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 12})
    with pytest.raises(ConfigError) as caught:
        ray_launcher.check_cluster_fits(scaling)
    assert str(caught.value) == (
        "one worker needs {'CPU': 12.0} on one node (training.use_gpu=false, training.resources_per_worker="
        "{'CPU': 12}) and no node of the cluster holds that (its nodes hold: 2 CPU; 8 CPU); the cluster is the "
        "most that its autoscaler's node groups allow: lower training.resources_per_worker, or run on a "
        "cluster with larger nodes (RAY_ADDRESS)")
    # Two GPUs in all, one a node: a worker asking for two with use_gpu is never placed either.
    with pytest.raises(ConfigError, match=r"one worker needs \{'CPU': 2.0, 'GPU': 2.0\} on one node .*its nodes "
                                          r"hold: 2 CPU; 8 CPU, 1 GPU\).*: set training.use_gpu=false, or lower "):
        ray_launcher.check_cluster_fits(ScalingConfig(num_workers=1, use_gpu=True,
                                                      resources_per_worker={"CPU": 2, "GPU": 2}))
    with pytest.raises(ConfigError, match=r"\(its nodes hold: 2 CPU; 8 CPU, 1 GPU\); .*: lower training.resources_"
                                          r"per_worker, or run on a cluster with larger nodes"):  # GPUs are not short
        ray_launcher.check_cluster_fits(ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"CPU": 9}))
    ray_launcher.check_cluster_fits(ScalingConfig(num_workers=2, resources_per_worker={"CPU": 8}))
    ray_launcher.check_cluster_fits(ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker={"CPU": 4}))


def test_worker_resources_are_what_ray_reserves_for_each_worker():
    assert ray_launcher.worker_resources(ScalingConfig(num_workers=2)) == {"CPU": 1.0}
    assert ray_launcher.worker_resources(ScalingConfig(num_workers=2, use_gpu=True)) == {"GPU": 1.0}
    assert ray_launcher.worker_resources(ScalingConfig(num_workers=2, use_gpu=True, resources_per_worker={
        "CPU": 3, "memory": 0})) == {"CPU": 3.0, "GPU": 1.0}
    for scaling in (ScalingConfig(num_workers=3, use_gpu=True, resources_per_worker={"CPU": 2, "GPU": 0.5}),
                    ScalingConfig(num_workers=1)):
        assert ray_launcher.worker_resources(scaling) == {k: float(v) for k, v in
                                                          scaling._resources_per_worker_not_none.items()}


def test_a_cluster_that_may_grow_only_warns_that_the_run_waits(monkeypatch, caplog):
    _fake_cluster(monkeypatch, None)
    assert ray_runtime.cluster_limit() is None
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    with caplog.at_level(logging.WARNING, logger="raytr.training.ray_launcher"):
        ray_launcher.check_cluster_fits(ScalingConfig(num_workers=3))
    assert "needs 3 CPU (the cluster has 2) now: the run waits until the cluster adds nodes" in caplog.text


def test_resource_shortfall_counts_a_missing_resource_as_none():
    assert ray_launcher.resource_shortfall({"CPU": 3.0, "GPU": 1.0}, {"CPU": 4.0}) == {"GPU": (1.0, 0.0)}
    assert ray_launcher.resource_shortfall({"CPU": 0.5}, {"CPU": 0.5}) == {}
