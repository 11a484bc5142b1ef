"""Where a training step's time goes on the GPU (torch.profiler): raytr's step vs the bare loop.

    python bench/profile_gpu.py --configs 50k,1M --precision fp16      # -> results/profile-cuda.json

For each config: raytr's step as `raytr.training.loop` runs it (its DataLoader gathering the batch
on the device, SessionModel forward with the fused chunked loss, GradScaler, clip, AdamW), eager
and with `SessionModel.compile_regions()`, and bench/train.py's bare loop compiled. Per variant:
wall ms per step, GPU busy ms per step (the sum of kernel times: wall >> busy means the host or
launches bound the step), host syncs per step, and the ops with the most GPU time. Then raytr's
training loop itself (`trainer`, also on --device cpu) and variants of it that change one thing each
(see `profile_trainer`; on an H100 they found a TensorBoard scalar every step to cost ~3 ms), and
candidate speed-ups of the step (`-cudagraphs`, `-smallchunk`, `-inplace`, `-triton`: see --variants).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_code_argument,
    code_version,
    envelope,
    gpu_name,
    load_average,
    read_result,
    setup_logging,
    timestamp,
    with_gpu,
    write_result,
)
from bench.train import (
    ALL_CONFIGS,
    LEARNING_RATE,
    amp_step,
    bare_batches,
    build_bare_model,
    materialise,
    raytr_model_config,
    sessions_for,
)


STEP_OPTIONS = ("foreach", "smallchunk", "inplace", "cudagraphs", "triton")  # raytr[-compiled] variants' suffixes
TRAINER_OPTIONS = ("merlin", "quiet", "nogc", "cudagraphs", "smallchunk", "triton")
SMALL_CHUNK_ROWS = 4096  # raytr's logits_chunk_size before 2026-11-27 (now: up to the head's memory budget)


def variant_options(variant: str, base: str, allowed: tuple[str, ...]) -> set[str]:
    """The suffixes after `base` (each one change, combinable: raytr-compiled-cudagraphs-smallchunk)."""
    rest = variant[len(base):]
    options = rest[1:].split("-") if rest.startswith("-") else []
    unknown = [o for o in options if o not in allowed]
    if not variant.startswith(base) or (rest and not options) or unknown:
        raise ValueError(f"variant {variant!r}: expected {base}[-{'][-'.join(allowed)}]")
    return set(options)


def variant_model_config(cfg, options: set[str]):
    """raytr's model for the config; `-smallchunk`: loss chunks of 4,096 rows instead of one up to the
    head's memory budget (what the per-chunk launches and glue cost)."""
    return raytr_model_config(cfg, SMALL_CHUNK_ROWS if "smallchunk" in options else None)


def _step_fns(cfg, variant: str, precision: str, device):
    """step(i) -> loss for one variant; every input is built before timing."""
    import torch

    data = sessions_for(cfg, 64)
    if variant == "bare-compiled":
        options: set[str] = set()
        batches = bare_batches(materialise(data.files, cfg.seq_len, device), cfg.batch, device)
        model = build_bare_model(cfg).to(device)
        fn = torch.compile(model)

        def loss_of(i):
            return fn(*batches[i % len(batches)])
    else:
        from raytr.data.loaders import DataLoader
        from raytr.features import FeatureSpec
        from raytr.models import SessionModel

        compiled = variant.startswith("raytr-compiled")
        options = variant_options(variant, "raytr-compiled" if compiled else "raytr", STEP_OPTIONS)
        if not compiled and options & {"inplace", "cudagraphs"}:
            raise ValueError(f"variant {variant!r}: -inplace and -cudagraphs need raytr-compiled")
        spec = FeatureSpec(item_id="item_id-list", item_cardinality=cfg.items, max_sequence_length=cfg.seq_len)
        model = SessionModel(spec, variant_model_config(cfg, options), seed=0).to(device)
        model.generator = torch.Generator(device=device).manual_seed(0)
        cudagraphs = "cudagraphs" in options  # input layer and body as CUDA graphs (cudagraph trees)
        if compiled:
            model.compile_regions("reduce-overhead" if cudagraphs else None)
        if "inplace" in options:  # the chunk kernel compiled before it was written to fuse (A/B)
            from raytr.models.head import ChunkKernel, _chunk_loss_and_grads

            model.head.kernel = ChunkKernel(torch.compile(_chunk_loss_and_grads, dynamic=True), buffers="fp32_copy")
        if "triton" in options:  # raytr's Triton chunk kernel (training.loss_kernel="triton")
            from raytr.models.head import triton_kernel

            model.head.kernel = triton_kernel(device)
        loader = DataLoader(spec, list(data.files), cfg.batch, engine="pyarrow", device=device)
        state = {"it": iter(loader)}

        def next_batch():
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                return next(state["it"])

        def loss_of(i):
            if cudagraphs:  # a new step: the previous replay's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return model(next_batch()).loss
    model.train()
    # raytr's own optimizer for every variant, the bare loop's too, as bench/train.py (fused AdamW on
    # CUDA, no decay on biases, norms and embeddings); -foreach: plain AdamW (the bare loop's before
    # 2026-12-07, so its earlier profiles ran with it)
    from raytr.training.arguments import TrainingArguments
    from raytr.training.loop import build_optimizer

    optim = "adamw_torch" if "foreach" in options else "adamw_torch_fused"
    optimizer = build_optimizer(model, TrainingArguments(output_dir="unused", learning_rate=LEARNING_RATE,
                                                         weight_decay=0.01, optim=optim))
    return amp_step(model, optimizer, loss_of, precision, device)


