"""Trainer with launcher="ray": DDP over 2 gloo workers on Ray Train's TorchTrainer.

Each `TorchTrainer.fit` costs 30-40 s on 2 cores, so the file runs five of them:
    merlin engine, 2 workers, rows that do not split evenly, then a second train() (a new run)
    ray (Ray Data) engine, 2 workers
    fault tolerance: a worker SIGKILLed after the first checkpoint, max_failures=1
    a NaN loss on one worker only: both stop with TrainingDivergedError (no hang)
All use the shared `ray_cluster` (4 logical CPUs: two 1-CPU workers plus Ray Data's tasks) and a
tiny GPT-2 that starts from the same saved weights, so runs can be compared.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytr.config import ModelConfig
from raytr.data.loaders import DataLoader
from raytr.data.layout import day_paths
from raytr.models import SessionModel
from raytr.training.arguments import TrainingArguments
from raytr.training.loop import TRAINING_STATE, TrainingDivergedError, read_trainer_state
from raytr.training.trainer import Trainer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BATCH = 64
UNEVEN_ROWS = 2 * BATCH * 5 + 1  # 641: rank 0 gets 321 rows (6 batches of <=64), rank 1 gets 320 (5)


@pytest.fixture(scope="module")
def init_model_dir(prepared_spec, tmp_path_factory) -> Path:
    """Starting weights shared by every run of this module."""
    torch.manual_seed(0)
    model = SessionModel(prepared_spec, ModelConfig(d_model=32, n_layers=1, n_heads=2, categorical_dim=8), seed=0)
    return model.save(tmp_path_factory.mktemp("dist") / "init")


@pytest.fixture(scope="module")
def uneven_file(prepared_dir, tmp_path_factory) -> Path:
    """One parquet file with an odd number of sessions from days 1-2."""
    table = pa.concat_tables(pq.read_table(p) for p in day_paths(prepared_dir, [1, 2]))
    assert table.num_rows > UNEVEN_ROWS
    path = tmp_path_factory.mktemp("uneven") / "part-0.parquet"
    pq.write_table(table.slice(0, UNEVEN_ROWS), path)
    return path


def ray_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), launcher="ray", num_workers=2, num_train_epochs=2,
                  per_device_train_batch_size=BATCH, learning_rate=5e-3, disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def rank_steps(spec, paths: list[str], world_size: int = 2) -> list[int]:
    return [len(DataLoader(spec, paths, BATCH, shuffle=True, engine="pyarrow", rank=r, world_size=world_size))
            for r in range(world_size)]


def snapshot(run_dir: Path) -> dict:
    """Ray Train's record of the reported checkpoints of one run."""
    return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())


def ray_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


