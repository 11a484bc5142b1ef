"""Training throughput: raytr's Trainer vs a bare PyTorch causal transformer, in the same run.

    python bench/train.py                                   # CPU: scaled-down configs, fp32 + bf16
    python bench/train.py --device cuda --configs all --precision fp16,bf16   # the H100 configs

Every measurement runs in a fresh subprocess (its own allocator, peak memory and Ray instance),
in interleaved order per config and precision, so a change of machine load hits every
implementation alike. Implementations (`--impls`):

  bare                  item embedding + learned positions + nn.TransformerEncoder (pre-norm, GELU,
                        FFN 4*D, dropout 0.1, causal mask), final LayerNorm, weight-tied full-softmax
                        head over the target positions only (their flat indices precomputed, no host
                        sync), AdamW, grad-norm clip 1.0; batches pre-materialised on the device.
  bare-compiled         the same step under torch.compile.
  raytr-model           raytr's SessionModel (gpt2 body, CLM, full chunked softmax) + the same AdamW
                        and clipping in a bare loop over the same pre-materialised batches: the
                        model's cost without the Trainer and loader.
  raytr-local           Trainer(launcher="local"): raytr's training loop in this process, with its
                        real DataLoader (merlin engine) reading the parquet sessions. Every raytr
                        run without the -triton suffix sets loss_kernel="torch" (the default "auto"
                        would take the Triton kernel on a GPU).
  raytr-local-compiled  the same with TrainingArguments(torch_compile=True).
  raytr-local-cudagraphs  the same with torch_compile_mode="reduce-overhead": the input layer and
                        body, forward and backward, replayed as CUDA graphs (GPU only).
  raytr-local-cudagraphs-triton  the same with loss_kernel="triton": the full softmax's chunks
                        through raytr's Triton kernel instead of Inductor's (GPU only).
  raytr-ray             Trainer(launcher="ray"): TorchTrainer with one worker, merlin engine.
  raytr-ray-compiled    the same with TrainingArguments(torch_compile=True).
  raytr-ray-cudagraphs  the same with torch_compile_mode="reduce-overhead" (GPU only).
  raytr-ray-raydata     Trainer(launcher="ray", data_loader_engine="ray"): Ray Data shard + padding.

Throughput (sessions/s) is measured over steady steps only: `--warmup` steps are run first. The
bare loops time the measured steps between two device synchronisations; the Trainer runs log
the learning rate every gcd(warmup, steps) steps (`logging_steps`, TensorBoard: an event at the first
and the last timed step) and the wall times of those events give the steady step rate from inside
raytr's own loop, data loading included. Not every step: a TensorBoard scalar per step cost the
loop 2.7-3.5 ms per step on the H100 host (bench/profile_gpu.py, trainer vs trainer-quiet) before
the loop wrote its scalars in bursts (raytr.training.loop.ScalarLog), and a user logs less often
(raytr's default is logging_steps=50).
Peak memory: on CUDA `torch.cuda.max_memory_allocated` in-process (not for raytr-ray, whose step
runs in a Ray worker) and the device-wide peak from cudaMemGetInfo for all; on CPU the peak
resident memory of the process that trains, sampled every 50 ms, minus its resident memory
before training began (so imports are not counted, data and model are).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    DATA_DIR,
    TRAIN_OPTIMIZER,
    add_code_argument,
    code_version,
    ITEM_COLUMN,
    PeakDeviceMemory,
    PeakRSS,
    disturbed,
    envelope,
    gpu_name,
    load_average,
    read_result,
    run_json_subprocess,
    setup_logging,
    synthetic_sessions,
    timestamp,
    with_gpu,
    write_result,
)

log = logging.getLogger("bench.train")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    items: int  # V, item cardinality (ids 0..2 reserved)
    d_model: int
    layers: int
    heads: int
    seq_len: int  # T
    batch: int  # B

    @property
    def label(self) -> str:
        return f"{self.name} ({self.items:,} items, D={self.d_model}, L={self.layers}, H={self.heads}, T={self.seq_len}, B={self.batch})"


GPU_CONFIGS = {
    "5k": BenchConfig("5k", 5_000, 128, 2, 4, 20, 1024),
    "50k": BenchConfig("50k", 50_000, 128, 2, 4, 20, 1024),
    "300k": BenchConfig("300k", 300_000, 256, 4, 8, 50, 512),
    "1M": BenchConfig("1M", 1_000_000, 256, 4, 8, 20, 512),
}
# Scaled down for 2 CPU cores: same shapes of work (small and large catalog), B=256.
CPU_CONFIGS = {
    "cpu-5k": BenchConfig("cpu-5k", 5_000, 128, 2, 4, 20, 256),
    "cpu-50k": BenchConfig("cpu-50k", 50_000, 64, 2, 4, 20, 256),
}
ALL_CONFIGS = {**GPU_CONFIGS, **CPU_CONFIGS}

IMPLS = ("bare", "bare-compiled", "raytr-model", "raytr-local", "raytr-local-compiled", "raytr-local-cudagraphs",
         "raytr-local-cudagraphs-triton", "raytr-ray", "raytr-ray-compiled", "raytr-ray-cudagraphs",
         "raytr-ray-raydata")
TRITON_SUFFIX = "-triton"  # an implementation with this suffix: the same with training.loss_kernel="triton"
DEFAULT_IMPLS = {
    "cpu": ("bare", "bare-compiled", "raytr-model", "raytr-local", "raytr-local-compiled", "raytr-ray"),
    "cuda": ("bare", "bare-compiled", "raytr-model", "raytr-local", "raytr-local-compiled", "raytr-local-cudagraphs",
             "raytr-local-cudagraphs-triton", "raytr-ray", "raytr-ray-compiled", "raytr-ray-cudagraphs"),
}
LEARNING_RATE = 1e-3
DROPOUT = 0.1


# ---------------------------------------------------------------------------- data
def sessions_for(cfg: BenchConfig, steps: int):
    # A multiple of B, and one epoch covers every step: no epoch-end checkpoint in the window.
    return synthetic_sessions(cfg.batch * max(steps, 64), cfg.items, cfg.seq_len, seed=0)


def materialise(files, length: int, device):
    """All sessions as one right-padded [N, T] int64 tensor on `device` (last T events kept)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    column = pa.concat_tables([pq.read_table(f, columns=[ITEM_COLUMN]) for f in files]).column(ITEM_COLUMN)
    column = column.combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = column.values.to_numpy()
    lengths = np.minimum(np.diff(offsets), length)
    starts = offsets[1:] - lengths
    steps = np.arange(length)
    index = starts[:, None] + steps[None, :]
    valid = steps[None, :] < lengths[:, None]
    padded = np.where(valid, values[np.minimum(index, len(values) - 1)], 0)
    return torch.from_numpy(padded.astype(np.int64)).to(device)


