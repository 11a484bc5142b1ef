"""`raytr prepare`: raw events -> session sequences, on Ray.

    raw files --(Ray Data: read, normalise, hash sessions to buckets)--> staging/buckets/__bucket=b/
              --(one Ray task per bucket: sort by session, time)------> staging/sorted/part-b.parquet
              --(NVTabular: fit the workflow on the sorted parts)-----> workflow/, schema.*
              --(one Ray task per part: transform, split by day)-----> sessions/day=N/part-b.parquet

A session hashes to exactly one bucket, so it is never split across two outputs, and every step
after the first scales out by bucket. Everything is written under a temporary sibling directory
that is moved into place at the end, `prepare.json` last (raytr.storage.commit_dir): a failed run
leaves no dataset that looks complete. Input and output may be local paths or fsspec URLs.

Output directory:
    sessions/day=N/*.parquet   one row per session (see raytr.data.workflow for columns)
    workflow/                  the fitted NVTabular workflow (load only directories you trust)
    schema.json, schema.pbtxt  the Merlin schema of sessions/ (cardinalities, max length, tags)
    prepare.json               the data config, the day origin and a summary
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from raytr import storage
from raytr.config import DataConfig
from raytr.data.events import (
    InputError,
    InputFiles,
    events_frame,
    normalize_events,
    read_events,
    sort_events,
    validate_input,
)
from raytr.data.layout import DAY, PREPARE_JSON, SESSIONS_DIR, WORKFLOW_DIR
from raytr.data.schema import SCHEMA_JSON, SCHEMA_PBTXT, save_schema
from raytr.features import FIRST_ITEM_ID
from raytr.ray_runtime import ensure_ray
from raytr.data.workflow import (
    SESSION_LENGTH,
    check_generated_names,
    day_numbers,
    fit_workflow,
    load_workflow,
    output_schema,
    save_workflow,
    transform_frame,
)

log = logging.getLogger(__name__)

BUCKET = "__bucket"
LOG_ORDER = "__log_order"  # a row's place in the input (files in path order, rows in file order)


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
    if num_buckets is not None and num_buckets < 1:
        raise InputError(f"partitions={num_buckets}: expected >= 1 session buckets")
    check_generated_names(config)
    output = storage.normalize(output)
    # An output inside the input directory is not input (a second run would read the first's
    # sessions as raw events); one that holds the input is refused when staged.
    source, inside_path = storage.filesystem(input_path)[1], storage.filesystem(output)[1]
    inside = inside_path != source and storage.is_within(inside_path, source)
    files = validate_input(config, input_path, exclude=output if inside else None)
    # An output holding more than a prepared dataset is not one (a model bundle carries its data's
    # prepare.json): replacing it would delete the rest.
    layout = (SESSIONS_DIR, WORKFLOW_DIR, SCHEMA_JSON, SCHEMA_PBTXT, PREPARE_JSON)
    with storage.staged_output(output, marker=PREPARE_JSON, inputs=files.paths, layout=layout) as staging:
        ensure_ray()
        buckets = num_buckets or max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
        log.info("prepare: %d %s file(s), %d rows, %d session buckets", len(files.paths), files.format,
                 files.num_rows, buckets)
        _bucket_events(config, files, storage.join(staging, "buckets"), buckets)
        sorted_files, origin_day = _sort_buckets(config, storage.join(staging, "buckets"),
                                                 storage.join(staging, "sorted"))
        if not sorted_files:
            raise InputError(f"input {str(input_path)!r} has no rows")

        log.info("prepare: fitting the workflow on %d sorted parts", len(sorted_files))
        with tempfile.TemporaryDirectory(prefix="raytr-workflow-") as local:
            # Fitted on this process's disk, then uploaded: the workflow is small, and NVTabular's
            # fit scratch (per-column category files) never reaches shared storage.
            workflow = fit_workflow(config, sorted_files, Path(local) / "fit")
            save_workflow(workflow, Path(local) / "artifacts" / WORKFLOW_DIR)
            schema = output_schema(workflow, config)
            items = int(schema[f"{config.item_col}-list"].properties["embedding_sizes"]["cardinality"])
            _check_items_kept(items, config, input_path)
            save_schema(schema, Path(local) / "artifacts")
            storage.put_dir(Path(local) / "artifacts", staging)

        log.info("prepare: transforming %d parts", len(sorted_files))
        stats = _transform_parts(config, sorted_files, storage.join(staging, WORKFLOW_DIR),
                                 storage.join(staging, SESSIONS_DIR), origin_day)
        sessions = sum(s["sessions"] for s in stats)
        if sessions == 0:
            raise InputError(
                f"no session in {str(input_path)!r} has >= data.min_session_length={config.min_session_length} events"
            )
        per_day: dict[int, int] = {}
        for s in stats:
            for day, n in s["per_day"].items():
                per_day[int(day)] = per_day.get(int(day), 0) + n
        summary = PrepareSummary(
            output=output,
            events=files.num_rows,
            sessions=sessions,
            items=items,
            mean_session_length=sum(s["length_sum"] for s in stats) / sessions,
            sessions_per_day=dict(sorted(per_day.items())),
            origin_day=origin_day,
            seconds=time.perf_counter() - start,
        )
        storage.remove(storage.join(staging, "buckets"))
        storage.remove(storage.join(staging, "sorted"))
        storage.write_text(storage.join(staging, PREPARE_JSON), json.dumps(
            {"data": asdict(config), "summary": asdict(summary), "input": str(input_path)}, indent=2))
    return summary


def _check_items_kept(cardinality: int, config: DataConfig, input_path) -> None:
    """Refuse a fit that left no real item (every one seen fewer than data.freq_threshold times is
    OOV): no model could be trained on it, and `raytr train` would only say the catalog is empty."""
    if cardinality <= FIRST_ITEM_ID:
        raise InputError(f"data.freq_threshold={config.freq_threshold}: no item of {str(input_path)!r} occurs that "
                         "often, so every item would be out of vocabulary; lower it")


# Rows one read task takes from a parquet file (its row groups are grouped up to this many).
ROWS_PER_READ = 1 << 18


def _read_units(files: InputFiles) -> list[dict]:
    """One read task's share: a file, its row groups ([] for all) and its first row's place in the
    log; a parquet file by groups of row groups, a CSV whole (its types come from all of its rows)."""
    units, first = [], 0
    for i, (path, rows) in enumerate(zip(files.paths, files.rows)):
        if rows and files.format == "parquet":
            groups, taken, start = [], 0, first
            for group, size in enumerate(files.row_groups[i]):
                groups.append(group)
                taken += size
                if taken >= ROWS_PER_READ or group == len(files.row_groups[i]) - 1:
                    units.append({"path": path, "row_groups": groups, "first": start})
                    groups, start, taken = [], start + taken, 0
        elif rows:
            units.append({"path": path, "row_groups": [], "first": first})
        first += rows
    return units


def _bucket_events(config: DataConfig, files: InputFiles, out: str, buckets: int) -> None:
    """Ray Data: read the raw files, normalise types, and write rows partitioned by session bucket.
    Each file is read with its own schema and cast to `files.column_types` (Ray's readers merge every
    file's whole schema first and fail on any difference, even in a column the config does not
    name); each row carries its place in the log, which orders equal timestamps. A task gets its
    unit as its row, not the list of all of them."""
    fmt, column_types = files.format, files.column_types

    def to_buckets(batch: dict[str, np.ndarray]) -> pa.Table:
        frames = []
        for path, row_groups, first in zip(batch["path"], batch["row_groups"], batch["first"]):
            groups = [int(g) for g in row_groups] or None
            table = read_events(str(path), fmt, column_types, config.raw_columns, groups)
            frame = normalize_events(events_frame(table, config), config)
            frame[LOG_ORDER] = np.arange(int(first), int(first) + len(frame), dtype=np.int64)
            frames.append(frame)
        frame = pd.concat(frames, ignore_index=True)
        hashed = pd.util.hash_pandas_object(frame[config.session_col], index=False).to_numpy()
        frame[BUCKET] = (hashed % np.uint64(buckets)).astype(np.int64)
        # One schema for every task's rows: a bucket's files must be read back as one table.
        return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)

    types = {**column_types, config.timestamp_col: pa.float64(), **dict.fromkeys(config.continuous, pa.float64())}
    schema = pa.schema([(name, types[name]) for name in config.raw_columns]
                       + [(LOG_ORDER, pa.int64()), (BUCKET, pa.int64())])
    units = _read_units(files)
    [path_out], fs_out = storage.pyarrow_location([out])
    # A read task's InputError (naming the file) reaches the caller as itself, not as Ray Data's
    # "UDF failed to process a data block"; the setting is put back for the caller's own pipelines.
    context = ray.data.DataContext.get_current()
    original, context.raise_original_map_exception = context.raise_original_map_exception, True
    try:
        (ray.data.from_items(units, override_num_blocks=len(units))
         .map_batches(to_buckets, batch_size=1, batch_format="numpy")
         .write_parquet(path_out, filesystem=fs_out, partition_cols=[BUCKET]))
    finally:
        context.raise_original_map_exception = original


@ray.remote
def _sort_bucket(config: DataConfig, bucket_dir: str, out_file: str) -> float | None:
    # The rows were normalised while bucketing (timestamps already in seconds): only sorted here.
    frame = events_frame(storage.read_table(bucket_dir), config)[[*config.raw_columns, LOG_ORDER]]
    if frame.empty:
        return None
    # In the log's order first: sort_events keeps it among equal timestamps.
    frame = frame.sort_values(LOG_ORDER).drop(columns=LOG_ORDER).reset_index(drop=True)
    _write_parquet(sort_events(frame, config), out_file)
    return float(frame[config.timestamp_col].min())


def _write_parquet(frame: pd.DataFrame, path: str) -> None:
    storage.makedirs(storage.parent(path))
    frame.to_parquet(path, index=False)  # pandas writes URLs through fsspec


def _sort_buckets(config: DataConfig, buckets_dir: str, out: str) -> tuple[list[str], int]:
    dirs = storage.list_dirs(buckets_dir, prefix=f"{BUCKET}=")
    files = [storage.join(out, f"part-{storage.name(d).split('=')[1]:0>5}.parquet") for d in dirs]
    mins = ray.get([_sort_bucket.remote(config, d, f) for d, f in zip(dirs, files)])
    kept = [f for f, m in zip(files, mins) if m is not None]
    starts = [m for m in mins if m is not None]
    origin_day = int(min(starts) // 86_400) if starts else 0
    return kept, origin_day


@ray.remote
def _transform_part(config: DataConfig, part: str, workflow_dir: str, out_dir: str, origin_day: int) -> dict:
    with storage.local_copy(workflow_dir) as local:  # the categories are read while transforming
        sessions = transform_frame(load_workflow(local), pd.read_parquet(part))
    days = day_numbers(sessions[f"{config.timestamp_col}-first"].to_numpy(), origin_day)
    per_day = {}
    for day in np.unique(days):
        rows = sessions[days == day].reset_index(drop=True)
        _write_parquet(rows, storage.join(out_dir, f"{DAY}={day}", storage.name(part)))
        per_day[int(day)] = len(rows)
    return {"sessions": len(sessions), "per_day": per_day, "length_sum": int(sessions[SESSION_LENGTH].sum())}


def _transform_parts(config: DataConfig, parts: list[str], workflow_dir: str, out: str, origin_day: int) -> list[dict]:
    refs = [_transform_part.remote(config, p, workflow_dir, out, origin_day) for p in parts]
    return ray.get(refs)
