"""Raw events: find the input files, check them before any work, and normalise a frame of events.

The same `normalize_events` + `sort_events` run in `raytr prepare` (per partition, on Ray) and in
the online path (one request), so both feed the workflow identical rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raytr import storage
from raytr.config import DataConfig

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Raw input a user must fix; the message names the file or column."""


@dataclass(frozen=True)
class InputFiles:
    paths: tuple[str, ...]
    format: str  # "parquet", "csv" or "tsv"
    num_rows: int
    rows: tuple[int, ...] = ()  # per file, in the order of `paths`: the log's order
    row_groups: tuple[tuple[int, ...], ...] = ()  # per parquet file: the rows of each row group
    # The type every configured column but the timestamp is read as, the same in every file (files
    # may differ: int32 and int64 ids, int and float categories, a pandas category column).
    column_types: dict[str, pa.DataType] = field(default_factory=dict)


def find_input_files(path: str | Path, read_format: str = "auto", exclude: str | None = None
                     ) -> tuple[list[str], str]:
    """The raw files at `path` (a file, or a directory searched recursively; a local path or a URL)
    and their format; files inside `exclude` (an output in the input directory) are not input."""
    try:
        found = storage.exists(path)
    except ValueError as error:
        raise InputError(f"input: {error}") from None
    if not found:
        raise InputError(f"input {str(path)!r} does not exist")
    suffixes = {"parquet": (".parquet",), "csv": (".csv",), "tsv": (".tsv", ".csv")}
    chosen = suffixes.get(read_format, (".parquet", ".csv", ".tsv"))

    def listed(suffixes: tuple[str, ...]) -> list[str]:
        found = storage.list_files(path, suffixes)
        if exclude is None:
            return found
        outside = storage.filesystem(exclude)[1]  # compared as the filesystem names them (s3a:// and s3://)
        return [f for f in found if not storage.is_within(storage.filesystem(f)[1], outside)]

    files = listed(chosen)
    if not files and exclude is not None and storage.list_files(path, chosen):
        raise InputError(f"input {str(path)!r} has no files outside the output {exclude!r}")
    if not files:
        named = " or ".join([", ".join(chosen[:-1]), chosen[-1]] if len(chosen) > 1 else chosen)
        raise InputError(f"input {str(path)!r} has no {named} files"
                         + (f" (data.read_format: {read_format})" if read_format != "auto" else ""))
    if read_format != "auto" and storage.is_dir(path):
        # The format is a choice of files: the others are left out, and said so.
        skipped = sorted(set(listed((".parquet", ".csv", ".tsv"))) - set(files))
        if skipped:
            log.warning("input %r: data.read_format: %s reads %d file(s) and leaves out %d of another format: %s%s",
                        str(path), read_format, len(files), len(skipped), ", ".join(skipped[:5]),
                        ", ..." if len(skipped) > 5 else "")
    fmt = read_format
    if fmt == "auto":
        kinds = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
        unknown = [f for f in files if "." + f.rsplit(".", 1)[-1].lower() not in kinds]
        if unknown:  # only a single file named as the input can get here
            raise InputError(f"input {unknown[0]!r} is not named .parquet, .csv or .tsv: set data.read_format")
        found_kinds = {kinds["." + f.rsplit(".", 1)[-1].lower()] for f in files}
        if len(found_kinds) > 1:
            raise InputError(f"input {str(path)!r} mixes file formats {sorted(found_kinds)}: give it files of one "
                             "format, or set data.read_format to read only that format's files")
        fmt = found_kinds.pop()
        if fmt == "csv" and _sniff_tab(files[0]):
            fmt = "tsv"
    return files, fmt


def _sniff_tab(path: str) -> bool:
    fs, p = storage.filesystem(path)
    with fs.open(p, "r") as f:
        header = f.readline()
    return "\t" in header and "," not in header