def bare_batches(ids, batch: int, device):
    """[(ids [B, T], flat target positions [N], labels [N])] per batch, all on the device: the
    bare loop's targets need no host sync. Order: a fixed permutation of the sessions."""
    import torch

    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(ids.shape[0], generator=gen).to(device)
    out = []
    for start in range(0, ids.shape[0] - batch + 1, batch):
        b = ids[order[start: start + batch]]
        nxt = torch.zeros_like(b)
        nxt[:, :-1] = b[:, 1:]
        flat = nxt.reshape(-1)
        positions = (flat >= 3).nonzero().squeeze(1)  # the next item is a real item (ids >= 3)
        out.append((b, positions, flat[positions]))
    return out


# ---------------------------------------------------------------------------- bare model
def build_bare_model(cfg: BenchConfig):
    import torch.nn.functional as F
    from torch import nn

    class BareCausalTransformer(nn.Module):
        """ids [B, T] -> mean CE of the next item at the given flat positions; tied head."""

        def __init__(self) -> None:
            super().__init__()
            D, T = cfg.d_model, cfg.seq_len
            self.item = nn.Embedding(cfg.items, D, padding_idx=0)
            self.position = nn.Embedding(T, D)
            layer = nn.TransformerEncoderLayer(D, cfg.heads, 4 * D, DROPOUT, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(D)
            self.drop = nn.Dropout(DROPOUT)
            self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(T), persistent=False)
            nn.init.normal_(self.item.weight, std=0.02)
            nn.init.normal_(self.position.weight, std=0.02)

        def forward(self, ids, positions, labels):
            B, T = ids.shape
            x = self.drop(self.item(ids) + self.position.weight[None, :T])  # [B, T, D]
            h = self.norm(self.encoder(x, mask=self.causal[:T, :T], is_causal=True))  # [B, T, D]
            h = h.reshape(B * T, -1)[positions]  # [N, D]
            logits = h @ self.item.weight.T  # [N, V]
            return F.cross_entropy(logits.float(), labels)

    return BareCausalTransformer()


