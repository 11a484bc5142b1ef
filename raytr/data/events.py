"""Raw events: find the input files, check them before any work, and normalise a frame of events.

The same `normalize_events` + `sort_events` run in `raytr prepare` (per partition, on Ray) and in
the online path (one request), so both feed the workflow identical rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raytr import storage
from raytr.config import DataConfig


class InputError(ValueError):
    """Raw input a user must fix; the message names the file or column."""


@dataclass(frozen=True)
class InputFiles:
    paths: tuple[str, ...]
    format: str  # "parquet", "csv" or "tsv"
    num_rows: int


def find_input_files(path: str | Path, read_format: str = "auto") -> tuple[list[str], str]:
    """The raw files at `path` (a file, or a directory searched recursively; a local path or a URL)
    and their format."""
    try:
        found = storage.exists(path)
    except ValueError as error:
        raise InputError(f"input: {error}") from None
    if not found:
        raise InputError(f"input {str(path)!r} does not exist")
    suffixes = {"parquet": (".parquet",), "csv": (".csv",), "tsv": (".tsv", ".csv")}
    files = storage.list_files(path, suffixes.get(read_format, (".parquet", ".csv", ".tsv")))
    if not files:
        raise InputError(f"input {str(path)!r} has no .parquet, .csv or .tsv files")
    fmt = read_format
    if fmt == "auto":
        kinds = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
        unknown = [f for f in files if "." + f.rsplit(".", 1)[-1].lower() not in kinds]
        if unknown:  # only a single file named as the input can get here
            raise InputError(f"input {unknown[0]!r} is not named .parquet, .csv or .tsv: set data.read_format")
        found_kinds = {kinds["." + f.rsplit(".", 1)[-1].lower()] for f in files}
        if len(found_kinds) > 1:
            raise InputError(f"input {str(path)!r} mixes file formats {sorted(found_kinds)}: set data.read_format")
        fmt = found_kinds.pop()
        if fmt == "csv" and _sniff_tab(files[0]):
            fmt = "tsv"
    return files, fmt


def _sniff_tab(path: str) -> bool:
    fs, p = storage.filesystem(path)
    with fs.open(p, "r") as f:
        header = f.readline()
    return "\t" in header and "," not in header


def _open_csv(path: str, fmt: str) -> pacsv.CSVStreamingReader:
    fs, p = storage.filesystem(path)
    return pacsv.open_csv(fs.open(p, "rb"),
                          parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","))


def _readable(path: str, fmt: str, read):
    """`read()`, with a file that cannot be read as `fmt` reported as an InputError naming it."""
    try:
        return read()
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read as {fmt}: {error}") from None


def read_file(path: str, fmt: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one raw file into pandas (for tests and tools; Ray Data reads in prepare)."""
    if fmt == "parquet":
        return storage.read_table(path, columns).to_pandas()
    table = _open_csv(path, fmt).read_all()
    return (table.select(columns) if columns else table).to_pandas()