def read_csv(path: str, fmt: str, column_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """A whole CSV/TSV file: each column's type is inferred from all of its rows (a streaming read
    infers it from the first block, and refuses a float that comes later in an int column). Empty
    and "NA"-like fields are nulls in string columns too, so an empty id is refused as null."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as stream:
        return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                              convert_options=pacsv.ConvertOptions(column_types=column_types or {},
                                                                   strings_can_be_null=True))


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
    table = read_csv(path, fmt)
    return (table.select(columns) if columns else table).to_pandas()


def read_events(path: str, fmt: str, column_types: dict[str, pa.DataType], columns: list[str],
                row_groups: list[int] | None = None) -> pa.Table:
    """The `columns` of one raw file (of a parquet file: only `row_groups`, or all), each of its type
    in `column_types` (`InputFiles.column_types`); the timestamp as the file has it
    (`normalize_events` reads any kind)."""
    if fmt == "parquet":
        parquet = storage.parquet_file(path)
        table = (parquet.read_row_groups(row_groups, columns=columns) if row_groups is not None
                 else parquet.read(columns=columns))
    else:
        table = read_csv(path, fmt, column_types).select(columns)
    table = decode_dictionaries(table)
    for name, kind in column_types.items():
        if name in table.column_names and table.schema.field(name).type != kind:
            try:
                table = table.set_column(table.schema.get_field_index(name), name, pc.cast(table.column(name), kind))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise InputError(f"{path}: column {name!r} cannot be read as {kind}, its type in the other input "
                                 f"files: {error}") from None
    return table


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


# A CSV id column is read as text first: inferred as numbers, "007" and "7" would be one item.
# It is read as integers only where every value is an integer's one spelling.
_CANONICAL_INT = r"^(0|-?[1-9][0-9]*)$"
_FRACTION = r"^[+-]?([0-9]+[.][0-9]*|[.][0-9]+|[0-9]+)([eE][+-]?[0-9]+)?$"


def _csv_id_kind(file: str, name: str, role: str, column: pa.ChunkedArray) -> str:
    """"int" where every value of a text id column is an integer written plainly, "string" where
    some is not (leading zeros, letters); a number with a fraction or exponent is refused."""
    values = pc.drop_null(column)
    if pc.all(pc.match_substring_regex(values, _CANONICAL_INT)).as_py() is not False:
        try:
            pc.cast(values, pa.int64())
            return "int"
        except pa.ArrowInvalid:  # beyond int64
            return "string"
    if pc.all(pc.match_substring_regex(values, _FRACTION)).as_py() and not pc.all(
            pc.match_substring_regex(values, r"^[+-]?[0-9]+$")).as_py():
        example = pc.filter(values, pc.invert(pc.match_substring_regex(values, r"^[+-]?[0-9]+$")))[0].as_py()
        raise InputError(f"{file}: column {name!r} ({role}) holds numbers with a fraction or exponent (e.g. "
                         f"{example!r}), which cannot be used as a {role}: write whole numbers or strings")
    return "string"


def _unified_type(name: str, kinds: list[tuple[str, pa.DataType]]) -> pa.DataType:
    """The one type the files' types of column `name` promote to (int32 and int64: int64; int and
    float: float), or an InputError naming two files whose types do not meet."""
    unified = kinds[0][1]
    for file, kind in kinds[1:]:
        try:
            unified = pa.unify_schemas([pa.schema([(name, unified)]), pa.schema([(name, kind)])],
                                       promote_options="permissive").field(name).type
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            raise InputError(f"column {name!r} is {kinds[0][1]} in {kinds[0][0]} but {kind} in {file}: give it one "
                             "type in every input file") from None
    return unified


def validate_input(config: DataConfig, path: str | Path, exclude: str | None = None) -> InputFiles:
    """Check raw input before any work: files exist, columns exist with usable types, rows exist,
    and no id or timestamp is null; decide the type each column is read as. Files inside `exclude`
    (the output) are not input. Raises `InputError` naming the problem."""
    files, fmt = find_input_files(path, config.read_format, exclude)
    expected = {
        config.session_col: ("session id", _is_id),
        config.item_col: ("item id", _is_id),
        config.timestamp_col: ("timestamp", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)
                               or pa.types.is_timestamp(t)),
    }
    # A feature or user id may be null in every row of a file (type null): it is read as the other
    # files' type.
    for name in config.categorical:
        expected[name] = ("categorical feature", lambda t: _is_id(t) or pa.types.is_floating(t) or pa.types.is_null(t))
    for name in config.continuous:
        expected[name] = ("continuous feature", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)
                          or pa.types.is_null(t))
    if config.user_col:
        expected[config.user_col] = ("user id", lambda t: _is_id(t) or pa.types.is_null(t))

    # Null ids would drop or split sessions, and a null timestamp would move every day partition.
    required = {config.session_col: "session id", config.item_col: "item id", config.timestamp_col: "timestamp"}
    # An id that is a number in one file and a string in another: 5 and "5" would be two sessions
    # (or items), and the files' rows cannot be merged.
    ids = [config.session_col, config.item_col, *config.categorical, *([config.user_col] if config.user_col else [])]
    text_ids = [name for name in (config.session_col, config.item_col, config.user_col) if name]
    first_kind: dict[str, tuple[str, str]] = {}  # id column -> (kind, the file that set it)
    kinds: dict[str, list[tuple[str, pa.DataType]]] = {name: [] for name in expected if name != config.timestamp_col}
    csv_ints = dict.fromkeys(text_ids, True)
    largest: dict[str, list[tuple[str, int | None]]] = {name: [] for name in kinds}  # of unsigned columns
    rows: list[int] = []
    groups: list[tuple[int, ...]] = []
    total_rows = 0
    for file in files:
        # A CSV column's type is inferred from the rows read, so a CSV is read whole once and its
        # checks use that table's schema (a prefix's schema could call a column int that is float).
        if fmt == "parquet":
            table, parquet = None, _readable(file, fmt, lambda: storage.parquet_file(file))
            schema, meta = parquet.schema_arrow, parquet.metadata
            groups.append(tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups)))
        else:
            table = _readable(file, fmt, lambda: read_csv(file, fmt, dict.fromkeys(text_ids, pa.string())))
            schema = table.schema
        missing = [c for c in expected if c not in schema.names]
        if missing:
            raise InputError(
                f"{file}: column(s) {missing} named in the config are missing; the file has {schema.names}. "
                "Fix the column names in the config's data section."
            )
        num_rows = meta.num_rows if table is None else table.num_rows
        rows.append(num_rows)
        if num_rows == 0:
            continue  # a header-only CSV or an empty parquet file: no types to check, and no events
        total_rows += num_rows
        types = {name: value_type(schema.field(name).type) for name in expected}
        for name, (role, ok) in expected.items():
            if not ok(types[name]):
                raise InputError(f"{file}: column {name!r} ({role}) has type {types[name]}, which cannot be used as "
                                 f"a {role}")
        for name in ids:
            if table is not None and name in text_ids:
                csv_ints[name] &= _csv_id_kind(file, name, expected[name][0], table.column(name)) == "int"
                continue  # a CSV's ids are text: read as numbers only if every file's are
            if pa.types.is_null(types[name]):
                continue
            kind = "string" if _is_string(types[name]) else "number"
            seen, where = first_kind.setdefault(name, (kind, file))
            if kind != seen:
                raise InputError(
                    f"column {name!r} holds {seen}s in {where} but {kind}s in {file}: give it one type in "
                    "every input file"
                )
        for name in kinds:
            if not pa.types.is_null(types[name]):
                kinds[name].append((file, types[name]))
            if pa.types.is_unsigned_integer(types[name]):  # int64 beside it cannot hold its largest values
                largest[name].append((file, _parquet_max(file, meta, name) if table is None
                                      else pc.max(table.column(name)).as_py()))
        # Values checked beyond nulls: a float timestamp's NaN/inf, and continuous features' inf.
        valued = [name for name in (config.timestamp_col, *config.continuous)
                  if pa.types.is_floating(types[name]) or name in config.log_transform]
        if fmt == "parquet":
            nulls = {name: _parquet_null_count(file, meta, name) for name in required}
            values = storage.read_table(file, valued) if valued else None
            latest = _timestamp_max(file, config, lambda: _parquet_max(file, meta, config.timestamp_col))
        else:
            nulls = {name: table.column(name).null_count for name in required}
            values = table.select(valued)
            latest = _timestamp_max(file, config, lambda: pc.max(table.column(config.timestamp_col)).as_py())
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
    column_types = {}
    for name, found in kinds.items():
        if fmt != "parquet" and name in text_ids:
            column_types[name] = pa.int64() if csv_ints[name] else pa.string()
        elif found:
            column_types[name] = _unified_type(name, found)
            signed = pa.types.is_signed_integer(column_types[name])
            for file, value in largest[name]:
                if signed and value is not None and value > np.iinfo(np.int64).max:
                    raise InputError(f"{file}: column {name!r} holds {value}, beyond int64, while other input files "
                                     "store it as signed integers: give it one type in every input file")
        else:
            raise InputError(f"column {name!r} ({expected[name][0]}) has no value in any input file: fill it or "
                             "leave it out of the config")
    return InputFiles(paths=tuple(files), format=fmt, num_rows=total_rows, rows=tuple(rows),
                      row_groups=tuple(groups), column_types=column_types)


def _timestamp_max(file: str, config: DataConfig, largest: Callable[[], float | datetime | None]
                   ) -> float | datetime | None:
    """`largest()`, a timestamp column's largest value; one beyond Python's datetimes (after the year
    9999) is refused here, as the check that follows refuses one after 5000."""
    try:
        return largest()
    except (OverflowError, ValueError):
        raise InputError(f"{file}: column {config.timestamp_col!r} holds a date after the year 9999; drop those "
                         "events before preparing") from None


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


def _check_timestamp_unit(file: str, config: DataConfig, largest: float | datetime) -> None:
    """Refuse timestamps whose largest value (a number in the configured unit, or a datetime) lies
    after the year 5000."""
    if isinstance(largest, datetime):
        moment = largest if largest.tzinfo is not None else largest.replace(tzinfo=timezone.utc)
        if moment.timestamp() > MAX_UNIX_SECONDS:
            raise InputError(f"{file}: column {config.timestamp_col!r} reaches {largest}, after the year 5000; drop "
                             "those events (a placeholder date?) before preparing")
        return
    seconds = largest / 1000.0 if config.timestamp_unit == "ms" else largest
    if seconds > MAX_UNIX_SECONDS:
        expected, finer = unit_names(config.timestamp_unit)
        advice = ": set data.timestamp_unit: ms" if config.timestamp_unit == "s" else ""
        raise InputError(f"{file}: column {config.timestamp_col!r} reaches {largest:.6g}, after the year 5000 as "
                         f"unix {expected}; the values look like {finer}{advice} (or convert them to unix seconds)")


def unit_names(unit: str) -> tuple[str, str]:
    """(the name of timestamp unit `unit`, what values beyond MAX_UNIX_SECONDS in it likely are)."""
    return ("seconds", "milliseconds") if unit == "s" else ("milliseconds", "microseconds or finer")


def _parquet_max(file: str, meta: pq.FileMetaData, column: str) -> float | datetime | None:
    """A numeric or timestamp column's largest value, from the row groups' statistics where each has them (the
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


# pandas' integer type with nulls for each arrow integer type.
_NULLABLE_INTS = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                  pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                  pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}


