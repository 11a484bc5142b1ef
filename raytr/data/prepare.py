"""`raytr prepare`: raw events -> session sequences, on Ray.

    raw files --(Ray Data: read, normalise, hash sessions to buckets)--> staging/buckets/__bucket=b/
              --(one Ray task per bucket: sort by session, time)------> staging/sorted/part-b.parquet
              --(NVTabular: fit the workflow on the sorted parts)-----> workflow/, schema.*
              --(one Ray task per part: transform, split by day)-----> sessions/day=N/part-b.parquet

A session hashes to exactly one bucket, so it is never split across two outputs, and every step
after the first scales out by bucket. Everything is written under a temporary sibling directory
that is renamed into place at the end: a failed run leaves no dataset that looks complete.

Output directory:
    sessions/day=N/*.parquet   one row per session (see raytr.data.workflow for columns)
    workflow/                  the fitted NVTabular workflow (load only directories you trust)
    schema.json, schema.pbtxt  the Merlin schema of sessions/ (cardinalities, max length, tags)
    prepare.json               the data config, the day origin and a summary
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from raytr.config import DataConfig
from raytr.data.events import InputError, normalize_events, sort_events, validate_input
from raytr.data.schema import save_schema
from raytr.ray_runtime import ensure_ray
from raytr.data.workflow import (
    SESSION_LENGTH,
    fit_workflow,
    load_workflow,
    output_schema,
    save_workflow,
    transform_frame,
)

log = logging.getLogger(__name__)

BUCKET = "__bucket"
SESSIONS_DIR = "sessions"
WORKFLOW_DIR = "workflow"
PREPARE_JSON = "prepare.json"
DAY = "day"


@dataclass(frozen=True)
class PrepareSummary:
    output: str
    events: int
    sessions: int
    items: int
    mean_session_length: float
    sessions_per_day: dict[int, int] = field(default_factory=dict)
    origin_day: int = 0
    seconds: float = 0.0

    def to_text(self) -> str:
        days = ", ".join(f"day {d}: {n}" for d, n in sorted(self.sessions_per_day.items()))
        return (
            f"prepared {self.sessions:,} sessions from {self.events:,} events in {self.seconds:.1f}s\n"
            f"  items (cardinality incl. padding/null/OOV): {self.items:,}\n"
            f"  mean session length: {self.mean_session_length:.2f}\n"
            f"  sessions per day: {days}\n"
            f"  output: {self.output}"
        )


def prepare(
    config: DataConfig,
    input_path: str | Path,
    output: str | Path,
    num_buckets: int | None = None,
) -> PrepareSummary:
    """Prepare raw events at `input_path` into session sequences at `output` (see module doc).

    num_buckets: session buckets (parallelism of the later steps); default from the cluster size.
    """
    start = time.perf_counter()
    files = validate_input(config, input_path)
    ensure_ray()
    output = Path(output).resolve()
    staging = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        buckets = num_buckets or max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
        log.info("prepare: %d %s file(s), %d rows, %d session buckets", len(files.paths), files.format,
                 files.num_rows, buckets)
        _bucket_events(config, files.paths, files.format, staging / "buckets", buckets)
        sorted_files, origin_day = _sort_buckets(config, staging / "buckets", staging / "sorted")
        if not sorted_files:
            raise InputError(f"input {str(input_path)!r} has no rows")

        log.info("prepare: fitting the workflow on %d sorted parts", len(sorted_files))
        workflow = fit_workflow(config, sorted_files, staging / "fit")
        save_workflow(workflow, staging / WORKFLOW_DIR)
        shutil.rmtree(staging / "fit", ignore_errors=True)
        schema = output_schema(workflow, config)
        save_schema(schema, staging)

        log.info("prepare: transforming %d parts", len(sorted_files))
        stats = _transform_parts(config, sorted_files, staging / WORKFLOW_DIR, staging / SESSIONS_DIR, origin_day)
        sessions = sum(s["sessions"] for s in stats)
        if sessions == 0:
            raise InputError(
                f"no session in {str(input_path)!r} has >= data.min_session_length={config.min_session_length} events"
            )
        per_day: dict[int, int] = {}
        for s in stats:
            for day, n in s["per_day"].items():
                per_day[int(day)] = per_day.get(int(day), 0) + n
        item_col = schema[f"{config.item_col}-list"]
        summary = PrepareSummary(
            output=str(output),
            events=files.num_rows,
            sessions=sessions,
            items=int(item_col.properties["embedding_sizes"]["cardinality"]),
            mean_session_length=sum(s["length_sum"] for s in stats) / sessions,
            sessions_per_day=dict(sorted(per_day.items())),
            origin_day=origin_day,
            seconds=time.perf_counter() - start,
        )
        (staging / PREPARE_JSON).write_text(
            json.dumps({"data": asdict(config), "summary": asdict(summary), "input": str(input_path)}, indent=2)
        )
        shutil.rmtree(staging / "buckets")
        shutil.rmtree(staging / "sorted")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
        return summary
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _bucket_events(config: DataConfig, paths: tuple[str, ...], fmt: str, out: Path, buckets: int) -> None:
    """Ray Data: read raw files, normalise types, and write rows partitioned by session bucket."""
    columns = config.raw_columns
    if fmt == "parquet":
        ds = ray.data.read_parquet(list(paths)).select_columns(columns)
    else:
        import pyarrow.csv as pacsv

        parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
        ds = ray.data.read_csv(list(paths), parse_options=parse)

    def to_buckets(batch: pd.DataFrame) -> pd.DataFrame:
        frame = normalize_events(batch, config)
        hashed = pd.util.hash_pandas_object(frame[config.session_col], index=False).to_numpy()
        frame[BUCKET] = (hashed % np.uint64(buckets)).astype(np.int64)
        return frame

    ds.map_batches(to_buckets, batch_format="pandas").write_parquet(str(out), partition_cols=[BUCKET])


@ray.remote
def _sort_bucket(config: DataConfig, bucket_dir: str, out_file: str) -> float | None:
    # ignore_metadata: Ray Data's pandas metadata would bring back pyarrow-backed dtypes, which
    # NVTabular's ops do not support; plain numpy dtypes are what the workflow is fitted on.
    frame = pq.read_table(bucket_dir).to_pandas(ignore_metadata=True)
    frame = frame.drop(columns=[c for c in frame.columns if c == BUCKET])
    if frame.empty:
        return None
    sort_events(normalize_events(frame, config), config).to_parquet(out_file, index=False)
    return float(frame[config.timestamp_col].min())


def _sort_buckets(config: DataConfig, buckets_dir: Path, out: Path) -> tuple[list[str], int]:
    out.mkdir(parents=True)
    dirs = sorted(p for p in buckets_dir.glob(f"{BUCKET}=*") if p.is_dir())
    files = [str(out / f"part-{d.name.split('=')[1]:0>5}.parquet") for d in dirs]
    mins = ray.get([_sort_bucket.remote(config, str(d), f) for d, f in zip(dirs, files)])
    kept = [f for f, m in zip(files, mins) if m is not None]
    starts = [m for m in mins if m is not None]
    origin_day = int(min(starts) // 86_400) if starts else 0
    return kept, origin_day


@ray.remote
def _transform_part(config: DataConfig, part: str, workflow_dir: str, out_dir: str, origin_day: int) -> dict:
    workflow = load_workflow(workflow_dir)
    sessions = transform_frame(workflow, pd.read_parquet(part))
    days = np.floor_divide(sessions[f"{config.timestamp_col}-first"].to_numpy(), 86_400).astype(np.int64)
    days = days - origin_day + 1
    per_day = {}
    name = Path(part).name
    for day in np.unique(days):
        rows = sessions[days == day].reset_index(drop=True)
        target = Path(out_dir) / f"{DAY}={day}" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(target, index=False)
        per_day[int(day)] = len(rows)
    return {"sessions": len(sessions), "per_day": per_day, "length_sum": int(sessions[SESSION_LENGTH].sum())}


def _transform_parts(config: DataConfig, parts: list[str], workflow_dir: Path, out: Path, origin_day: int) -> list[dict]:
    out.mkdir(parents=True)
    refs = [_transform_part.remote(config, p, str(workflow_dir), str(out), origin_day) for p in parts]
    return ray.get(refs)


def load_prepare_info(directory: str | Path) -> dict:
    path = Path(directory) / PREPARE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a prepared dataset (no {PREPARE_JSON}): run `raytr prepare`")
    return json.loads(path.read_text())


def day_paths(directory: str | Path, days: list[int] | None = None) -> list[str]:
    """Absolute paths of the parquet files of the given days (all days when None), in day order."""
    directory = Path(directory).resolve()
    root = directory / SESSIONS_DIR if (directory / SESSIONS_DIR).is_dir() else directory
    available = sorted(int(p.name.split("=")[1]) for p in root.glob(f"{DAY}=*"))
    chosen = available if days is None else days
    missing = [d for d in chosen if d not in available]
    if missing:
        raise FileNotFoundError(f"day(s) {missing} not in {root}; available days: {available}")
    return [str(f) for d in chosen for f in sorted((root / f"{DAY}={d}").glob("*.parquet"))]


def available_days(directory: str | Path) -> list[int]:
    root = Path(directory) / SESSIONS_DIR
    return sorted(int(p.name.split("=")[1]) for p in root.glob(f"{DAY}=*"))
