"""Serving benchmark: the Ray Serve app vs the standalone FastAPI + uvicorn process, same bundle,
same machine, same run; and the per-request preprocessing of `OnlinePreprocessor` vs the NVTabular
executor.

    python bench/serve.py --bundle runs/demo/train                 # an existing bundle
    python bench/serve.py --make-bundle runs/bench/serve-bundle    # synth -> prepare -> train first

HTTP load: bounded pools of client threads (each with its own keep-alive connection) on loopback
only, `--requests` per concurrency level and server after a warm-up; latency p50/p95/p99 and
throughput per level, and the Serve / standalone ratios. Request bodies are random sessions of
1-20 events over the bundle's own raw item ids. Results: bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# This file is bench/serve.py: with bench/ on sys.path (`python bench/serve.py` puts it first),
# `import serve` would find this script instead of the serve package. So bench/ leaves sys.path
# and the shared helpers load from their file.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
_spec = importlib.util.spec_from_file_location("bench_common", _BENCH / "common.py")
common = importlib.util.module_from_spec(_spec)
sys.modules["bench_common"] = common
_spec.loader.exec_module(common)
REPO = common.REPO

log = logging.getLogger("bench.serve")


# ------------------------------------------------------------------------------------ inputs
def make_bundle(directory: Path, sessions: int = 3000, items: int = 500) -> Path:
    """A small bundle: synthetic events -> prepare -> one epoch of the default model."""
    from dataclasses import replace

    from raytr.bundle import attach_preprocessing
    from raytr.config import load_config
    from raytr.data.prepare import prepare
    from raytr.data.schema import feature_spec, load_schema
    from raytr.data.synth import SynthConfig, synthesize
    from raytr.models import SessionModel
    from raytr.training.trainer import Trainer

    config = load_config(REPO / "configs" / "synthetic.yaml")
    raw, prepared, out = directory / "raw", directory / "prepared", directory / "bundle"
    synthesize(SynthConfig(sessions=sessions, items=items, days=3), raw)
    prepare(config.data, raw, prepared)
    model = SessionModel(feature_spec(load_schema(prepared)), config.model, seed=0)
    args = replace(config.training, output_dir=str(out), launcher="local", num_train_epochs=1, disable_tqdm=True)
    Trainer(model, args, train_dataset_or_path=str(prepared)).train()
    attach_preprocessing(prepared, out)
    return out


def random_sessions(bundle_dir: Path, count: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """API events of `count` random sessions (1-20 events) over the bundle's raw vocabularies."""
    from raytr.online import OnlinePreprocessor

    online = OnlinePreprocessor.from_bundle(bundle_dir)
    rng = np.random.default_rng(seed)
    items = [v for v in online.item_vocabulary.values if v is not None]
    vocabs = {p.source: next(s.vocabulary for s in p.steps if hasattr(s, "vocabulary"))
              for p in online.plans[1:] if p.categorical and p.source in online.config.categorical}
    sessions = []
    for _ in range(count):
        length = int(rng.integers(1, 21))
        start = 1_714_550_000.0 + rng.uniform(0, 86_400)
        events = []
        for t in range(length):
            event: dict[str, Any] = {"item_id": items[int(rng.integers(len(items)))], "timestamp": start + 45.0 * t}
            for name, vocab in vocabs.items():
                known = [v for v in vocab.values if v is not None]
                value = known[int(rng.integers(len(known)))]
                event[name] = int(value) if isinstance(value, float) and value.is_integer() else value
            for name in online.config.continuous:
                event[name] = round(float(rng.lognormal(3.0, 0.8)), 2)
            events.append(event)
        sessions.append(events)
    return sessions


# ------------------------------------------------------------------------------------ HTTP load
def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}