def events_frame(table: pa.Table, config: DataConfig) -> pd.DataFrame:
    """A table of raw events as pandas with numpy dtypes (NVTabular's ops take no arrow column; the
    pandas metadata Ray Data writes is ignored) and datetimes in their own unit, except integer
    categoricals and user ids: pandas' nullable integers, with or without nulls (one dtype in every
    part), since numpy makes a column with nulls float64, which merges ids above 2^53."""
    ids = [name for name in [*config.categorical, *([config.user_col] if config.user_col else [])]
           if pa.types.is_integer(table.schema.field(name).type)]
    frame = table.drop_columns(ids).to_pandas(ignore_metadata=True, coerce_temporal_nanoseconds=False)
    for name in ids:
        frame[name] = table.column(name).to_pandas(types_mapper=_NULLABLE_INTS.get).array
    return frame[table.column_names]


def normalize_events(frame: pd.DataFrame, config: DataConfig) -> pd.DataFrame:
    """Keep the configured columns and give them the types the workflow expects: timestamps as
    float64 unix seconds, continuous features as float64."""
    frame = frame[config.raw_columns].copy()
    ts = frame[config.timestamp_col]
    if pd.api.types.is_datetime64_any_dtype(ts):
        if getattr(ts.dt, "tz", None) is not None:
            ts = ts.dt.tz_convert(None)  # UTC, in the same unit
        # In the column's own unit: a date after 2262 (or before 1677) has no nanoseconds in int64.
        unit = np.datetime_data(ts.dtype)[0]
        seconds = ts.astype(np.int64) / {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[unit]
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