@pytest.mark.timeout(300)
def test_merlin_engine_two_workers_uneven_rows_and_a_new_run(ray_cluster, prepared_dir, prepared_spec, init_model_dir,
                                                             uneven_file, tmp_path):
    paths, eval_paths = [str(uneven_file)], day_paths(prepared_dir, [4])
    # A per-rank batch count would differ (6 vs 5) and hang DDP; the loader gives every rank 6.
    assert [math.ceil(n / BATCH) for n in (321, 320)] == [6, 5]
    steps = rank_steps(prepared_spec, paths)
    assert steps == [6, 6]
    epochs = 3
    # greater_is_better=False ranks the improving latest checkpoint worst: Ray keeps the latest on top
    # of `num_to_keep`, and save_total_limit=2 must still mean at most 2 checkpoints on disk.
    args = ray_args(tmp_path / "out", num_train_epochs=epochs, data_loader_engine="merlin", save_total_limit=2,
                    greater_is_better=False)
    trainer = Trainer(SessionModel.load(init_model_dir), args, train_dataset_or_path=paths,
                      eval_dataset_or_path=eval_paths)
    untrained = trainer.evaluate()
    output = trainer.train()

    final = read_trainer_state(Path(output.checkpoint))
    assert final["epoch"] == epochs - 1
    assert final["global_step"] == steps[0] * epochs  # every rank ran the same steps (else gloo hangs)
    run_dir = tmp_path / "out" / "ray_results" / output.run_name
    kept = ray_checkpoints(run_dir)
    assert len(kept) in (1, 2), kept
    assert len(snapshot(run_dir)["checkpoint_results"]) == len(kept)
    kept_scores = {str(c): read_trainer_state(c)["metrics"]["eval_ndcg@10"] for c in kept}
    assert output.best_checkpoint == min(kept_scores, key=kept_scores.get)

    trained = trainer.evaluate()
    assert trained["eval_ndcg@10"] > untrained["eval_ndcg@10"] + 0.05, (untrained, trained)
    assert output.metrics["eval_ndcg@10"] == pytest.approx(trained["eval_ndcg@10"], abs=1e-9)

    # One worker (the same loop in-process) from the same weights on the same rows: comparable.
    single = Trainer(SessionModel.load(init_model_dir), replace(args, launcher="local", num_workers=1,
                                                                output_dir=str(tmp_path / "one")),
                     train_dataset_or_path=paths, eval_dataset_or_path=eval_paths)
    single.train()
    one = single.evaluate()["eval_ndcg@10"]
    two = trained["eval_ndcg@10"]
    assert abs(two - one) < 0.1, (one, two)  # ndcg@10 ~0.3 either way; 2 workers take half the steps

    # A second train() gets a new run name: it must not resume the finished run (which would skip
    # training and report its step count), but train a fresh epoch from the current weights.
    trainer.args = replace(args, num_train_epochs=1)
    again = trainer.train()
    assert again.run_name != output.run_name
    state = read_trainer_state(Path(again.checkpoint))
    assert state["epoch"] == 0 and state["global_step"] == steps[0]
    adam = torch.load(Path(again.checkpoint) / TRAINING_STATE, weights_only=True)["optimizer"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {steps[0] * (epochs + 1)}  # optimizer state carried over
    assert sorted(p.name for p in (tmp_path / "out" / "ray_results").iterdir()) == sorted(
        [output.run_name, again.run_name])


@pytest.mark.timeout(300)
def test_a_nan_on_one_worker_stops_both_with_the_divergence_error(ray_cluster, uneven_file, prepared_spec,
                                                                  init_model_dir, tmp_path):
    """Rank 1's share holds an infinite feature, so only its loss is NaN: the per-step all-reduce of
    the check tells rank 0 too, and the run fails at once instead of hanging in the next all-reduce."""
    table = pq.read_table(uneven_file)
    price = [spec for spec in prepared_spec.continuous if spec.startswith("price")][0]
    column = table.column(price).to_pylist()
    half = len(column) // 2 + 1  # rank 1's contiguous share is the second half
    column = column[:half] + [[float("inf")] * len(row) for row in column[half:]]
    poisoned = tmp_path / "poisoned.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index(price), price,
                                    pa.array(column, table.schema.field(price).type)), poisoned)
    args = ray_args(tmp_path / "out", num_train_epochs=1, data_loader_engine="pyarrow")
    trainer = Trainer(SessionModel.load(init_model_dir), args, train_dataset_or_path=[str(poisoned)])
    started = time.monotonic()
    with pytest.raises(TrainingDivergedError) as info:  # the workers' own error, not Ray's WorkerGroupError
        trainer.train()
    # Whichever rank's error Ray reports, it names the mean loss over the ranks, not its own finite one.
    assert "loss is nan at epoch 0, step 0" in str(info.value), str(info.value)[-2000:]
    assert time.monotonic() - started < 240


@pytest.mark.timeout(300)
def test_a_user_error_in_the_workers_is_raised_as_itself(ray_cluster, prepared_dir, prepared_spec, tmp_path):
    """Ids beyond the model's cardinality are found by each worker's loader: the driver raises the
    workers' ValueError (one line from `raytr train`, naming the column and file), not Ray's
    WorkerGroupError traceback dump."""
    small = replace(prepared_spec, item_cardinality=50)
    model = SessionModel(small, ModelConfig(d_model=32, n_layers=1, n_heads=2, categorical_dim=8), seed=0)
    args = ray_args(tmp_path / "out", num_train_epochs=1, data_loader_engine="pyarrow", metrics_top_k=(5, 10))
    trainer = Trainer(model, args, train_dataset_or_path=day_paths(prepared_dir, [1]))
    with pytest.raises(ValueError, match=r"^column 'item_id-list' has id \d+ in .*part-\d+\.parquet \(row \d+") as info:
        trainer.train()
    assert type(info.value) is ValueError