# ---------------------------------------------------------------------------- worker side
def _autocast(precision: str, device):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def amp_step(model, optimizer, loss_of, precision: str, device):
    """step(i) -> loss: the loss of input i under autocast, backward through a GradScaler (active
    for fp16), grad-norm clip 1.0, optimizer step: the step every bare loop here times."""
    import torch

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(i: int):
        with _autocast(precision, device):
            loss = loss_of(i)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def raytr_model_config(cfg: BenchConfig, chunk: int | None):
    """raytr's gpt2 CLM model at the config's sizes; `chunk` overrides logits_chunk_size."""
    from raytr.config import ModelConfig

    extra = {"logits_chunk_size": chunk} if chunk else {}
    return ModelConfig(body="gpt2", objective="clm", d_model=cfg.d_model, n_layers=cfg.layers, n_heads=cfg.heads,
                       dropout=DROPOUT, **extra)


def trainer_optimizer(model):
    """The optimizer the Trainer builds for `model` at the bench's learning rate (TRAIN_OPTIMIZER)."""
    from raytr.training.arguments import TrainingArguments
    from raytr.training.loop import build_optimizer

    return build_optimizer(model, TrainingArguments(output_dir="unused", learning_rate=LEARNING_RATE, weight_decay=0.01))


def measure_bare_loop(cfg: BenchConfig, impl: str, precision: str, device, warmup: int, steps: int,
                      chunk: int | None = None) -> dict[str, Any]:
    """bare / bare-compiled / raytr-model: a plain loop over pre-materialised batches."""
    import torch

    torch.manual_seed(0)
    data = sessions_for(cfg, warmup + steps)
    rss = PeakRSS() if device.type == "cpu" else None
    dev_mem = PeakDeviceMemory() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for sampler in (rss, dev_mem):
        if sampler is not None:
            sampler.__enter__()
    ids = materialise(data.files, cfg.seq_len, device)
    batches = bare_batches(ids, cfg.batch, device)
    if impl == "raytr-model":
        from raytr.features import FeatureSpec, SessionBatch
        from raytr.models import SessionModel

        spec = FeatureSpec(item_id=ITEM_COLUMN, item_cardinality=cfg.items, max_sequence_length=cfg.seq_len)
        model = SessionModel(spec, raytr_model_config(cfg, chunk), seed=0)
        model.to(device)
        step_inputs = [SessionBatch(item_ids=b, num_causal_targets=len(p)) for b, p, _ in batches]

        def loss_of(i):
            return model(step_inputs[i]).loss
    else:
        model = build_bare_model(cfg).to(device)
        fn = torch.compile(model) if impl == "bare-compiled" else model

        def loss_of(i):
            return fn(*batches[i])

    model.train()
    optimizer = trainer_optimizer(model)
    step = amp_step(model, optimizer, lambda i: loss_of(i % len(batches)), precision, device)

    started = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    warm_s = time.perf_counter() - started
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    _sync(device)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    for sampler in (rss, dev_mem):
        if sampler is not None:
            sampler.__exit__(None, None, None)
    out = {
        "sessions_per_s": steps * cfg.batch / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "steps": steps,
        "cpu_ms_per_step": 1000 * cpu / steps,
        "sessions_per_cpu_s": steps * cfg.batch / cpu,
        "warmup_s": warm_s,
        "final_loss": float(loss.detach()),
    }
    out.update(_memory(rss, dev_mem, device))
    return out