def profile_variant(cfg, variant: str, precision: str, steps: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    torch.manual_seed(0)
    step = _step_fns(cfg, variant, precision, device)
    for i in range(8):  # warm-up: compilation, cuBLAS heuristics, allocator
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(40):  # timed without the profiler, whose per-op bookkeeping inflates host time
        step(100 + i)
    torch.cuda.synchronize()
    plain_ms = 1000 * (time.perf_counter() - t0) / 40
    torch.cuda.set_sync_debug_mode("warn")  # counts the syncs through the warnings it emits
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(8)
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(9 + i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return {
        "variant": variant, "config": cfg.name, "precision": precision, "steps": steps,
        "step_ms": plain_ms,
        "sessions_per_s": cfg.batch * 1000 / plain_ms,
        "wall_ms_per_step_profiled": 1000 * wall / steps,
        "host_syncs_per_step": syncs,
        **_summary(prof, steps),
    }


def _summary(prof, steps: int) -> dict[str, Any]:
    """GPU busy time, kernels and the top GPU and host (CPU self time: Python-side ops and CUDA API
    calls such as cudaStreamSynchronize) entries of a profile, per step."""
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")]
    host = sorted((e for e in events if e not in kernels), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    return {
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1000 / steps,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "top_gpu_ops": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1000 / steps,
                         "calls_per_step": e.count / steps} for e in top],
        "top_host_ops": [{"name": e.key[:90], "ms_per_step": e.self_cpu_time_total / 1000 / steps,
                          "calls_per_step": e.count / steps} for e in host],
    }


def profile_trainer(cfg, variant: str, precision: str, steps: int, device_name: str) -> dict[str, Any]:
    """raytr's own training loop (`train_loop`: scheduler, NaN check, loss sums, TensorBoard scalar
    every step, compiled regions) fed by the pyarrow DataLoader: ms per step between batches, then a
    profile of `steps` steps taken from inside the loop's batch stream.

    The variant's suffixes change one thing each, to find what costs the Trainer its time on the
    GPU: `-merlin` reads with the merlin engine (bench/train.py's default), `-quiet` writes no
    TensorBoard scalars, `-nogc` disables Python's garbage collector during the loop, `-cudagraphs`
    compiles with torch_compile_mode="reduce-overhead" (input layer and body as CUDA graphs),
    `-smallchunk` computes the loss in chunks of 4,096 rows (the former default), `-triton` with
    raytr's Triton chunk kernel (loss_kernel="triton")."""
    import gc
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from raytr.data.loaders import DataLoader
    from raytr.features import FeatureSpec
    from raytr.models import SessionModel
    from raytr.training.arguments import TrainingArguments
    from raytr.training.loop import LoopConfig, WorkerContext, train_loop

    options = variant_options(variant, "trainer", TRAINER_OPTIONS)
    engine = "merlin" if "merlin" in options else "pyarrow"
    device = torch.device(device_name)
    warm, timed = 8, 40
    data = sessions_for(cfg, warm + timed + steps)
    spec = FeatureSpec(item_id="item_id-list", item_cardinality=cfg.items, max_sequence_length=cfg.seq_len)
    work = Path(tempfile.mkdtemp(prefix="profile-trainer-"))
    model_config = variant_model_config(cfg, options)
    SessionModel(spec, model_config, seed=0).save(work / "init")
    args = TrainingArguments(output_dir=str(work / "out"), max_steps=warm + timed + steps,
                             per_device_train_batch_size=cfg.batch, learning_rate=LEARNING_RATE,
                             fp16=precision == "fp16", bf16=precision == "bf16", torch_compile=True,
                             torch_compile_mode="reduce-overhead" if "cudagraphs" in options else None,
                             loss_kernel="triton" if "triton" in options else "torch", launcher="local",
                             use_gpu=device.type == "cuda", data_loader_engine=engine,
                             logging_steps=0 if "quiet" in options else 1,
                             report_to=() if "quiet" in options else ("tensorboard",), disable_tqdm=True,
                             save_total_limit=1)
    loader = DataLoader(spec, list(data.files), cfg.batch, engine=engine, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    marks: list[float] = []

    def batches(epoch: int):
        loader.set_epoch(epoch)
        for batch in loader:
            marks.append(time.perf_counter())  # the loop asks for batch n once step n-1 is queued
            if len(marks) == warm + timed + 1:
                prof.start()
            if len(marks) == warm + timed + 1 + steps:
                prof.stop()
            yield batch

    ctx = WorkerContext(device=device, train_batches=batches, steps_per_epoch=len(loader))
    if "nogc" in options:
        gc.disable()
    try:
        train_loop(LoopConfig(spec=spec, model_config=model_config, args=args,
                              init_model_dir=str(work / "init"), train_paths=tuple(data.files)), ctx)
    finally:
        gc.enable()
    step_ms = 1000 * (marks[warm + timed] - marks[warm]) / timed
    # Even gaps mean a per-step cost; a few long ones a periodic stall (collector, writer thread).
    gaps = sorted(1000 * (b - a) for a, b in zip(marks[warm:warm + timed], marks[warm + 1:warm + timed + 1]))
    return {"variant": variant, "config": cfg.name, "precision": precision, "steps": steps,
            "step_ms": step_ms, "sessions_per_s": cfg.batch * 1000 / step_ms,
            "step_ms_median": gaps[len(gaps) // 2], "step_ms_p90": gaps[int(0.9 * len(gaps))],
            "step_ms_max": gaps[-1],
            "wall_ms_per_step_profiled": 1000 * (marks[warm + timed + steps] - marks[warm + timed]) / steps,
            "host_syncs_per_step": None, **_summary(prof, steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="50k")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--variants", default="bare-compiled,raytr,raytr-compiled,trainer,trainer-merlin,trainer-quiet,"
                                         "trainer-nogc",
                   help="bare-compiled; raytr or raytr-compiled, with any of the suffixes -foreach (plain AdamW "
                        "instead of fused), -smallchunk (4,096-row loss chunks, the former default), -triton "
                        "(raytr's Triton loss kernel), and for "
                        "raytr-compiled -inplace (the in-place chunk kernel compiled, as up to 2026-11-27), -cudagraphs "
                        "(input layer and body as CUDA graphs: mode='reduce-overhead'); trainer (raytr's training loop "
                        "itself; also runs with --device cpu), with any of the suffixes -merlin (merlin engine), -quiet "
                        "(no TensorBoard), -nogc (no garbage collector), -cudagraphs (torch_compile_mode="
                        "'reduce-overhead'), -smallchunk, -triton. Suffixes combine: trainer-cudagraphs-triton")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only the trainer variant")
    p.add_argument("--steps", type=int, default=10)
    add_code_argument(p)
    p.add_argument("--merge", action="store_true",
                   help="add this run's rows to results/profile-<device>.json instead of replacing it (rows are dated)")
    args = p.parse_args(argv)
    setup_logging()
    started, load_before = time.time(), load_average()
    stamp = {"measured": timestamp(started),
             "code": args.code or code_version(), "gpu": gpu_name()}
    import torch
    from torch._dynamo.utils import counters

    rows = []
    for name in args.configs.split(","):
        for variant in args.variants.split(","):
            # Each variant compiles afresh: torch counts cudagraph skips when it compiles, so code reused from
            # an earlier variant (the same input layer and body) would report none.
            torch._dynamo.reset()
            skips = counters["inductor"]["cudagraph_skips"]
            try:
                if variant.startswith("trainer"):
                    row = profile_trainer(ALL_CONFIGS[name], variant, args.precision, args.steps, args.device)
                else:
                    row = profile_variant(ALL_CONFIGS[name], variant, args.precision, args.steps)
            except Exception as err:  # one failing variant must not lose the others' figures
                row = {"variant": variant, "config": name, "precision": args.precision, "error": repr(err)[:400]}
            row.update(stamp)
            if "cudagraphs" in variant:  # regions run without CUDA graphs (the perf_hints log says why)
                row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
            rows.append(row)
            if "error" in row:
                print(f"{name} {variant}: ERROR {row['error']}", flush=True)
                continue
            print(f"\n{name} {args.precision} {variant}: {row['step_ms']:.2f} ms/step ({row['sessions_per_s']:.0f} "
                  f"sessions/s); profiled: wall {row['wall_ms_per_step_profiled']:.2f} ms/step, GPU busy "
                  f"{row['gpu_busy_ms_per_step']:.2f} ms/step, {row['kernels_per_step']:.0f} kernels, "
                  f"{row['host_syncs_per_step']} host syncs"
                  + (f", {row['cudagraph_skips']} cudagraph skips" if "cudagraph_skips" in row else ""), flush=True)
            if "step_ms_median" in row:
                print(f"  steps between batches: median {row['step_ms_median']:.2f} ms, p90 {row['step_ms_p90']:.2f}, "
                      f"max {row['step_ms_max']:.2f}")
            for op in row["top_gpu_ops"]:
                print(f"  {op['ms_per_step']:8.3f} ms  x{op['calls_per_step']:5.1f}  {op['name']}")
            print("  host (CPU self time):")
            for op in row["top_host_ops"][:8]:
                print(f"  {op['ms_per_step']:8.3f} ms  x{op['calls_per_step']:5.1f}  {op['name']}")
    name, extra = f"profile-{args.device}", {}
    if args.merge and (old := read_result(name)) is not None:
        rows = with_gpu(old["results"], old.get("machine", {}).get("gpu", "no GPU")) + rows
        extra = {k: old[k] for k in ("findings",) if k in old}  # written by hand from the rows: kept
    write_result(name, envelope(name, started, load_before, results=rows, **extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