def test_user_error_of_picks_the_lowest_ranks_user_error_and_nothing_else():
    from ray.train import WorkerGroupError

    from raytr.errors import USER_ERRORS
    from raytr.training.ray_launcher import user_error_of

    bad_lr, diverged = ValueError("training.learning_rate=..."), TrainingDivergedError("loss is nan")
    assert user_error_of(WorkerGroupError("dump", {1: bad_lr, 0: RuntimeError("CUDA error")})) is bad_lr
    assert user_error_of(WorkerGroupError("dump", {1: bad_lr, 0: diverged})) is diverged
    assert isinstance(diverged, USER_ERRORS)  # `raytr train` prints it as one line
    denied = PermissionError(13, "Permission denied", "/mnt/out/ray_results")
    assert user_error_of(WorkerGroupError("dump", {0: denied})) is denied
    # a bug or a crash keeps Ray's error, with every worker's traceback
    assert user_error_of(WorkerGroupError("dump", {0: ZeroDivisionError(), 1: PermissionError("no path")})) is None
    assert user_error_of(WorkerGroupError("dump", {})) is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resource", ["CPU", "GPU"])
def test_a_worker_group_the_local_cluster_can_never_hold_is_refused_at_once(ray_cluster, prepared_dir, prepared_spec,
                                                                          tmp_path, resource):
    """The session's cluster was started by this process (ray.init(num_cpus=4)), so no node joins
    it: one worker more than it has CPUs (or GPUs, with use_gpu) is a ConfigError naming the keys
    before the Trainer writes anything, where Ray Train would wait for the workers forever."""
    import ray

    from raytr.config import ConfigError

    has = ray.cluster_resources().get(resource, 0.0)
    args = ray_args(tmp_path / "out", num_workers=int(has) + 1, use_gpu=resource == "GPU")
    trainer = Trainer(SessionModel(prepared_spec, ModelConfig(d_model=16, n_layers=1, n_heads=2), seed=0), args,
                      train_dataset_or_path=day_paths(prepared_dir, [1]))
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith(f"training.num_workers={int(has) + 1} x ")
    assert f"training.use_gpu={'true' if resource == 'GPU' else 'false'}" in message
    assert f"needs {int(has) + 1} {resource} (the cluster holds at most {has:g}); the cluster is a local Ray " \
           "cluster that this process started, which adds no nodes" in message
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()  # nothing written: no init model, no ray_results


@pytest.mark.timeout(300)
def test_ray_data_engine_two_workers(ray_cluster, prepared_dir, prepared_spec, init_model_dir, tmp_path):
    paths, eval_paths = day_paths(prepared_dir, [1, 2]), day_paths(prepared_dir, [4])
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    args = ray_args(tmp_path / "out", data_loader_engine="ray", save_total_limit=1)
    trainer = Trainer(SessionModel.load(init_model_dir), args, train_dataset_or_path=paths,
                      eval_dataset_or_path=eval_paths)
    untrained = trainer.evaluate()
    output = trainer.train()
    final = read_trainer_state(Path(output.checkpoint))
    # Ray Data splits the shards with equal row counts (the remainder row is dropped).
    assert final["epoch"] == 1 and final["global_step"] == 2 * math.ceil((rows // 2) / BATCH)
    assert len(ray_checkpoints(tmp_path / "out" / "ray_results" / output.run_name)) == 1
    trained = trainer.evaluate()
    assert trained["eval_ndcg@10"] > untrained["eval_ndcg@10"] + 0.05, (untrained, trained)


def ray_engine_config(tmp_path: Path, tables: list[pa.Table], spec=None, **args):
    """A LoopConfig of the Ray Data engine over `tables`, each written as tmp_path/part-<i>.parquet."""
    from raytr.features import FeatureSpec
    from raytr.training.loop import LoopConfig

    paths = []
    for i, table in enumerate(tables):
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table, paths[-1])
    spec = spec or FeatureSpec(item_id="item_id-list", item_cardinality=1000, max_sequence_length=5)
    args = TrainingArguments(**{"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4,
                                "num_workers": 2, "data_loader_engine": "ray", **args})
    return LoopConfig(spec=spec, model_config=ModelConfig(), args=args, init_model_dir="unused",
                      train_paths=tuple(paths))


def sessions(rows: range) -> pa.Table:
    """Session r is [3 + r, 500 + r]."""
    return pa.table({"item_id-list": pa.array([[3 + r, 500 + r] for r in rows], pa.list_(pa.int64()))})


def consume_shards(engines: list, epoch: int) -> list[list]:
    """Every worker's batches of `epoch` from `ray_data_batches` engines over the shards of one
    `streaming_split`, consumed concurrently as a TorchTrainer's workers do (one shard alone may
    wait for the others)."""
    got: list[list] = [[] for _ in engines]
    errors: list[BaseException] = []

    def consume(worker: int) -> None:
        try:
            got[worker] = list(engines[worker][0](epoch))
        except BaseException as exc:  # a thread's failure would only be a warning: fail the test with it
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(w,)) for w in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker's batches did not finish within 120 s"
    if errors:
        raise errors[0]
    return got