def load_test(url: str, bodies: list[dict[str, Any]], concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    """`requests` POST /recommend from `concurrency` threads (after `warmup` unmeasured ones)."""
    per_thread = [bodies[i::concurrency] for i in range(concurrency)]

    def worker(mine: list[dict[str, Any]], n: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=url, timeout=60.0) as client:
            for i in range(n):
                started = time.perf_counter()
                response = client.post("/recommend", json=mine[i % len(mine)])
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200
        return latencies, errors

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda m: worker(m, max(1, warmup // concurrency)), per_thread))
        started = time.perf_counter()
        results = list(pool.map(lambda m: worker(m, requests // concurrency), per_thread))
        wall = time.perf_counter() - started
    latencies = [x for lat, _ in results for x in lat]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": sum(e for _, e in results),
        "throughput_rps": round(len(latencies) / wall, 1),
        **percentiles(latencies),
    }


def start_standalone(bundle_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "serve.standalone", "--bundle", str(bundle_dir), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------ preprocessing
def preprocessing(bundle_dir: Path, sessions: list[list[dict[str, Any]]], compiled_runs: int,
                  executor_runs: int) -> dict[str, Any]:
    """One session per call: OnlinePreprocessor.encode_sessions vs normalize+sort+workflow executor."""
    import pandas as pd

    from raytr.bundle import Bundle
    from raytr.data.events import normalize_events, sort_events
    from raytr.data.workflow import load_workflow, transform_frame
    from raytr.online import OnlinePreprocessor

    bundle = Bundle.load(bundle_dir)
    online = OnlinePreprocessor.from_bundle(bundle)
    workflow = load_workflow(bundle.workflow_dir)
    c = bundle.data

    def raw(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**{k: v for k, v in e.items() if k not in ("item_id", "timestamp")},
                 c.item_col: e["item_id"], c.timestamp_col: e["timestamp"]} for e in events]

    compiled = []
    for i in range(compiled_runs):
        events = raw(sessions[i % len(sessions)])
        started = time.perf_counter()
        online.encode_sessions([events], timestamp_unit="s")
        compiled.append(time.perf_counter() - started)
    executor = []
    for i in range(executor_runs):
        frame = pd.DataFrame([{c.session_col: 1, **e} for e in raw(sessions[i % len(sessions)])])
        started = time.perf_counter()
        transform_frame(workflow, sort_events(normalize_events(frame, c), c))
        executor.append(time.perf_counter() - started)
    compiled_p, executor_p = percentiles(compiled), percentiles(executor)
    return {
        "compiled": {"runs": compiled_runs, **compiled_p},
        "nvtabular_executor": {"runs": executor_runs, **executor_p},
        "speedup_p50": round(executor_p["p50_ms"] / compiled_p["p50_ms"], 1),
    }


# ------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--bundle", type=Path, help="an existing model bundle (`raytr train` output)")
    group.add_argument("--make-bundle", type=Path, help="build a small bundle in this directory first")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=240, help="measured requests per level and server")
    parser.add_argument("--warmup", type=int, default=24)
    parser.add_argument("--compiled-runs", type=int, default=500)
    parser.add_argument("--executor-runs", type=int, default=40)
    args = parser.parse_args(argv)
    common.setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning")
    started, load_before = time.time(), common.load_average()

    import ray

    from serve.app import free_port, start_local, stop_local, wait_until_healthy

    if args.make_bundle:
        ray.init(include_dashboard=False, log_to_driver=False)
        bundle_dir = make_bundle(args.make_bundle)
    else:
        bundle_dir = args.bundle.resolve()
    sessions = random_sessions(bundle_dir, 200)
    bodies = [{"session_id": i, "events": s, "k": 10} for i, s in enumerate(sessions)]

    log.info("preprocessing: compiled vs NVTabular executor")
    prep = preprocessing(bundle_dir, sessions, args.compiled_runs, args.executor_runs)

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    serve_url = start_local(str(bundle_dir), port=free_port())
    standalone_port = free_port()
    standalone = start_standalone(bundle_dir, standalone_port)
    standalone_url = f"http://127.0.0.1:{standalone_port}"
    levels = []
    try:
        wait_until_healthy(standalone_url)
        for concurrency in args.concurrency:
            for name, url in (("serve", serve_url), ("standalone", standalone_url)):
                log.info("HTTP load: %s, %d client(s)", name, concurrency)
                levels.append({"server": name, **load_test(url, bodies, concurrency, args.requests, args.warmup)})
    finally:
        standalone.terminate()
        standalone.wait(timeout=30)
        stop_local()

    ratios = []
    for concurrency in args.concurrency:
        s = next(x for x in levels if x["server"] == "serve" and x["concurrency"] == concurrency)
        b = next(x for x in levels if x["server"] == "standalone" and x["concurrency"] == concurrency)
        ratios.append({"concurrency": concurrency,
                       "p50_serve_over_standalone": round(s["p50_ms"] / b["p50_ms"], 2),
                       "p99_serve_over_standalone": round(s["p99_ms"] / b["p99_ms"], 2),
                       "throughput_serve_over_standalone": round(s["throughput_rps"] / b["throughput_rps"], 2)})
    notes = ["Serve: 1 replica each of Ingress, Preprocessor, Recommender (max_batch_size 32, "
             "batch_wait_timeout_s 0.005), access logs on; standalone: uvicorn, one worker, model in a thread"]
    if common.disturbed(load_before):
        notes.append(f"other work loaded the machine (1-min load {load_before[0]} on {os.cpu_count()} cores): "
                     "absolute latencies are inflated, compare the ratios")
    payload = common.envelope("serve", started, load_before, bundle=str(bundle_dir), http=levels, ratios=ratios,
                       preprocessing=prep, notes=notes)
    common.write_result("serve", payload)
    print(report(payload))
    return 0


def report(payload: dict[str, Any]) -> str:
    lines = [f"{'server':<11} {'clients':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}"]
    for x in payload["http"]:
        lines.append(f"{x['server']:<11} {x['concurrency']:>7} {x['p50_ms']:>8} {x['p95_ms']:>8} {x['p99_ms']:>8} "
                     f"{x['throughput_rps']:>8} {x['errors']:>6}")
    for r in payload["ratios"]:
        lines.append(f"serve / standalone at {r['concurrency']} client(s): p50 x{r['p50_serve_over_standalone']}, "
                     f"p99 x{r['p99_serve_over_standalone']}, throughput x{r['throughput_serve_over_standalone']}")
    p = payload["preprocessing"]
    lines.append(f"preprocessing one session: compiled p50 {p['compiled']['p50_ms']} ms (p99 {p['compiled']['p99_ms']}), "
                 f"NVTabular executor p50 {p['nvtabular_executor']['p50_ms']} ms (p99 {p['nvtabular_executor']['p99_ms']}): "
                 f"x{p['speedup_p50']} faster")
    lines.append(f"load average before/after: {payload['load_average']['before']} / {payload['load_average']['after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