def _memory(rss, dev_mem, device) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    if rss is not None:
        out["peak_rss_gb"] = rss.peak / 2**30
        out["peak_mem_gb"] = (rss.peak - rss.baseline) / 2**30
        out["peak_mem_kind"] = "process RSS above its pre-training level"
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_mem_gb"] = out["peak_allocated_gb"]
        out["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    if dev_mem is not None:
        out["peak_device_used_gb"] = (dev_mem.peak - dev_mem.baseline) / 2**30
    return out


def step_times_from_tensorboard(directory: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every `train/learning_rate` event the loop wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.wall_time) for e in acc.Scalars("train/learning_rate")]


def measure_trainer(cfg: BenchConfig, impl: str, precision: str, device, warmup: int, steps: int,
                    engine: str, threads: int, chunk: int | None = None) -> dict[str, Any]:
    """raytr-local[-compiled|-cudagraphs[-triton]] / raytr-ray[-compiled|-cudagraphs|-raydata] through
    `Trainer.train()`."""
    import torch
    from torch._dynamo.utils import counters

    from raytr.features import FeatureSpec
    from raytr.models import SessionModel
    from raytr.training.arguments import TrainingArguments
    from raytr.training.trainer import Trainer

    data = sessions_for(cfg, warmup + steps)
    loss_kernel = "triton" if impl.endswith(TRITON_SUFFIX) else "torch"
    impl = impl.removesuffix(TRITON_SUFFIX)  # the rest of the name says how the Trainer runs
    logging_steps = math.gcd(warmup, steps)  # events at step `warmup` and `warmup + steps`
    launcher = "ray" if impl.startswith("raytr-ray") else "local"
    if impl == "raytr-ray-raydata":
        engine = "ray"
    spec = FeatureSpec(item_id=ITEM_COLUMN, item_cardinality=cfg.items, max_sequence_length=cfg.seq_len)
    model = SessionModel(spec, raytr_model_config(cfg, chunk), seed=0)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="train-", dir=DATA_DIR))
    run_name = f"bench-{impl}-{loss_kernel}-{precision}"
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=warmup + steps, per_device_train_batch_size=cfg.batch,
        learning_rate=LEARNING_RATE, fp16=precision == "fp16", bf16=precision == "bf16",
        torch_compile=impl.endswith("compiled"), launcher=launcher, num_workers=1,
        torch_compile_mode="reduce-overhead" if impl.endswith("cudagraphs") else None, loss_kernel=loss_kernel,
        use_gpu=device.type == "cuda", data_loader_engine=engine, logging_steps=logging_steps,
        report_to=("tensorboard",), disable_tqdm=True, save_total_limit=1, run_name=run_name, seed=0,
        # The worker gets as many CPUs as the local runs use threads: Ray sets OMP_NUM_THREADS from it.
        resources_per_worker={"CPU": float(threads)} if launcher == "ray" and device.type == "cpu" else {},
    )
    if launcher == "ray":
        import ray

        # One worker holds a CPU; Ray Data's read tasks need others (stack notes: declare more).
        ray.init(num_cpus=threads + 2, include_dashboard=False, log_to_driver=False)
    trainer = Trainer(model, args, train_dataset_or_path=list(data.files))
    rss = PeakRSS(child_match="RayTrainWorker" if launcher == "ray" else None) if device.type == "cpu" else None
    dev_mem = PeakDeviceMemory() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for sampler in (rss, dev_mem):
        if sampler is not None:
            sampler.__enter__()
    try:
        result = trainer.train()
    finally:
        for sampler in (rss, dev_mem):
            if sampler is not None:
                sampler.__exit__(None, None, None)
    total_s = time.perf_counter() - t0
    times = step_times_from_tensorboard(out_dir / "tensorboard" / run_name)
    shutil.rmtree(out_dir, ignore_errors=True)
    times = [t for t in times if t[0] >= warmup]  # event at step s: s steps done
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} step events after warmup in the TensorBoard log")
    (s0, w0), (s1, w1) = times[0], times[-1]
    gaps = sorted((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(times, times[1:]))  # per step
    cpu = rss.cpu_seconds_between(w0, w1) if rss is not None else float("nan")
    out = {
        "sessions_per_s": (s1 - s0) * cfg.batch / (w1 - w0),
        "cpu_ms_per_step": 1000 * cpu / (s1 - s0),
        "sessions_per_cpu_s": (s1 - s0) * cfg.batch / cpu if cpu > 0 else float("nan"),
        "step_ms": 1000 * (w1 - w0) / (s1 - s0),
        "step_ms_median": 1000 * gaps[len(gaps) // 2],
        "steps": s1 - s0,
        "train_call_s": total_s,
        "final_loss": result.metrics.get("loss"),
        "engine": engine,
        "launcher": launcher,
        "logging_steps": logging_steps,
    }
    if impl.endswith("cudagraphs") and launcher == "local":  # regions run without CUDA graphs (perf_hints log: why)
        out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    mem = _memory(rss, dev_mem, device)
    if launcher == "ray":
        if device.type == "cuda":
            mem = {k: v for k, v in mem.items() if k == "peak_device_used_gb"}
            mem["peak_mem_gb"] = mem.get("peak_device_used_gb")
            mem["peak_mem_kind"] = "device-wide used memory (cudaMemGetInfo) above baseline"
        elif rss is not None:
            mem = {"peak_rss_gb": rss.peak / 2**30, "peak_mem_gb": rss.peak / 2**30,
                   "peak_mem_kind": "peak RSS of the Ray Train worker process (imports included)"}
    out.update(mem)
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    cfg = BenchConfig(**spec["config"])
    device = torch.device(spec["device"])
    impl, precision, threads = spec["impl"], spec["precision"], spec["threads"]
    torch.set_num_threads(threads)
    if impl.startswith("raytr-") and impl != "raytr-model":
        out = measure_trainer(cfg, impl, precision, device, spec["warmup"], spec["steps"], spec["engine"], threads,
                              spec.get("chunk"))
    else:
        out = measure_bare_loop(cfg, impl, precision, device, spec["warmup"], spec["steps"], spec.get("chunk"))
    return {**out, "threads": threads, **({"logits_chunk_size": spec["chunk"]} if spec.get("chunk") else {})}


# ---------------------------------------------------------------------------- driver side
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--configs", default="all",
                   help=f"comma list of {list(ALL_CONFIGS)}, or 'all' (GPU configs on cuda, CPU configs on cpu)")
    p.add_argument("--precision", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on cpu; fp16,bf16 on cuda)")
    p.add_argument("--impls", default=None, help=f"comma list of {list(IMPLS)}")
    p.add_argument("--engine", default="merlin", choices=["merlin", "pyarrow"], help="raytr loader engine")
    p.add_argument("--logits-chunk-size", type=int, default=None,
                   help="raytr's model.logits_chunk_size (default: raytr's, as many rows as the head's memory budget "
                        "allows); smaller chunks lower the peak memory of the full softmax on large catalogs")
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (default 4 cpu, 15 cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 12 cpu, 60 cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every run (the Ray worker gets as many CPUs); default 1 on cpu (see "
                        "bench/README.md: OpenMP spin-waits make 2 threads slower on a shared host), all cores on cuda")
    p.add_argument("--repeats", type=int, default=1, help="measure each variant this many times, keep the fastest")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    p.add_argument("--output", default=None, help="results name: bench/results/<output>.json (default train-<device>)")
    p.add_argument("--merge", action="store_true",
                   help="add to the existing results file (rows of the same config/precision/impl are replaced)")
    add_code_argument(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    setup_logging()
    started, load_before = time.time(), load_average()
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log.error("--device cuda but torch sees no CUDA GPU")
            return 2
    names = (list(GPU_CONFIGS) if device == "cuda" else list(CPU_CONFIGS)) if args.configs == "all" \
        else [c.strip() for c in args.configs.split(",")]
    unknown = [n for n in names if n not in ALL_CONFIGS]
    if unknown:
        log.error("unknown config(s) %s; known: %s", unknown, list(ALL_CONFIGS))
        return 2
    precisions = (args.precision or ("fp16,bf16" if device == "cuda" else "fp32,bf16")).split(",")
    if device == "cpu" and "fp16" in precisions:
        log.error("fp16 needs CUDA (raytr refuses fp16 on CPU); use fp32 or bf16")
        return 2
    impls = args.impls.split(",") if args.impls else list(DEFAULT_IMPLS[device])
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        log.error("unknown impl(s) %s; known: %s", bad, list(IMPLS))
        return 2
    threads = args.threads or (1 if device == "cpu" else (os.cpu_count() or 1))
    warmup = args.warmup if args.warmup is not None else (15 if device == "cuda" else 4)
    steps = args.steps if args.steps is not None else (60 if device == "cuda" else 12)
    if warmup < 1 or steps < 1:
        log.error("--warmup and --steps must be >= 1 (the timing starts at the event of step `warmup`)")
        return 2

    measured = timestamp(started)  # this run, on each of its rows
    code = args.code or code_version()
    rows: list[dict[str, Any]] = []
    for name in names:
        cfg = ALL_CONFIGS[name]
        sessions_for(cfg, warmup + steps)  # generate the data once, outside any measurement
        for precision in precisions:
            best: dict[str, dict[str, Any]] = {}
            for repeat in range(args.repeats):
                for impl in impls:  # interleaved: every impl sees the same phases of machine load
                    spec = {"config": asdict(cfg), "device": device, "impl": impl, "precision": precision,
                            "warmup": warmup, "steps": steps, "engine": args.engine, "threads": threads,
                            "chunk": args.logits_chunk_size}
                    load0 = load_average()
                    res = run_json_subprocess([str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                              timeout=args.timeout, env={"OMP_NUM_THREADS": str(threads)})
                    res.update({"load_before": load0, "load_after": load_average(), "repeat": repeat})
                    res["disturbed"] = disturbed(res["load_before"]) or disturbed(res["load_after"])
                    log.info("%s %s %s: %s", name, precision, impl,
                             res.get("error") or f"{res['sessions_per_s']:.0f} sessions/s, "
                             f"peak {res.get('peak_mem_gb', float('nan')):.2f} GB (load {load0[0]:.1f})"
                             + (f", {res['cudagraph_skips']} cudagraph skips" if "cudagraph_skips" in res else ""))
                    prev = best.get(impl)
                    if "error" in res and prev is not None:
                        continue
                    if prev is None or "error" in prev or res.get("sessions_per_s", 0) > prev["sessions_per_s"]:
                        best[impl] = {**res, "runs": (prev or {}).get("runs", []) + [res.get("sessions_per_s")]}
                    else:
                        prev["runs"].append(res.get("sessions_per_s"))
            for impl, res in best.items():
                rows.append({"config": name, **asdict(cfg), "precision": precision, "impl": impl, **res,
                             "warmup": warmup, "measured": measured, "code": code, "optimizer": TRAIN_OPTIMIZER})
    # read after the runs: no CUDA context in this process while they measure
    rows = with_gpu(rows, gpu_name() if device == "cuda" else "no GPU")
    name = args.output or f"train-{device}"
    configs = {n: asdict(ALL_CONFIGS[n]) for n in names}
    previous: list[dict[str, Any]] = []
    if args.merge and (old := read_result(name)) is not None:
        if old.get("device") != device:
            log.error("--merge: %s.json holds device %r results, not %r", name, old.get("device"), device)
            return 2
        rows, previous = merge_results(old, rows)
        configs = {**old.get("configs", {}), **configs}
    add_ratios(rows)
    print_table(rows)
    notes = [
        "Each figure: the fastest of --repeats runs, each in a fresh process; impls interleaved per config/precision.",
        "raytr uses its gpt2 body (CLM, full softmax in chunks); bare uses nn.TransformerEncoder; both D/L/H/FFN 4D/dropout 0.1, "
        "grad clip 1.0, loss at target positions only, and the Trainer's optimizer (AdamW lr 1e-3, fused on CUDA, "
        "weight decay 0.01 on weight matrices only; rows without `optimizer` had the bare loops on torch's default "
        "AdamW: foreach on CUDA, every parameter decayed).",
        "ratio_vs_bare = raytr sessions/s / bare eager sessions/s (same config and precision); "
        "ratio_vs_bare_compiled likewise against the compiled bare loop.",
    ]
    if device == "cpu":
        notes.append("CPU run: scaled-down configs (the issue's GPU configs need an H100; run with --device cuda).")
    write_result(name, envelope("train", started, load_before, device=device, warmup=warmup, steps=steps,
                                repeats=args.repeats, configs=configs, results=rows, previous_results=previous,
                                notes=notes))
    return 0 if all("error" not in r for r in rows) else 1


def merge_results(old: dict[str, Any],
                  fresh: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results, previous_results) after a --merge run. A re-measured config and precision replaces
    all of its rows, so that no ratio compares runs of different days (GPU hosts differ run to run
    by far more than the effects measured); the replaced rows move to previous_results, which keeps
    whole runs (every row of each config, precision and `measured`), so each keeps its baseline."""
    groups = {(r["config"], r["precision"]) for r in fresh}
    gpu = old.get("machine", {}).get("gpu", "no GPU")
    old = {**old, "results": with_gpu(old["results"], gpu), "previous_results": with_gpu(old.get("previous_results", []), gpu)}
    kept = [r for r in old["results"] if (r["config"], r["precision"]) not in groups]
    replaced = [r for r in old["results"] if (r["config"], r["precision"]) in groups]
    previous = {(r["config"], r["precision"], r["impl"], r.get("measured")): r
                for r in old.get("previous_results", []) + replaced}
    return kept + fresh, list(previous.values())


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's sessions/s over the bare loops' of the same config, precision and run (rows that
    do not record their run, `measured`, get no ratio: they may come from different runs)."""
    for row in rows:
        row.pop("ratio_vs_bare", None)
        row.pop("ratio_vs_bare_compiled", None)
    for row in (r for r in rows if r.get("measured")):
        for base, key in (("bare", "ratio_vs_bare"), ("bare-compiled", "ratio_vs_bare_compiled")):
            ref = next((r for r in rows if r["config"] == row["config"] and r["precision"] == row["precision"]
                        and r.get("measured") == row.get("measured") and r["impl"] == base and "error" not in r),
                       None)
            if ref is not None and "error" not in row:
                row[key] = row["sessions_per_s"] / ref["sessions_per_s"]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'config':9} {'prec':5} {'impl':29} {'sessions/s':>11} {'step ms':>8} {'peak GB':>8} {'/bare':>6} {'/compiled':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:9} {r['precision']:5} {r['impl']:29} ERROR {r['error'][:80]}")
            continue
        print(f"{r['config']:9} {r['precision']:5} {r['impl']:29} {r['sessions_per_s']:11.0f} {r['step_ms']:8.1f} "
              f"{r.get('peak_mem_gb') or float('nan'):8.2f} {r.get('ratio_vs_bare', math.nan):6.2f} "
              f"{r.get('ratio_vs_bare_compiled', math.nan):9.2f}")


if __name__ == "__main__":
    sys.exit(main())