@pytest.mark.ray
def test_ray_data_engine_equal_steps_each_session_once_and_a_new_order_every_epoch(ray_cluster, tmp_path):
    """The Ray Data engine's three facts (and list types differing between files), on the shards a TorchTrainer's 2 workers would get
    (`streaming_split(2, equal=True)`, consumed concurrently as workers do)."""
    from raytr.training.ray_launcher import ray_data_batches, ray_train_dataset

    # 63 sessions in 2 uneven files, the second with int32 lists (another writer than prepare)
    second = sessions(range(37, 63)).cast(pa.schema([("item_id-list", pa.list_(pa.int32()))]))
    cfg = ray_engine_config(tmp_path, [sessions(range(0, 37)), second])
    ds, rows_per_worker = ray_train_dataset(cfg)
    assert rows_per_worker == 31  # the 63rd session is dropped by the equal split
    engines = [ray_data_batches(shard, cfg, torch.device("cpu"), rows_per_worker)
               for shard in ds.streaming_split(2, equal=True)]
    assert [steps for _, steps in engines] == [8, 8]  # ceil(31 / 4) on every worker

    orders = []
    for epoch in range(2):
        sessions_seen = []
        for worker, batches in enumerate(consume_shards(engines, epoch)):
            assert len(batches) == 8, (epoch, worker, len(batches))
            for batch in batches:
                first = batch.item_ids[:, :1]  # session r is [3 + r, 500 + r], right-padded to T = 5
                assert torch.equal(batch.item_ids,
                                   torch.cat([first, first + 497, torch.zeros_like(first).expand(-1, 3)], 1))
                assert batch.num_causal_targets == len(batch)  # one target each: 500 + r follows 3 + r
                sessions_seen += (batch.item_ids[:, 0] - 3).tolist()
        assert len(sessions_seen) == 62 and len(set(sessions_seen)) == 62 and set(sessions_seen) <= set(range(63))
        orders.append(sessions_seen)
    assert orders[0] != orders[1]


@pytest.mark.ray
def test_ray_data_engine_drop_last_gives_the_other_engines_step_count(ray_cluster, tmp_path):
    """dataloader_drop_last: (63 // 2) // 4 = 7 full batches per worker, as DataLoader counts them."""
    from raytr.training.ray_launcher import ray_data_batches, ray_train_dataset

    cfg = ray_engine_config(tmp_path, [sessions(range(0, 37)), sessions(range(37, 63))], dataloader_drop_last=True)
    ds, rows_per_worker = ray_train_dataset(cfg)
    engines = [ray_data_batches(shard, cfg, torch.device("cpu"), rows_per_worker)
               for shard in ds.streaming_split(2, equal=True)]
    assert [steps for _, steps in engines] == [7, 7]
    batches = consume_shards(engines, 0)
    assert [[len(b) for b in worker] for worker in batches] == [[4] * 7, [4] * 7]
    seen = [int(r) for worker in batches for b in worker for r in b.item_ids[:, 0] - 3]
    assert len(seen) == len(set(seen)) == 56
    with pytest.raises(ValueError, match=r"^63 sessions over 2 worker\(s\) make no full batch of 40"):
        ray_train_dataset(replace(cfg, args=replace(cfg.args, per_device_train_batch_size=40)))


def test_ray_data_engine_refuses_a_file_given_twice(tmp_path):
    from raytr.training.ray_launcher import ray_train_dataset

    cfg = ray_engine_config(tmp_path, [sessions(range(0, 3)), sessions(range(3, 6))])
    cfg = replace(cfg, train_paths=(*cfg.train_paths, str(tmp_path / "." / "part-0.parquet")))
    with pytest.raises(ValueError, match=r"part-0\.parquet is given twice"):
        ray_train_dataset(cfg)  # before Ray Data reads anything


BAD_SECOND_FILE = {  # the second file of two, and the error naming it
    "null id": ([[3, 4], [5, 6], [7, None]],
                r"^column 'item_id-list' holds null values in \S*part-1\.parquet \(row 2, "),
    "id out of range": ([[3, 4], [5, 6], [7, 1000]],
                        r"^column 'item_id-list' has id 1000 in \S*part-1\.parquet \(row 2, "),
    "missing column": (None, r"part-1\.parquet has no column 'category-list'"),
}


