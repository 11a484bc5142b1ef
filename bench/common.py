"""Shared by the benchmarks: machine facts, load average, peak-memory samplers, synthetic session
files, result JSON. Nothing here runs at import.

Every benchmark writes `bench/results/<name>.json` with the same envelope:
    {"benchmark": name, "machine": machine_info(), "started": ..., "seconds": ...,
     "load_average": {"before": [1, 5, 15 min], "after": [...]}, "notes": [...], ...its own keys}
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DATA_DIR = REPO / "runs" / "bench"  # generated data and downloads: git-ignored (runs/)
ITEM_COLUMN = "item_id-list"
# The quality benchmark's baselines (result key -> label): every other model is a transformer.
BASELINE_LABELS = {"popularity": "popularity", "item_knn": "item-kNN", "gru": "GRU"}
QUALITY_METRICS = ("ndcg@10", "ndcg@20", "recall@10", "recall@20", "mrr@20")  # what quality.json reports
# How the repeat bias scores an item seen more than once, recorded with each search trial that has
# one; trials that recorded none (before 2026-11-29) summed the item's occurrences.
REPEAT_BIAS_FORM = "latest occurrence"
SUMMED_REPEAT_BIAS = "summed over occurrences"
# The optimizer bench/train.py's implementations all step with, recorded on each row as `optimizer`:
# the Trainer's (raytr.training.loop.build_optimizer: AdamW, fused on CUDA, weight decay 0.01 on the
# weight matrices only), so the bare loops differ from raytr's step in the model and the loop alone.
# Rows without it (before 2026-12-07) had the bare loops on torch's default AdamW (foreach on CUDA,
# every parameter decayed): slower than the Trainer's, so their ratios favour raytr.
TRAIN_OPTIMIZER = "trainer"


def repeat_bias_form(trial: dict[str, Any]) -> str | None:
    """The repeat bias a search trial (quality-search.json) ran with; None without one."""
    if not trial["hyperparameters"].get("repeat_bias"):
        return None
    return trial.get("repeat_bias_form", SUMMED_REPEAT_BIAS)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as "no GPU"
        pass
    return "no GPU"


def with_gpu(rows: list[dict[str, Any]], gpu: str) -> list[dict[str, Any]]:
    """rows, each naming the GPU that measured it: a merged result file may hold runs on different
    GPUs (rows written before rows named theirs take the file's machine GPU)."""
    return [{"gpu": gpu, **r} for r in rows]


def code_version() -> str:
    """The commit measured (short hash, '+' when the tree has changes), or 'unknown' outside git
    (the GPU machine gets a copy of the working tree without .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "gpu": gpu_name(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json atomically (a .tmp file renamed into place)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    tmp.replace(path)
    log.info("wrote %s", path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def timestamp(at: float | None = None) -> str:
    """Local time as every result file writes it (`started`, a row's or finding's `measured`)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def add_code_argument(parser) -> None:
    """--code: the commit a run measures, stored on its rows (default: git's; see `code_version`)."""
    parser.add_argument("--code", default=None,
                        help="the commit measured, stored on each row (default: git's; pass it where the tree was "
                             "copied without .git, e.g. --code $(git rev-parse --short HEAD) from the source)")


def envelope(name: str, started: float, load_before: list[float], **extra: Any) -> dict[str, Any]:
    """The record every benchmark writes around its results: what ran, when, where, on which commit
    (`code`: a `--code` given on the GPU machine, whose copy of the tree has no .git)."""
    return {
        "benchmark": name,
        "machine": machine_info(),
        "code": extra.pop("code", None) or code_version(),
        "started": timestamp(started),
        "seconds": round(time.time() - started, 1),
        "load_average": {"before": load_before, "after": load_average()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **extra,
    }


def disturbed(load: list[float], cores: int | None = None, factor: float = 1.5) -> bool:
    """True when the 1-minute load average says other work competed for the cores."""
    cores = cores or os.cpu_count() or 1
    return load[0] > factor * cores


class PeakRSS:
    """Samples the resident memory and CPU time of this process (or, with `child_match`, of the
    descendant processes whose command line contains it, e.g. a Ray Train worker) every
    `interval` seconds. `peak`/`baseline` in bytes; `cpu_seconds_between(t0, t1)` interpolates the
    CPU time (all threads) spent between two `time.time()` stamps, which is far less sensitive
    to other tenants' load than wall-clock time.

        with PeakRSS() as mem: work()
        mem.peak, mem.baseline, mem.cpu_seconds_between(t0, t1)
    """

    def __init__(self, interval: float = 0.05, child_match: str | None = None) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval, self.child_match = interval, child_match
        self.baseline = self._proc.memory_info().rss if child_match is None else 0
        self.peak = self.baseline
        self.samples: list[tuple[float, float]] = []  # (time.time(), cpu seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _targets(self):
        if self.child_match is None:
            return [self._proc]
        # Scanning every descendant's command line is not free (a Ray node has dozens of
        # processes): rescan once a second, sample the matches in between.
        self._scan_count = getattr(self, "_scan_count", 0) + 1
        if self._scan_count % 20 == 1 or not getattr(self, "_matched", None):
            matched = []
            for child in self._proc.children(recursive=True):
                try:
                    if self.child_match in " ".join(child.cmdline()):
                        matched.append(child)
                except Exception:  # noqa: BLE001 - processes come and go
                    continue
            self._matched = matched
        return self._matched

    def _sample(self) -> None:
        rss, cpu = 0, 0.0
        for proc in self._targets():
            try:
                with proc.oneshot():
                    rss = max(rss, proc.memory_info().rss)
                    times = proc.cpu_times()
                    cpu += times.user + times.system
            except Exception:  # noqa: BLE001
                continue
        self.peak = max(self.peak, rss)
        self.samples.append((time.time(), cpu))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def cpu_seconds_between(self, t0: float, t1: float) -> float:
        if len(self.samples) < 2:
            return float("nan")
        wall, cpu = np.array(self.samples).T
        return float(np.interp(t1, wall, cpu) - np.interp(t0, wall, cpu))

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class PeakDeviceMemory:
    """Samples device-wide used GPU memory (cudaMemGetInfo: every process, allocator caches and
    CUDA contexts included) every `interval` seconds; `peak - baseline` is what the run added."""

    def __init__(self, interval: float = 0.05) -> None:
        import torch

        self._torch = torch
        self.interval = interval
        free, total = torch.cuda.mem_get_info()
        self.baseline = total - free
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = self._torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakDeviceMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class SessionData:
    """A directory of synthetic item-id sessions laid out like `raytr prepare` output
    (sessions/part-*.parquet with one `item_id-list` column, schema.json)."""

    directory: Path
    files: tuple[str, ...]
    num_sessions: int
    item_cardinality: int
    max_sequence_length: int


def synthetic_sessions(num_sessions: int, item_cardinality: int, max_length: int, seed: int = 0,
                       num_files: int = 4, min_length: int = 2) -> SessionData:
    """Sessions of item ids FIRST_ITEM_ID..V-1 with Zipf(1.1)-like popularity and lengths uniform in
    [min_length, max_length], written once under runs/bench/ (re-used when present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raytr.data.schema import save_schema, schema_from_spec
    from raytr.features import FIRST_ITEM_ID, FeatureSpec

    name = f"sessions-n{num_sessions}-v{item_cardinality}-t{max_length}-s{seed}"
    directory = DATA_DIR / "train-data" / name
    files = tuple(str(directory / "sessions" / f"part-{i:02d}.parquet") for i in range(num_files))
    if not all(Path(f).is_file() for f in files):
        rng = np.random.default_rng(seed)
        n_items = item_cardinality - FIRST_ITEM_ID
        weights = 1.0 / np.arange(1, n_items + 1) ** 1.1
        weights = rng.permutation(weights / weights.sum())
        lengths = rng.integers(min_length, max_length + 1, size=num_sessions)
        values = rng.choice(n_items, size=int(lengths.sum()), p=weights).astype(np.int64) + FIRST_ITEM_ID
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        (directory / "sessions").mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, num_sessions, num_files + 1).astype(int)
        table = pa.table({ITEM_COLUMN: column})
        for f, lo, hi in zip(files, bounds[:-1], bounds[1:]):
            pq.write_table(table.slice(lo, hi - lo), f + ".tmp")
            os.replace(f + ".tmp", f)
        spec = FeatureSpec(item_id=ITEM_COLUMN, item_cardinality=item_cardinality, max_sequence_length=max_length)
        save_schema(schema_from_spec(spec), directory)
    return SessionData(directory, files, num_sessions, item_cardinality, max_length)


def prepared_synthetic(sessions: int, items: int, seed: int = 1) -> Path:
    """`raytr synth` + `raytr prepare` (configs/synthetic.yaml) under runs/bench/, made once.
    Starts Ray if this process has not (prepare runs on Ray)."""
    from raytr.config import load_config
    from raytr.data.prepare import prepare
    from raytr.data.synth import SynthConfig, synthesize

    out = DATA_DIR / f"prepared-s{sessions}-i{items}-seed{seed}"
    if (out / "prepare.json").is_file():
        return out
    raw = DATA_DIR / f"raw-s{sessions}-i{items}-seed{seed}"
    if not raw.is_dir():
        synthesize(SynthConfig(sessions=sessions, items=items, seed=seed), raw)
    prepare(load_config(REPO / "configs" / "synthetic.yaml").data, raw, out)
    return out


def run_json_subprocess(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python <args>` and parse the last stdout line that is a JSON object; errors become
    {"error": ...} so one failed measurement does not lose the others."""
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_benchmarks(steps: list[tuple[str, list[str]]], seconds: float | None = None, min_start_s: float = 90.0) -> int:
    """Run `python bench/<script> <args>` for each (label, [script, *args]) in order, each as its own
    process from the repository root; a failing one is reported and the rest still run. With
    `seconds`, the whole run stays within that budget: a step is stopped when the budget runs out,
    and one that would start with less than `min_start_s` left is skipped (both count as failed).
    Returns 1 when any failed or was skipped, else 0."""
    deadline = None if seconds is None else time.time() + seconds
    failed = []
    for label, (script, *args) in steps:
        cmd = [sys.executable, str(BENCH_DIR / script), *args]
        left = None if deadline is None else deadline - time.time()
        if left is not None and left < min_start_s:
            print(f"\n=== {label}: skipped, {max(left, 0):.0f}s of the budget left", flush=True)
            failed.append(label)
            continue
        print(f"\n=== {label}: {' '.join(cmd[1:])}", flush=True)
        started = time.time()
        try:
            rc = subprocess.run(cmd, cwd=REPO, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "stopped: the budget ran out"
        print(f"=== {label}: exit {rc} after {time.time() - started:.0f}s", flush=True)
        if rc != 0:
            failed.append(label)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


def training_consumption(train: dict[str, Any] | None) -> dict[str, Any] | None:
    """The rate raytr's training consumes sessions at, from a train-<device>.json result: its
    fastest Trainer figure (local or Ray, eager or compiled) at T = 20; None if there is none."""
    rows = [r for r in (train or {}).get("results", []) if r.get("impl", "").startswith(("raytr-local", "raytr-ray"))
            and "error" not in r and r.get("seq_len") == 20]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["sessions_per_s"])
    return {"config": best["config"], "precision": best["precision"], "batch": best["batch"],
            "sessions_per_s": best["sessions_per_s"], "impl": best["impl"], "gpu": best.get("gpu"),
            "measured": best.get("measured")}
