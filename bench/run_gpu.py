"""The GPU benchmarks in one command (an H100 machine), most telling first: training step, loaders,
then REPORT.md.

    python bench/run_gpu.py                       # everything (~45 minutes)
    python bench/run_gpu.py --minutes 9           # what fits: steps in priority order, the rest skipped
    python bench/run_gpu.py --configs 5k,50k      # a subset of bench/train.py's GPU configs
    python bench/run_gpu.py --missing --minutes 9 # only what bench/results/ lacks, whole runs first

Order: the profile of one 50k fp16 step (raytr's step and its candidate speed-ups against the bare
loop, and the Trainer with and without TensorBoard), the 1M config's loss alone (bench/head_kernels.py:
the ways of compiling its chunk kernel against the bare loop's), then bench/train.py per config and precision
(50k and 5k first, then 1M and 300k), then the loaders, then report.py. Every step is its own
process and adds to the JSON already there (`--merge`): a session cut short keeps what it measured,
and the next one carries on with `--skip`, or with `--missing`: the steps whose results are not all in
bench/results/ from an H100 (`missing_runs`; REPORT.md lists the same), the ones measured not at all first, then
those that lack some implementation (their whole config and precision runs again, since a re-measured
group replaces its rows) or some loss-kernel variant (head_kernels.py runs whole and rewrites its file). The profile is a diagnosis, not a result: `--missing` leaves it out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import TRAIN_OPTIMIZER, add_code_argument, read_result, run_benchmarks  # noqa: E402
from bench.head_kernels import VARIANTS as HEAD_KERNEL_VARIANTS  # noqa: E402
from bench.loader import ENGINES as LOADER_ENGINES  # noqa: E402

# The Trainer with CUDA graphs against the bare loop, then what could cut the host time left outside
# the graphs (the loss's chunk loop: -smallchunk, the former 4,096-row chunks), then the older A/Bs.
PROFILE_VARIANTS = ("bare-compiled,trainer-cudagraphs,trainer-cudagraphs-smallchunk,raytr-compiled-cudagraphs,"
                    "raytr-compiled-cudagraphs-smallchunk,trainer,raytr-compiled-inplace")
TRAIN_ORDER = ("50k", "5k", "1M", "300k")  # the 80% target's configs first
# What the targets compare: the compiled bare loop and the compiled Trainer, in-process and on Ray Train
# (~1 minute each, ~2 for Ray's start), with the torch loss kernel and with the Triton one (which
# training.loss_kernel="auto" takes on a GPU). The eager runs (bare, raytr-model, raytr-local) explain
# the gap; run them with train.py --impls in the same invocation as the bare loops they are compared to.
TRAIN_IMPLS = {"5k": "bare-compiled,raytr-local-compiled,raytr-local-cudagraphs,raytr-local-cudagraphs-triton,"
                     "raytr-ray-cudagraphs",
               "50k": "bare-compiled,raytr-local-compiled,raytr-local-cudagraphs,raytr-local-cudagraphs-triton,"
                      "raytr-ray-cudagraphs",
               "1M": "bare-compiled,raytr-local-cudagraphs,raytr-local-cudagraphs-triton",
               "300k": "bare-compiled,raytr-local-cudagraphs,raytr-local-cudagraphs-triton"}


def gpu_steps(configs: list[str], precisions: list[str], code: str | None = None) -> list[tuple[str, list[str]]]:
    tag = ["--code", code] if code else []
    steps = [("profile", ["profile_gpu.py", "--configs", "50k", "--precision", "fp16", "--variants",
                          PROFILE_VARIANTS, "--merge", *tag]),
             ("head-kernels", ["head_kernels.py", *tag])]  # ~2 minutes: what the 1M config's loss kernel costs
    for cfg in [c for c in TRAIN_ORDER if c in configs]:
        for precision in precisions:
            steps.append((f"train-{cfg}-{precision}", ["train.py", "--device", "cuda", "--configs", cfg, "--precision",
                                                       precision, "--impls", TRAIN_IMPLS[cfg], "--merge", *tag]))
    steps.append(("loader", ["loader.py", "--device", "cuda"]))
    return steps


def on_h100(row: dict[str, Any], result: dict[str, Any] | None) -> bool:
    """Whether a result row was measured on an H100, the GPU the issue's targets name: the row's own
    `gpu`, else its file's machine (loader and loss-kernel rows record none)."""
    return "H100" in (row.get("gpu") or (result or {}).get("machine", {}).get("gpu") or "")


