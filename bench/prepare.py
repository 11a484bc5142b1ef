"""Preparation throughput: raw events/s through `raytr.data.prepare.prepare` vs a plain pandas
pipeline doing the same work, in the same run, at two data sizes.

    python bench/prepare.py                          # 20k and 200k synthetic sessions
    python bench/prepare.py --sessions 20000,2000000

Raw data: `raytr synth` (items 5,000, seed 1) under runs/bench/. raytr: the full `prepare` (Ray
Data bucketing by session hash, one sort task per bucket, NVTabular fit, one transform task per
bucket, parquet per day) on a local Ray started before timing (its start-up is reported apart).
The pandas pipeline, one process, same outputs for configs/synthetic.yaml:
    read parquet -> normalise types -> sort by (session, time) -> Categorify by frequency (item,
    category, hour, weekday: 0 pad, 1 null, 2 OOV, then by descending count) -> log1p + normalise
    price -> time since the previous event (log1p, normalise) -> group sessions into list columns
    (Arrow ListArray from the sorted offsets) -> keep the last T events -> drop sessions shorter
    than 2 -> day of the first event -> parquet per day.
The two outputs are checked to agree (sessions per day, item cardinality, events kept).

`raytr-nvt-groupby` is raytr's prepare with NVTabular's own `ops.Groupby` in place of
`ColumnarGroupby` (the workflow's one difference from stock NVTabular), measured in the same run:
what the columnar CPU path of the session grouping is worth.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.common import DATA_DIR, REPO, disturbed, envelope, load_average, setup_logging, write_result  # noqa: E402

log = logging.getLogger("bench.prepare")

PAD, NULL, OOV, FIRST = 0, 1, 2, 3


def raw_events(sessions: int, items: int = 5_000, seed: int = 1) -> Path:
    from raytr.data.synth import SynthConfig, synthesize

    raw = DATA_DIR / f"raw-s{sessions}-i{items}-seed{seed}"
    if not raw.is_dir():
        synthesize(SynthConfig(sessions=sessions, items=items, seed=seed), raw)
    return raw


# ---------------------------------------------------------------------------- the pandas pipeline
def _categorify(values: pd.Series, freq_threshold: int = 0) -> tuple[np.ndarray, int]:
    """Ids by descending frequency from FIRST; nulls -> NULL; rarer than threshold -> OOV.
    Returns (ids, cardinality incl. the reserved ids)."""
    counts = values.value_counts(dropna=True)
    if freq_threshold:
        counts = counts[counts >= freq_threshold]
    mapping = pd.Series(np.arange(FIRST, FIRST + len(counts), dtype=np.int64), index=counts.index)
    ids = values.map(mapping)
    ids = ids.where(values.notna(), NULL).fillna(OOV).astype(np.int64).to_numpy()
    return ids, FIRST + len(counts)


def _normalize(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float64)


def pandas_prepare(config, input_dir: Path, output: Path) -> dict[str, Any]:
    """configs/synthetic.yaml's preparation in plain pandas/numpy/pyarrow (see module doc)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stages: dict[str, float] = {}
    t = time.perf_counter()
    s, i, ts = config.session_col, config.item_col, config.timestamp_col
    frame = pd.read_parquet(input_dir, columns=config.raw_columns)
    stages["read"] = time.perf_counter() - t

    t = time.perf_counter()
    frame[ts] = frame[ts].astype(np.float64)
    for name in config.continuous:
        frame[name] = frame[name].astype(np.float64)
    frame = frame.sort_values([s, ts], kind="stable").reset_index(drop=True)
    stages["sort"] = time.perf_counter() - t

    t = time.perf_counter()
    cols: dict[str, np.ndarray] = {}
    cards: dict[str, int] = {}
    cols[i], cards[i] = _categorify(frame[i], config.freq_threshold)
    for name in config.categorical:
        cols[name], cards[name] = _categorify(frame[name])
    seconds = frame[ts].to_numpy()
    cols["hour"], cards["hour"] = _categorify(pd.Series(((seconds // 3600) % 24).astype(np.int64)))
    cols["weekday"], cards["weekday"] = _categorify(pd.Series(((seconds // 86_400 + 3) % 7).astype(np.int64)))
    for name in config.continuous:
        x = frame[name].fillna(0.0).to_numpy()
        cols[name] = _normalize(np.log1p(x) if name in config.log_transform else x)
    sess = frame[s].to_numpy()
    new_session = np.r_[True, sess[1:] != sess[:-1]]
    gap = np.where(new_session, 0.0, np.diff(seconds, prepend=seconds[0]))
    cols["time_since_prev"] = _normalize(np.log1p(gap))
    stages["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    starts = np.flatnonzero(new_session)
    offsets = np.r_[starts, len(sess)]
    lengths = np.diff(offsets)
    keep_session = lengths >= config.min_session_length
    T = config.max_sequence_length
    # Position from the session's end of every event; keep the last T of sessions kept.
    from_end = np.repeat(offsets[1:], lengths) - np.arange(len(sess)) - 1
    keep_event = (from_end < T) & np.repeat(keep_session, lengths)
    kept_lengths = np.minimum(lengths, T)[keep_session]
    list_offsets = pa.array(np.r_[0, np.cumsum(kept_lengths)].astype(np.int32))
    order = ["item_id", *config.categorical, "hour", "weekday", *config.continuous, "time_since_prev"]
    table = pa.table({
        s: sess[starts][keep_session],
        f"{ts}-first": seconds[starts][keep_session],
        f"{ts}-last": seconds[offsets[1:] - 1][keep_session],
        **{f"{name}-list": pa.ListArray.from_arrays(list_offsets, pa.array(cols[name][keep_event])) for name in order},
        "session_length": lengths[keep_session].astype(np.int32),
    })
    stages["group"] = time.perf_counter() - t

    t = time.perf_counter()
    first_day = np.floor_divide(table.column(f"{ts}-first").to_numpy(), 86_400).astype(np.int64)
    days = first_day - first_day.min() + 1
    per_day = {}
    for day in np.unique(days):
        target = output / "sessions" / f"day={day}" / "part-00000.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = pa.array(days == day)
        pq.write_table(table.filter(mask), target)
        per_day[int(day)] = int((days == day).sum())
    stages["write"] = time.perf_counter() - t
    return {"stages": stages, "sessions": table.num_rows, "sessions_per_day": per_day,
            "items": cards[i], "events_kept": int(keep_event.sum())}


# ---------------------------------------------------------------------------- raytr
class _StageClock(logging.Handler):
    """Times raytr.data.prepare's stages from its own log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for key in ("fitting the workflow", "transforming"):
            if key in msg:
                self.marks.append((key, time.perf_counter()))


def raytr_prepare(config, input_dir: Path, output: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from raytr.data.prepare import prepare

    clock = _StageClock()
    logger = logging.getLogger("raytr.data.prepare")
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        summary = prepare(config, input_dir, output)
    finally:
        logger.removeHandler(clock)
    end = time.perf_counter()
    marks = dict(clock.marks)
    stages = {}
    if "fitting the workflow" in marks and "transforming" in marks:
        stages = {"bucket+sort": marks["fitting the workflow"] - t0,
                  "fit": marks["transforming"] - marks["fitting the workflow"],
                  "transform+write": end - marks["transforming"]}
    kept = sum(pq.ParquetFile(f).metadata.num_rows for f in (output / "sessions").rglob("*.parquet"))
    events = 0
    for f in (output / "sessions").rglob("*.parquet"):
        col = pq.read_table(f, columns=[f"{config.item_col}-list"]).column(0)
        events += sum(len(c.values) for c in col.chunks)
    return {"stages": stages, "sessions": summary.sessions, "sessions_per_day": summary.sessions_per_day,
            "items": summary.items, "events_kept": events, "rows_written": kept}


def raytr_prepare_nvt_groupby(config, input_dir: Path, output: Path) -> dict[str, Any]:
    """raytr_prepare with NVTabular's stock Groupby: the workflow is built in this process, and the
    transform tasks unpickle the op they were given, so swapping the name here swaps it everywhere."""
    import raytr.data.workflow as workflow
    from nvtabular import ops

    columnar = workflow.ColumnarGroupby
    workflow.ColumnarGroupby = ops.Groupby
    try:
        return raytr_prepare(config, input_dir, output)
    finally:
        workflow.ColumnarGroupby = columnar


PIPELINES = {"pandas": pandas_prepare, "raytr": raytr_prepare, "raytr-nvt-groupby": raytr_prepare_nvt_groupby}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="20000,200000", help="comma list of synthetic session counts")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per pipeline and size; the fastest is kept (the first also warms Ray Data's workers)")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help="comma list of " + ", ".join(PIPELINES) + " (pandas, the baseline, always runs)")
    p.add_argument("--output", default="prepare")
    args = p.parse_args(argv)
    setup_logging()
    import ray

    from raytr.config import load_config

    started, load_before = time.time(), load_average()
    config = load_config(REPO / "configs" / "synthetic.yaml").data
    t = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    rows = []
    for n in [int(x) for x in args.sessions.split(",")]:
        raw = raw_events(n)
        events = int(pd.read_parquet(raw, columns=["item_id"]).shape[0])
        best: dict[str, dict[str, Any]] = {}
        for repeat in range(args.repeats):
            for name in ["pandas"] + [n for n in args.pipelines.split(",") if n != "pandas"]:
                fn = PIPELINES[name]
                out = DATA_DIR / f"prepare-bench-{name}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                load0 = load_average()
                t = time.perf_counter()
                res = fn(config, raw, out)
                seconds = time.perf_counter() - t
                shutil.rmtree(out, ignore_errors=True)
                res.update({"pipeline": name, "raw_sessions": n, "events": events, "seconds": seconds,
                            "events_per_s": events / seconds, "load_before": load0, "load_after": load_average()})
                res["disturbed"] = disturbed(load0) or disturbed(res["load_after"])
                log.info("%s %d sessions: %.1fs, %.0f events/s (load %.1f) stages %s", name, n, seconds,
                         res["events_per_s"], load0[0], {k: round(v, 1) for k, v in res["stages"].items()})
                runs = best.get(name, {}).get("runs", []) + [seconds]
                if name not in best or seconds < best[name]["seconds"]:
                    best[name] = res
                best[name]["runs"] = runs
        q = best["pandas"]
        q["outputs_agree"] = True
        line = f"{n:>8} sessions ({events:,} events): pandas {q['seconds']:.1f}s ({q['events_per_s']:,.0f} ev/s)"
        for name in [k for k in best if k != "pandas"]:
            r = best[name]
            r["outputs_agree"] = (r["sessions"] == q["sessions"] and r["items"] == q["items"]
                                  and r["events_kept"] == q["events_kept"]
                                  and {int(k): v for k, v in r["sessions_per_day"].items()} == q["sessions_per_day"])
            r["ratio_vs_pandas"] = r["events_per_s"] / q["events_per_s"]
            q["outputs_agree"] = q["outputs_agree"] and r["outputs_agree"]
            line += (f", {name} {r['seconds']:.1f}s ({r['events_per_s']:,.0f} ev/s, /pandas {r['ratio_vs_pandas']:.3f}, "
                     f"outputs agree: {r['outputs_agree']})")
        rows += list(best.values())
        print(line)
    ray.shutdown()
    notes = [f"Ray started once before timing ({ray_start:.1f}s, not counted); prepare uses its default buckets (2 x CPUs).",
             f"Fastest of {args.repeats} run(s) per pipeline and size, interleaved; a first run also pays Ray Data's "
             "worker start-up (~3-5 s).",
             "events_per_s = raw events / wall seconds of the whole pipeline (read to written parquet).",
             "Growth: compare seconds across sizes (x10 sessions)."]
    write_result(args.output, envelope("prepare", started, load_before, ray_start_s=ray_start, results=rows,
                                       notes=notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
