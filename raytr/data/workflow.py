"""The NVTabular Workflow built from a `DataConfig`: raw events in, one row per session out.

Input rows must come from `sort_events`: sorted by (session, timestamp) because the
time-since-previous feature is a lag within each session, with an `event_order` column that breaks
timestamp ties in log order. Per event it builds
    item id        -> Categorify (freq_threshold; 0 pad, 1 null, 2 OOV, items from 3 by frequency)
    categoricals   -> Categorify
    continuous     -> FillMissing(0) -> [LogOp] -> Normalize
    time features  -> hour and weekday (Categorify), seconds since the previous event
                      (LogOp -> Normalize)
then groups by session (sorted by timestamp) into `<name>-list` columns, keeps the last
`max_sequence_length` events, and drops sessions shorter than `min_session_length`. Output columns:
    <session_col>, <item>-list, <cat>-list..., <cont>-list..., session_length,
    <timestamp>-first, <timestamp>-last [, <user>-first]
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import nvtabular as nvt
import pandas as pd
from merlin.schema import ColumnSchema, Schema, Tags
from nvtabular import ops

from raytr import storage
from raytr.config import TIME_FEATURES, ConfigError, DataConfig
from raytr.data.columnar_groupby import ColumnarGroupby
from raytr.data.events import EVENT_ORDER

log = logging.getLogger(__name__)

SESSION_LENGTH = "session_length"
HOUR, WEEKDAY, TIME_SINCE_PREV = TIME_FEATURES  # what data.time_features may ask for


def check_generated_names(config: DataConfig) -> None:
    """Raw columns must not take the names of columns the workflow makes (a raw `hour` next to the
    generated one would fail deep in NVTabular's fit). Raises ConfigError naming the field."""
    generated = {EVENT_ORDER: "always", SESSION_LENGTH: "always"}
    generated.update(dict.fromkeys(config.time_features, "with data.time_features"))
    roles = {"session_col": [config.session_col], "item_col": [config.item_col],
             "timestamp_col": [config.timestamp_col], "user_col": [config.user_col] if config.user_col else [],
             "categorical": list(config.categorical), "continuous": list(config.continuous)}
    for role, names in roles.items():
        for name in names:
            if name in generated:
                raise ConfigError(
                    f"data.{role} names {name!r}, a column raytr generates ({generated[name]}): rename the raw column"
                    + (f" or leave {name!r} out of data.time_features" if generated[name] != "always" else "")
                )


def list_name(column: str) -> str:
    return f"{column}-list"


def sequence_features(config: DataConfig) -> tuple[list[str], list[str]]:
    """Per-event (categorical, continuous) features besides the item id, in output order."""
    categorical = list(config.categorical) + [n for n in (HOUR, WEEKDAY) if n in config.time_features]
    continuous = list(config.continuous) + [n for n in (TIME_SINCE_PREV,) if n in config.time_features]
    return categorical, continuous


def _hour(col, _df=None):
    return ((col // 3600) % 24).astype("int64")


def _weekday(col, _df=None):
    return ((col // 86_400 + 3) % 7).astype("int64")  # 1970-01-01 was a Thursday; Monday = 0


def build_workflow(config: DataConfig, categories_dir: str | Path = ".") -> nvt.Workflow:
    """The unfitted workflow; Categorify writes its vocabularies under `categories_dir` when fitted."""
    session, item, ts = config.session_col, config.item_col, config.timestamp_col
    categorical, continuous = sequence_features(config)

    def categorify(**kwargs):
        return ops.Categorify(out_path=str(categories_dir), **kwargs)

    item_ids = [item] >> categorify(freq_threshold=config.freq_threshold) >> ops.TagAsItemID()
    features = [session, ts, EVENT_ORDER] + item_ids
    if config.categorical:
        features += list(config.categorical) >> categorify()
    if config.user_col:
        features += [config.user_col] >> categorify() >> ops.TagAsUserID()
    for name in config.continuous:
        node = [name] >> ops.FillMissing(fill_val=0.0)
        if name in config.log_transform:
            node = node >> ops.LogOp()
        features += node >> ops.Normalize()
    if HOUR in config.time_features:
        features += [ts] >> ops.LambdaOp(_hour) >> ops.Rename(name=HOUR) >> categorify()
    if WEEKDAY in config.time_features:
        features += [ts] >> ops.LambdaOp(_weekday) >> ops.Rename(name=WEEKDAY) >> categorify()
    if TIME_SINCE_PREV in config.time_features:
        lag = (
            [ts]
            >> ops.DifferenceLag(partition_cols=[session], shift=1)
            >> ops.Rename(name=TIME_SINCE_PREV)
            >> ops.FillMissing(fill_val=0.0)
            >> ops.LogOp()
            >> ops.Normalize()
        )
        features += lag

    aggs = {item: ["list", "count"], ts: ["first", "last"]}
    aggs.update({name: ["list"] for name in categorical + continuous})
    if config.user_col:
        aggs[config.user_col] = ["first"]
    # ColumnarGroupby: NVTabular's Groupby, with list columns built from sorted offsets on the CPU.
    grouped = features >> ColumnarGroupby(groupby_cols=[session], sort_cols=[ts, EVENT_ORDER], aggs=aggs, name_sep="-")

    lists = [list_name(n) for n in [item, *categorical, *continuous]]
    sliced = grouped[lists] >> ops.ListSlice(-config.max_sequence_length)
    length = grouped[f"{item}-count"] >> ops.Rename(name=SESSION_LENGTH)
    singles = [session, f"{ts}-first", f"{ts}-last"] + ([f"{config.user_col}-first"] if config.user_col else [])
    min_len = config.min_session_length
    output = (grouped[singles] + sliced + length) >> ops.Filter(f=lambda df: df[SESSION_LENGTH] >= min_len)
    return nvt.Workflow(output)


def fit_workflow(config: DataConfig, sorted_files: list[str], work_dir: str | Path) -> nvt.Workflow:
    """Fit on parquet files whose rows are sorted by (session, timestamp), sessions whole per file."""
    workflow = build_workflow(config, categories_dir=work_dir)
    # Read by pandas, one partition per file: merlin's parquet engine casts nullable integers
    # (`events_frame`'s categoricals) to int64 and fails on their nulls.
    with _numpy_strings():
        meta = storage.parquet_file(sorted_files[0]).schema_arrow.empty_table().to_pandas()
        workflow.fit(nvt.Dataset(dd.from_map(pd.read_parquet, list(sorted_files), meta=meta)))
    return workflow


def output_schema(workflow: nvt.Workflow, config: DataConfig) -> Schema:
    """The workflow's output schema with the facts downstream reads: list tags, max lengths, and no
    item tags leaking into the session length (Groupby's count inherits its column's tags)."""
    columns = []
    for col in workflow.output_schema:
        if "cat_path" in col.properties:  # Categorify's fit scratch directory, deleted after prepare
            col = dataclasses.replace(col, properties={k: v for k, v in col.properties.items() if k != "cat_path"})
        if col.name == SESSION_LENGTH:
            col = ColumnSchema(col.name, dtype=col.dtype)
        elif col.name.endswith("-list"):
            col = col.with_tags([Tags.LIST, Tags.SEQUENCE]).with_shape((None, (0, config.max_sequence_length)))
        columns.append(col)
    return Schema(columns)


def save_workflow(workflow: nvt.Workflow, directory: str | Path) -> None:
    workflow.save(str(directory))


def load_workflow(directory: str | Path) -> nvt.Workflow:
    """Load a saved workflow. It unpickles code: only load directories you wrote yourself."""
    directory = Path(directory)
    if not (directory / "workflow.pkl").is_file():
        raise FileNotFoundError(f"no fitted workflow in {directory} (expected workflow.pkl from `raytr prepare`)")
    try:
        return nvt.Workflow.load(str(directory))
    except (pickle.UnpicklingError, EOFError, ImportError, AttributeError, TypeError, IndexError, KeyError) as error:
        # A truncated or foreign pickle: the file is at fault, so a ValueError naming it, not a crash.
        raise ValueError(f"{directory / 'workflow.pkl'} is not a workflow this code can load "
                         f"({type(error).__name__}: {error}); run `raytr prepare` again") from None


def transform_frame(workflow: nvt.Workflow, events) -> "object":
    """Apply a fitted workflow to an in-memory frame of sorted events; returns a frame of sessions."""
    with _numpy_strings():
        out = workflow.transform(nvt.Dataset(events, npartitions=1)).to_ddf().compute()
    return out.reset_index(drop=True)


def _numpy_strings():
    """dask >= 2023.7 turns object string columns into arrow-backed ones, and NVTabular 23.08's ops
    break on those (DifferenceLag's session-boundary mask becomes an arrow bool that a float time
    difference cannot multiply): string session ids failed. Strings stay numpy objects here."""
    return dask.config.set({"dataframe.convert-string": False})


def day_numbers(first_timestamps: np.ndarray, origin_day: int) -> np.ndarray:
    """Day partition of each session: 1 + UTC days since the dataset's first day."""
    return (np.floor_divide(first_timestamps, 86_400).astype(np.int64) - origin_day + 1)
