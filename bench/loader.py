"""Loader throughput: padded [B, T] session batches per second from prepared parquet, per engine.

    python bench/loader.py                    # CPU
    python bench/loader.py --device cuda      # batches delivered on the GPU

Data: `raytr synth` + `raytr prepare` output (configs/synthetic.yaml: item id + 3 categorical + 2
continuous list columns, T = 20), made once under runs/bench/. Every engine delivers the same
thing: a `SessionBatch` (or its dict of tensors) of all six columns, right-padded to [B, T] on the
target device, B = 1024, in shuffled order where the engine shuffles. Engines:

  raytr-merlin         raytr DataLoader(engine="merlin"): reads once (merlin-dataloader), keeps the
                       columns resident (on the GPU with --device cuda), gathers + pads per batch
  raytr-pyarrow        raytr DataLoader(engine="pyarrow"): the same, read with PyArrow
  raytr-ray            raytr's Ray Data engine as a Ray Train worker runs it: the dataset read into
                       the object store once (ray_launcher.ray_train_dataset), a one-way
                       streaming_split shard, batches gathered and padded by
                       ray_launcher.ray_data_batches from Arrow windows of 16 batches (shuffled
                       inside, a new block order every epoch)
  raydata-iter_torch   Ray Data read_parquet streamed every epoch -> iter_torch_batches with a
                       NumpyBatchCollateFn flattening the rows' object arrays and padding them
  raydata-arrow-pad    iter_torch_batches with an ArrowBatchCollateFn padding vectorised from the
                       Arrow offsets
  baseline-merlin      merlin.dataloader.torch.Loader(shuffle=True) + naive padding (a Python loop
                       over the sessions of each batch) -- the baseline the ratios refer to
  baseline-pyarrow     pq.read_table once + numpy gather/pad per shuffled batch (vectorised)

sessions/s is measured over full epochs after the loader is built (the best of --repeats epochs);
`build_s` is the construction (read) time of the resident engines and of raytr-ray's
materialize; the two raydata-* flavours stream from the files every epoch, so theirs include reading. With a train.json present, each engine's rate
is also divided by the rate at which raytr's training step consumed sessions (the loader should
deliver at least 2x that).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    PeakRSS,
    disturbed,
    envelope,
    load_average,
    prepared_synthetic,
    read_result,
    setup_logging,
    training_consumption,
    write_result,
)

log = logging.getLogger("bench.loader")

RAYTR_ENGINES = ("raytr-merlin", "raytr-pyarrow", "raytr-ray")  # raytr's own; the rest are for comparison
ENGINES = (*RAYTR_ENGINES, "raydata-iter_torch", "raydata-arrow-pad", "baseline-merlin", "baseline-pyarrow")
BASELINE = "baseline-merlin"


# ---------------------------------------------------------------------------- engines
def _pad_numpy(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
    """Rows of a ragged (values, offsets) column as [len(rows), length], last `length` kept."""
    ends = offsets[rows + 1]
    starts = np.maximum(offsets[rows], ends - length)
    steps = np.arange(length)
    index = starts[:, None] + steps[None, :]
    valid = index < ends[:, None]
    gathered = values[np.minimum(index, len(values) - 1)] if len(values) else np.zeros(index.shape, values.dtype)
    return np.where(valid, gathered, np.zeros((), values.dtype))


def _dtype_of(spec, name: str):
    import torch

    return torch.float32 if name in spec.continuous else torch.int64


def engine_raytr(spec, files, batch: int, device, engine: str):
    from raytr.data.loaders import DataLoader

    t0 = time.perf_counter()
    loader = DataLoader(spec, files, batch, shuffle=True, engine=engine, device=device)
    build = time.perf_counter() - t0

    def epoch():
        for b in loader:
            yield len(b)

    return epoch, build


def engine_raytr_ray(spec, files, batch: int, device):
    from itertools import count

    from raytr.config import ModelConfig
    from raytr.training.arguments import TrainingArguments
    from raytr.training.loop import LoopConfig
    from raytr.training.ray_launcher import ray_data_batches, ray_train_dataset

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch, data_loader_engine="ray")
    cfg = LoopConfig(spec=spec, model_config=ModelConfig(), args=args, init_model_dir="unused",
                     train_paths=tuple(files))
    t0 = time.perf_counter()
    ds, rows_per_worker = ray_train_dataset(cfg)
    build = time.perf_counter() - t0
    batches, _ = ray_data_batches(ds.streaming_split(1, equal=True)[0], cfg, device, rows_per_worker)
    epochs = count()

    def epoch():
        for b in batches(next(epochs)):
            yield len(b)

    return epoch, build


def engine_baseline_merlin(spec, files, batch: int, device):
    import torch
    from merlin.dataloader.torch import Loader
    from merlin.io import Dataset

    dataset = Dataset(list(files), engine="parquet")
    dataset.schema = dataset.schema.select_by_name(spec.columns)
    length = spec.max_sequence_length

    def naive_pad(values: torch.Tensor, offsets: torch.Tensor, dtype) -> torch.Tensor:
        out = torch.zeros(len(offsets) - 1, length, dtype=dtype)
        bounds = offsets.tolist()
        for i in range(len(bounds) - 1):
            row = values[max(bounds[i], bounds[i + 1] - length): bounds[i + 1]]
            out[i, : len(row)] = row
        return out

    def epoch():
        with Loader(dataset, batch_size=batch, shuffle=True) as loader:
            for inputs, _ in loader:
                # Padded on the CPU (merlin's CPU mode without cuDF; with cuDF a per-row loop over GPU
                # tensors would only measure kernel launches), then moved to the device.
                padded = {n: naive_pad(inputs[f"{n}__values"].reshape(-1).cpu(), inputs[f"{n}__offsets"].cpu(),
                                       _dtype_of(spec, n)).to(device) for n in spec.columns}
                yield len(padded[spec.item_id])

    return epoch, 0.0


def engine_baseline_pyarrow(spec, files, batch: int, device):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    t0 = time.perf_counter()
    table = pa.concat_tables([pq.read_table(f, columns=spec.columns) for f in files]).combine_chunks()
    columns = {}
    for name in spec.columns:
        arr = table.column(name).chunk(0)
        offsets = np.asarray(arr.offsets, dtype=np.int64)
        values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
        columns[name] = (values, offsets - offsets[0])
    build = time.perf_counter() - t0
    n = table.num_rows
    length = spec.max_sequence_length
    rng = np.random.default_rng(0)

    def epoch():
        order = rng.permutation(n)
        for start in range(0, n, batch):
            rows = order[start: start + batch]
            # float32 continuous columns, as every other engine delivers (the files hold float64)
            padded = {name: torch.from_numpy(_pad_numpy(v, o, rows, length)).to(device, _dtype_of(spec, name))
                      for name, (v, o) in columns.items()}
            yield len(padded[spec.item_id])

    return epoch, build


def engine_raydata(spec, files, batch: int, device, flavour: str):
    import ray
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn

    ds = ray.data.read_parquet(list(files)).select_columns(spec.columns)
    length = spec.max_sequence_length

    if flavour == "iter_torch":
        class Collate(NumpyBatchCollateFn):
            def __call__(self, b):
                # Ray Data hands list columns to numpy collates as object arrays of rows: flatten them.
                out = {}
                for name in spec.columns:
                    rows = b[name]
                    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
                    np.cumsum([len(r) for r in rows], out=offsets[1:])
                    values = np.concatenate(list(rows)) if len(rows) else np.zeros(0)
                    padded = _pad_numpy(values, offsets, np.arange(len(rows)), length)
                    out[name] = torch.from_numpy(padded).to(_dtype_of(spec, name))
                return out

        collate = Collate()
    else:
        class Collate(ArrowBatchCollateFn):
            def __call__(self, table):
                out = {}
                for name in spec.columns:
                    arr = table.column(name).combine_chunks()
                    offsets = np.asarray(arr.offsets, dtype=np.int64)
                    values = arr.values.to_numpy(zero_copy_only=False)
                    rows = np.arange(len(arr))
                    out[name] = torch.from_numpy(_pad_numpy(values, offsets, rows, length)).to(_dtype_of(spec, name))
                return out

        collate = Collate()

    def epoch():
        for b in ds.iter_torch_batches(batch_size=batch, collate_fn=collate, device=str(device)):
            yield len(b[spec.item_id])

    return epoch, 0.0


def build_engine(name: str, spec, files, batch: int, device):
    if name == "raytr-merlin":
        return engine_raytr(spec, files, batch, device, "merlin")
    if name == "raytr-pyarrow":
        return engine_raytr(spec, files, batch, device, "pyarrow")
    if name == "raytr-ray":
        return engine_raytr_ray(spec, files, batch, device)
    if name == "baseline-merlin":
        return engine_baseline_merlin(spec, files, batch, device)
    if name == "baseline-pyarrow":
        return engine_baseline_pyarrow(spec, files, batch, device)
    return engine_raydata(spec, files, batch, device, name.removeprefix("raydata-").replace("-pad", ""))


def run_epoch(epoch, device) -> tuple[int, float, float]:
    import torch

    t0, c0 = time.perf_counter(), time.process_time()
    sessions = sum(epoch())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sessions, time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------------------- main
def training_consumption_on(device: str) -> dict[str, Any] | None:
    """raytr's training-step consumption (sessions/s) from bench/results/train-<device>.json, if
    measured on this kind of device."""
    train = read_result(f"train-{device}")
    return training_consumption(train) if train and train.get("device") == device else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sessions", type=int, default=200_000, help="synthetic sessions to generate and prepare")
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {list(ENGINES)}")
    p.add_argument("--repeats", type=int, default=2, help="epochs per engine (interleaved); the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on cpu, as bench/train.py)")
    p.add_argument("--output", default=None, help="results name (default loader-<device>)")
    args = p.parse_args(argv)
    setup_logging()
    import ray
    import torch

    from raytr.data.layout import day_paths
    from raytr.data.schema import feature_spec, load_schema

    started, load_before = time.time(), load_average()
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda but torch sees no CUDA GPU")
        return 2
    engines = args.engines.split(",")
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        log.error("unknown engine(s) %s; known: %s", bad, list(ENGINES))
        return 2
    ray.init(num_cpus=max(4, (torch.get_num_threads() or 1) + 2), include_dashboard=False, log_to_driver=False)
    data_dir = prepared_synthetic(args.sessions, args.items)
    spec = feature_spec(load_schema(data_dir))
    files = day_paths(data_dir)
    log.info("data: %s, %d files, columns %s, T=%d", data_dir, len(files), spec.columns, spec.max_sequence_length)

    consumption = training_consumption_on(args.device)

    def rows_and_write(partial: bool) -> list[dict[str, Any]]:
        """The result rows so far, written to the results file (also after every epoch, marked partial,
        so that a run cut short by a time limit keeps what it measured)."""
        base = results.get(BASELINE, {}).get("sessions_per_s")
        rows = []
        for name in engines:
            row = dict(results.get(name, {"engine": name, "error": "not run"}))
            if "error" not in row:
                if base:
                    row["ratio_vs_baseline"] = row["sessions_per_s"] / base
                if consumption:
                    row["ratio_vs_training"] = row["sessions_per_s"] / consumption["sessions_per_s"]
            rows.append(row)
        notes = [f"B={args.batch_size}, T={spec.max_sequence_length}, {len(spec.columns)} list columns padded per "
                 f"batch; baseline = {BASELINE}.",
                 "Each figure: the fastest of --repeats full epochs (engines interleaved); build_s is the one-time read."]
        if consumption:
            notes.append("ratio_vs_training = loader sessions/s / raytr's training step sessions/s (train.json); "
                         "on CPU both share the same cores.")
        if partial:
            notes.append("PARTIAL: the run stopped before every engine was measured ('not run' rows).")
        write_result(args.output or f"loader-{args.device}", envelope(
            "loader", started, load_before, threads=threads, device=args.device, data=str(data_dir),
            sessions=next((r["sessions"] for r in results.values() if "sessions" in r), None),
            batch_size=args.batch_size, max_sequence_length=spec.max_sequence_length, columns=spec.columns,
            training_consumption=consumption, results=rows, notes=notes, partial=partial))
        return rows

    built: dict[str, tuple[Any, float, float]] = {}
    for name in engines:
        with PeakRSS() as mem:
            epoch, build_s = build_engine(name, spec, files, args.batch_size, device)
        built[name] = (epoch, build_s, (mem.peak - mem.baseline) / 2**30)
    results: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for name in engines:  # interleaved
            epoch, build_s, build_gb = built[name]
            load0 = load_average()
            try:
                sessions, wall, cpu = run_epoch(epoch, device)
            except Exception as exc:  # noqa: BLE001 - record and go on with the other engines
                log.exception("%s failed", name)
                results.setdefault(name, {"engine": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rate = sessions / wall
            log.info("%s epoch %d: %d sessions in %.2fs = %.0f sessions/s (cpu %.2fs, load %.1f)",
                     name, repeat, sessions, wall, rate, cpu, load0[0])
            prev = results.get(name)
            runs = (prev or {}).get("runs", []) + [rate]
            if prev is None or "error" in prev or rate > prev["sessions_per_s"]:
                results[name] = {"engine": name, "sessions": sessions, "seconds": wall, "sessions_per_s": rate,
                                 "sessions_per_cpu_s": sessions / cpu if cpu > 0 else None, "build_s": build_s,
                                 "build_mem_gb": build_gb, "load_before": load0, "load_after": load_average(),
                                 "disturbed": disturbed(load0)}
            results[name]["runs"] = runs
            rows_and_write(partial=True)
    ray.shutdown()

    rows = rows_and_write(partial=False)
    print(f"{'engine':22} {'sessions/s':>11} {'build s':>8} {'/baseline':>9} {'/training':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:22} ERROR {r['error'][:80]}")
        else:
            print(f"{r['engine']:22} {r['sessions_per_s']:11.0f} {r['build_s']:8.2f} "
                  f"{r.get('ratio_vs_baseline', float('nan')):9.2f} {r.get('ratio_vs_training', float('nan')):9.1f}")
    if consumption:
        print(f"training consumption: {consumption['sessions_per_s']:.0f} sessions/s "
              f"(raytr-local, {consumption['config']} {consumption['precision']}, train.json)")

    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