@pytest.mark.ray
@pytest.mark.parametrize("case", BAD_SECOND_FILE)
def test_ray_data_engine_names_the_file_of_a_bad_value(ray_cluster, tmp_path, case):
    """Ray Data reads a file without a column as null lists, and its rows do not say which file
    they came from: the error names the column and the file all the same."""
    from raytr.features import FeatureSpec
    from raytr.training.ray_launcher import ray_data_batches, ray_train_dataset

    items, match = BAD_SECOND_FILE[case]
    good = {"item_id-list": [[3, 4], [5, 6], [7, 8]], "category-list": [[3, 3], [4, 4], [5, 5]]}
    bad = {"item_id-list": items or good["item_id-list"]} | ({"category-list": good["category-list"]} if items else {})
    lists = pa.list_(pa.int64())
    spec = FeatureSpec(item_id="item_id-list", item_cardinality=1000, max_sequence_length=5,
                       categorical={"category-list": 10})
    cfg = ray_engine_config(tmp_path, [pa.table({k: pa.array(v, lists) for k, v in table.items()})
                                       for table in (good, bad)], spec=spec, num_workers=1)
    ds, rows_per_worker = ray_train_dataset(cfg)
    batches, _ = ray_data_batches(ds.iterator(), cfg, torch.device("cpu"), rows_per_worker)
    with pytest.raises(ValueError, match=match):
        list(batches(0))


def _train_worker_processes():
    """RayTrainWorker processes of this test session's cluster: descendants of this process (its
    raylet). `ray.util.state.list_actors` needs the dashboard, which the shared cluster does not
    start, and without it would query whatever cluster answers on the default port."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] == ["ray::RayTrainWorker"]:
                found.append((proc.create_time(), proc))
        except psutil.Error:
            pass
    return [proc for _, proc in sorted(found, key=lambda tp: tp[0])]  # oldest first


@pytest.mark.timeout(300)
def test_killed_worker_restarts_and_resumes_from_the_last_checkpoint(ray_cluster, prepared_dir, prepared_spec,
                                                                     init_model_dir, tmp_path):
    paths = day_paths(prepared_dir, [1, 2])
    steps, epochs = rank_steps(prepared_spec, paths)[0], 4
    out_dir = tmp_path / "out"
    args = ray_args(out_dir, num_train_epochs=epochs, max_failures=1, save_total_limit=10, data_loader_engine="pyarrow")
    trainer = Trainer(SessionModel.load(init_model_dir), args, train_dataset_or_path=paths,
                      eval_dataset_or_path=day_paths(prepared_dir, [4]))
    result: dict = {}

    def train() -> None:
        try:
            result["output"] = trainer.train()
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    # Wait until Ray Train has registered the first checkpoint of the run.
    deadline, reported_before = time.monotonic() + 180, None
    while time.monotonic() < deadline and thread.is_alive():
        for run_dir in (out_dir / "ray_results").glob("*/"):
            try:
                snap = snapshot(run_dir)
            except (OSError, ValueError):
                continue
            if snap.get("latest_checkpoint_result"):
                reported_before = [r["metrics"]["epoch"] for r in snap["checkpoint_results"]]
        if reported_before:
            break
        time.sleep(0.2)
    assert reported_before, f"no checkpoint reported within 180 s: {result}"
    workers = _train_worker_processes()
    if not workers:
        thread.join(240)
        pytest.skip("the Ray workers are not child processes of this test process (an external cluster)")
    assert len(workers) >= 2, workers
    victim = workers[-1].pid  # the newest: a worker of this run's group
    os.kill(victim, signal.SIGKILL)
    thread.join(240)
    assert not thread.is_alive(), "training did not finish within 240 s after the worker was killed"
    assert "error" not in result, result.get("error")

    assert max(reported_before) < epochs, "the worker was killed after training ended: nothing tested"
    output = result["output"]
    final = read_trainer_state(Path(output.checkpoint))
    assert final["epoch"] == epochs - 1 and final["global_step"] == steps * epochs
    run_dir = out_dir / "ray_results" / output.run_name
    reported = [r["metrics"]["epoch"] for r in snapshot(run_dir)["checkpoint_results"]]
    assert sorted(set(reported)) == [float(e) for e in range(1, epochs + 1)]
    # Resumed, not restarted from scratch: a restart from epoch 0 would report every epoch again.
    assert len(reported) < len(reported_before) + epochs, (reported_before, reported)
    # Two worker groups ran: each group's rank 0 opened its own TensorBoard event file.
    events = list((out_dir / "tensorboard" / output.run_name).glob("events.out.tfevents.*"))
    assert len(events) == 2, events