def measured_h100(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The rows of a result measured on an H100 without an `error`."""
    return [r for r in (result or {}).get("results", []) if "error" not in r and on_h100(r, result)]


def missing_runs(train: dict[str, Any] | None, loader: dict[str, Any] | None,
                 head_kernels: dict[str, Any] | None) -> dict[str, list[str]]:
    """The steps of the full set whose results are not all there (results that carry an `error`
    count as missing; a loss kernel that ran out of memory was measured; rows measured on another
    GPU than an H100 count as missing, since the targets are the H100's, and so do training rows
    whose bare loops had another optimizer than the Trainer's): {step label: the
    implementations, loss kernel variants or loader engines it lacks, all of them when it was never
    measured}."""
    missing: dict[str, list[str]] = {}
    # A group measured against the bare loop's old optimizer runs again whole (its ratios favour raytr).
    have = {(r["config"], r["precision"], r["impl"]) for r in measured_h100(train)
            if r.get("optimizer") == TRAIN_OPTIMIZER}
    for cfg in TRAIN_ORDER:
        for precision in ("fp16", "bf16"):
            lacking = [i for i in TRAIN_IMPLS[cfg].split(",") if (cfg, precision, i) not in have]
            if lacking:
                missing[f"train-{cfg}-{precision}"] = lacking
    measured = {r["variant"] for r in measured_h100(head_kernels)}
    lacking = [v for v in HEAD_KERNEL_VARIANTS if v not in measured]
    if lacking:
        missing["head-kernels"] = lacking
    ok = {r["engine"] for r in measured_h100(loader)}
    lacking = [e for e in LOADER_ENGINES if e not in ok]
    if lacking:
        missing["loader"] = lacking
    return missing


def lacks_some(label: str, lacking: list[str]) -> bool:
    """Whether a missing train or loss-kernel step (`missing_runs`) was measured in part: some
    implementations or variants are there (it runs whole again, after the steps never measured)."""
    if label == "head-kernels":
        return len(lacking) < len(HEAD_KERNEL_VARIANTS)
    return label.startswith("train-") and len(lacking) < len(TRAIN_IMPLS[label.split("-")[1]].split(","))


def missing_steps(steps: list[tuple[str, list[str]]], missing: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """`steps` cut to the missing ones: steps never measured first (in their order), then the train
    groups that lack only some implementations."""
    kept = [s for s in steps if s[0] in missing]
    return ([s for s in kept if not lacks_some(s[0], missing[s[0]])] +
            [s for s in kept if lacks_some(s[0], missing[s[0]])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="all", help=f"train.py configs (default: all of {list(TRAIN_ORDER)})")
    p.add_argument("--precision", default="fp16,bf16")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget: steps run in order while at least 90 s are left, the report always")
    add_code_argument(p)
    p.add_argument("--skip", default="",
                   help="comma list of step labels already measured (e.g. profile,train-50k-fp16)")
    p.add_argument("--missing", action="store_true",
                   help="only the steps whose results bench/results/ lacks (not the profile), whole runs first")
    args = p.parse_args(argv)
    configs = list(TRAIN_ORDER) if args.configs == "all" else args.configs.split(",")
    unknown = [c for c in configs if c not in TRAIN_ORDER]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {list(TRAIN_ORDER)}")
    skip = {s for s in args.skip.split(",") if s}
    steps = [s for s in gpu_steps(configs, args.precision.split(","), args.code) if s[0] not in skip]
    if args.missing:
        steps = missing_steps(steps, missing_runs(*map(read_result, ("train-cuda", "loader-cuda", "head-kernels-cuda"))))
        print("missing:", ", ".join(label for label, _ in steps) or "nothing")
    rc = run_benchmarks(steps, seconds=None if args.minutes is None else 60 * args.minutes)
    return run_benchmarks([("report", ["report.py"])]) or rc


if __name__ == "__main__":
    sys.exit(main())