def value_type(t: pa.DataType) -> pa.DataType:
    """The type of a column's values: a dictionary-encoded column's (pandas' `category` dtype is
    written so) is its dictionary's; prepare decodes such columns (`decode_dictionaries`)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def decode_dictionaries(table: pa.Table) -> pa.Table:
    """`table` with every dictionary-encoded column replaced by its plain values."""
    for i, column in enumerate(table.schema):
        if pa.types.is_dictionary(column.type):
            table = table.set_column(i, column.name, pc.cast(table.column(i), column.type.value_type))
    return table


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or _is_string(t)


def validate_input(config: DataConfig, path: str | Path) -> InputFiles:
    """Check raw input before any work: files exist, columns exist with usable types, rows exist,
    and no item id is null. Raises `InputError` naming the problem."""
    files, fmt = find_input_files(path, config.read_format)
    expected = {
        config.session_col: ("session id", _is_id),
        config.item_col: ("item id", _is_id),
        config.timestamp_col: ("timestamp", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)
                               or pa.types.is_timestamp(t)),
    }
    for name in config.categorical:
        expected[name] = ("categorical feature", lambda t: _is_id(t) or pa.types.is_floating(t))
    for name in config.continuous:
        expected[name] = ("continuous feature", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t))
    if config.user_col:
        expected[config.user_col] = ("user id", _is_id)

    # Null ids would drop or split sessions, and a null timestamp would move every day partition.
    required = {config.session_col: "session id", config.item_col: "item id", config.timestamp_col: "timestamp"}
    # An id that is a number in one file and a string in another: 5 and "5" would be two sessions
    # (or items), and the files' rows cannot be merged.
    ids = [config.session_col, config.item_col, *config.categorical, *([config.user_col] if config.user_col else [])]
    first_kind: dict[str, tuple[str, str]] = {}  # id column -> (kind, the file that set it)
    total_rows = 0
    for file in files:
        # A CSV column's type is inferred from the rows read, so a CSV is read whole once and its
        # checks use that table's schema (a prefix's schema could call a column int that is float).
        if fmt == "parquet":
            table, schema = None, _readable(file, fmt, lambda: storage.parquet_file(file).schema_arrow)
        else:
            table = _readable(file, fmt, lambda: _open_csv(file, fmt).read_all())
            schema = table.schema
        missing = [c for c in expected if c not in schema.names]
        if missing:
            raise InputError(
                f"{file}: column(s) {missing} named in the config are missing; the file has {schema.names}. "
                "Fix the column names in the config's data section."
            )
        if table is not None and table.num_rows == 0:
            continue  # a header-only CSV: its columns have no type to check, and it adds no events
        types = {name: value_type(schema.field(name).type) for name in expected}
        for name, (role, ok) in expected.items():
            if not ok(types[name]):
                raise InputError(f"{file}: column {name!r} ({role}) has type {types[name]}, which cannot be used as "
                                 f"a {role}")
        for name in ids:
            kind = "string" if _is_string(types[name]) else "number"
            seen, where = first_kind.setdefault(name, (kind, file))
            if kind != seen:
                raise InputError(
                    f"column {name!r} holds {seen}s in {where} but {kind}s in {file}: give it one type in "
                    "every input file (a CSV column's type comes from its values)"
                )
        # Values checked beyond nulls: a float timestamp's NaN/inf, and continuous features' inf.
        valued = [name for name in (config.timestamp_col, *config.continuous)
                  if pa.types.is_floating(types[name]) or name in config.log_transform]
        numeric_time = not pa.types.is_timestamp(types[config.timestamp_col])
        if fmt == "parquet":
            meta = storage.parquet_file(file).metadata
            total_rows += meta.num_rows
            nulls = {name: _parquet_null_count(file, meta, name) for name in required}
            values = storage.read_table(file, valued) if valued else None
            latest = _parquet_max(file, meta, config.timestamp_col) if numeric_time else None
        else:
            total_rows += table.num_rows
            nulls = {name: table.column(name).null_count for name in required}
            values = table.select(valued)
            latest = pc.max(table.column(config.timestamp_col)).as_py() if numeric_time else None
        for name, count in nulls.items():
            if count:
                raise InputError(
                    f"{file}: column {name!r} ({required[name]}) has {count} null value(s); "
                    "drop or fill those events before preparing"
                )
        if values is not None:
            _check_values(file, config, values)
        if latest is not None:
            _check_timestamp_unit(file, config, latest)
    if total_rows == 0:
        raise InputError(f"input {str(path)!r} has no rows")
    return InputFiles(paths=tuple(files), format=fmt, num_rows=total_rows)


def _check_values(file: str, config: DataConfig, values: pa.Table) -> None:
    """Values that would poison every row of prepared data: a NaN or infinite timestamp moves its
    session to a bogus day; one infinite continuous value (or one <= -1 under log_transform, where
    log(1 + x) is -inf or NaN) makes Normalize's mean infinite, so the feature turns to inf/NaN in
    every session. The workflow computes continuous features in float32, so they are checked as
    float32: 1e300 is infinite there, and -0.9999999999 is -1. NaN continuous values are fine:
    FillMissing replaces them."""
    for name in values.column_names:
        if name == config.timestamp_col:
            column = values.column(name).cast(pa.float64())
            bad, what, fix = pc.sum(pc.invert(pc.is_finite(column))), "NaN or infinite", "drop those events"
        else:
            column = pc.cast(values.column(name), pa.float32(), safe=False)  # out of range -> inf
            bad, what, fix = (pc.sum(pc.is_inf(column)), "infinite or beyond float32 (+-3.4e38)",
                              "drop or clip them")
        count = bad.as_py() or 0
        if count:
            raise InputError(f"{file}: column {name!r} has {count} {what} value(s); {fix} before preparing")
        if name in config.log_transform:
            low = pc.sum(pc.less_equal(column, -1.0)).as_py() or 0
            if low:
                raise InputError(
                    f"{file}: column {name!r} has {low} value(s) <= -1 (in float32), where data.log_transform's "
                    "log(1 + x) is undefined; shift the feature or leave it out of log_transform"
                )


# Unix seconds beyond this are after the year 5000: such timestamps are milliseconds (or finer) read
# as seconds, which would scatter one day's sessions over centuries of day partitions.
MAX_UNIX_SECONDS = 1e11


def _check_timestamp_unit(file: str, config: DataConfig, largest: float) -> None:
    """Refuse numeric timestamps whose largest value, in the configured unit, lies after the year 5000."""
    seconds = largest / 1000.0 if config.timestamp_unit == "ms" else largest
    if seconds > MAX_UNIX_SECONDS:
        finer = "milliseconds: set data.timestamp_unit: ms" if config.timestamp_unit == "s" else "microseconds or finer"
        raise InputError(f"{file}: column {config.timestamp_col!r} reaches {largest:.6g}, after the year 5000 as "
                         f"unix {'seconds' if config.timestamp_unit == 's' else 'milliseconds'}; the values look "
                         f"like {finer} (or convert them to unix seconds)")


def _parquet_max(file: str, meta: pq.FileMetaData, column: str) -> float | None:
    """A numeric column's largest value, from the row groups' statistics where each has them (the
    column is read otherwise)."""
    index = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == column)
    maxima = []
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(index).statistics
        if stats is None or not stats.has_min_max:
            return pc.max(storage.read_table(file, [column]).column(0)).as_py()
        maxima.append(stats.max)
    return max(maxima) if maxima else None


def _parquet_null_count(file: str, meta: pq.FileMetaData, column: str) -> int:
    # The statistics are per leaf column; a nested column before this one has several leaves.
    index = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == column)
    nulls = 0
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(index).statistics
        if stats is None or not stats.has_null_count:
            return int(storage.read_table(file, [column]).column(0).null_count)
        nulls += stats.null_count
    return nulls


def normalize_events(frame: pd.DataFrame, config: DataConfig) -> pd.DataFrame:
    """Keep the configured columns and give them the types the workflow expects: timestamps as
    float64 unix seconds, continuous features as float64."""
    frame = frame[config.raw_columns].copy()
    ts = frame[config.timestamp_col]
    if pd.api.types.is_datetime64_any_dtype(ts):
        if getattr(ts.dt, "tz", None) is not None:
            ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
        seconds = ts.astype("datetime64[ns]").astype(np.int64) / 1e9
    else:
        seconds = ts.astype(np.float64)
        if config.timestamp_unit == "ms":
            seconds = seconds / 1000.0
    frame[config.timestamp_col] = seconds.astype(np.float64)
    for name in config.continuous:
        frame[name] = frame[name].astype(np.float64)
    return frame


EVENT_ORDER = "event_order"


def sort_events(frame: pd.DataFrame, config: DataConfig) -> pd.DataFrame:
    """Rows sorted by (session, timestamp), stable so equal timestamps keep their log order, plus
    an `event_order` column (the row's position) that the workflow's Groupby sorts by after the
    timestamp: its own sort is not stable, and ties must come out in log order offline as online."""
    out = frame.sort_values([config.session_col, config.timestamp_col], kind="stable").reset_index(drop=True)
    out[EVENT_ORDER] = np.arange(len(out), dtype=np.int64)
    return out
