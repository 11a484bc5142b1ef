"""The fitted workflow compiled for one request at a time: raw events -> `SessionBatch`, in numpy.

The NVTabular executor costs tens of milliseconds per call on 2 cores, whatever the request size
(shared/notes/stack.md: one session p50 ≈ 52 ms). A request is a handful of events, so at load time
this module walks the fitted workflow's graph from its Groupby back to the raw columns, reads the
fitted statistics once, and turns each column's chain of ops into numpy steps:

    Categorify     dict raw value -> id (the index of `categories/unique.<col>.parquet` is the id);
                   null -> 1, unseen or rarer than freq_threshold -> 2 (OOV)
    FillMissing    NaN -> the fill value
    LogOp          log(float32(x) + 1)
    Normalize      (x - mean) / std with NVTabular's own scalars and dtypes
    DifferenceLag  x - previous x within the session, float32, NaN for a session's first event
    LambdaOp       the workflow's own function, applied to a pandas Series
    Rename, Tag*   nothing
then groups events by session, sorts them by timestamp and keeps the last events as training does:
the workflow's `ListSlice(-T)` (data.max_sequence_length), then the loaders' cut to the model's
max_sequence_length, right-padded to the model's T. Any other op is an error at load time naming the
op and column, never a silent divergence.

Semantics: `transform(events)` gives what `normalize_events` + `sort_events` + the workflow give
(tests/test_online.py checks it on random sessions), with these differences, all on purpose:
- no `min_session_length` filter: a session of one event still gets a row (a visitor's first click
  must get recommendations; the filter exists to make training targets);
- sessions come out in the order they first appear in the input, not sorted by session id;
- (not a difference) events with equal timestamps keep their input order, as offline: the
  workflow's Groupby sorts by (timestamp, event_order) where `sort_events` numbers the events;
- a null in a categorical column whose fitted vocabulary is integer maps to the null id 1 (the
  Categorify rule); the NVTabular executor raises on it (it casts the column to int64 first);
- a value that cannot be cast to a numeric vocabulary's type (e.g. "abc" for integer item ids)
  maps to OOV where NVTabular raises; an integer matches its decimal string in a string vocabulary.

Shapes: B = sessions in the request, T = the model's max_sequence_length (the spec's), N = events in
the request.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from raytr.config import DataConfig
from raytr.errors import one_line
from raytr.data.events import EVENT_ORDER, MAX_UNIX_SECONDS, unit_names
from raytr.data.workflow import list_name, sequence_features
from raytr.features import FIRST_ITEM_ID, NULL_ID, OOV_ID, FeatureSpec, SessionBatch

if TYPE_CHECKING:
    from raytr.bundle import Bundle

log = logging.getLogger(__name__)

Loc = tuple[str | int, ...]
VocabularyKind = Literal["int", "float", "str"]


class OnlineInputError(ValueError):
    """A request value the client must fix. `loc` locates it: (event, field) for `encode`,
    (session, event, field) for `encode_sessions`, with fields named as the raw columns; `value`
    is the offending value where there is one (None otherwise)."""

    def __init__(self, message: str, loc: Loc = (), value: Any = None) -> None:
        super().__init__(message)
        self.loc = loc
        self.value = value.item() if isinstance(value, np.generic) else value


class WorkflowCompileError(ValueError):
    """The fitted workflow has an op or setting this module cannot reproduce exactly."""


# ------------------------------------------------------------------------------------ vocabulary
_UNKNOWN = object()  # a lookup key that matches nothing: encodes to OOV


def _is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


@dataclass(frozen=True)
class Vocabulary:
    """One fitted Categorify column: raw value <-> encoded id.

    values[i] is the raw value of id i (None for the reserved ids 0 pad, 1 null, 2 OOV);
    ids maps a normalised raw value back to its id.
    """

    column: str
    kind: VocabularyKind
    ids: Mapping[Any, int]
    values: tuple[Any, ...]

    @property
    def cardinality(self) -> int:
        """Number of ids, reserved ones included (Categorify's embedding cardinality)."""
        return len(self.values)

    @classmethod
    def from_parquet(cls, path: str | Path, column: str) -> "Vocabulary":
        """Read `unique.<column>.parquet`: its index is the encoded id of each row's value."""
        try:
            frame = pd.read_parquet(path, columns=[column])
        except (OSError, ValueError, pa.ArrowException) as error:  # truncated, overwritten, missing
            raise WorkflowCompileError(f"{path} cannot be read ({one_line(error, 200)}): the workflow's "
                                       "category file is damaged or missing; run `raytr prepare` again") from None
        if frame[column].isna().any():
            raise WorkflowCompileError(f"{path}: the vocabulary of {column!r} contains a null value")
        labels = frame.index.to_numpy(dtype=np.int64)
        if len(labels) and labels.min() < FIRST_ITEM_ID:
            raise WorkflowCompileError(
                f"{path}: ids start at {labels.min()}, expected >= {FIRST_ITEM_ID} (0 pad, 1 null, 2 OOV)"
            )
        dtype = frame[column].dtype
        if pd.api.types.is_integer_dtype(dtype):
            kind: VocabularyKind = "int"
        elif pd.api.types.is_float_dtype(dtype):
            kind = "float"
        else:
            kind = "str"
        raw = frame[column].tolist() if kind != "str" else [str(v) for v in frame[column].tolist()]
        size = int(labels.max()) + 1 if len(labels) else FIRST_ITEM_ID
        values: list[Any] = [None] * size
        for label, value in zip(labels.tolist(), raw):
            values[label] = value
        return cls(column=column, kind=kind, ids=dict(zip(raw, labels.tolist())), values=tuple(values))

    def key(self, value: Any) -> Any:
        """The lookup key of one raw value as Categorify would cast it (None for null; a sentinel
        that matches nothing when the value cannot be cast, e.g. "abc" for integer ids)."""
        if _is_null(value):
            return None
        if isinstance(value, np.generic):
            value = value.item()
        if self.kind == "str":
            return value if isinstance(value, str) else str(value)
        if isinstance(value, bool):
            return int(value)
        try:
            if isinstance(value, str):
                value = value.strip()
                return int(value) if self.kind == "int" else float(value)
            if self.kind == "int":
                return int(value) if math.isfinite(value) else _UNKNOWN  # astype(int64) truncates
            return float(value)
        except (TypeError, ValueError, OverflowError):
            return _UNKNOWN

    def encode(self, raw: Iterable[Any]) -> np.ndarray:
        """[N] int64 ids: null -> NULL_ID, unknown -> OOV_ID."""
        if isinstance(raw, np.ndarray):
            raw = raw.tolist()  # Python scalars: faster lookups than numpy scalars
        ids, key = self.ids, self.key
        return np.asarray([NULL_ID if (k := key(v)) is None else ids.get(k, OOV_ID) for v in raw], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[Any]:
        """Raw values of `ids` (None for reserved or out-of-range ids), as Python int/float/str."""
        values, size = self.values, len(self.values)
        return [values[i] if 0 <= i < size else None for i in (int(x) for x in ids)]


# ------------------------------------------------------------------------------------ compiled steps
@dataclass
class _Context:
    """What a step may need besides its column: session boundaries and the raw source columns."""

    first: np.ndarray  # [N] bool, True for the first event of each session (sorted order)
    sources: Mapping[str, Any]  # raw column -> [N] values (sorted order)
    _frame: pd.DataFrame | None = None

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self._frame = pd.DataFrame({k: pd.Series(v) for k, v in self.sources.items()})
        return self._frame


Step = Callable[[Any, _Context], Any]


@dataclass(frozen=True)
class _Categorify:
    vocabulary: Vocabulary

    def __call__(self, values: Any, ctx: _Context) -> np.ndarray:
        return self.vocabulary.encode(values)


@dataclass(frozen=True)
class _FillMissing:
    value: float

    def __call__(self, values: Any, ctx: _Context) -> np.ndarray:
        values = np.array(values, dtype=np.float64 if np.asarray(values).dtype == object else None)
        values[np.isnan(values)] = self.value
        return values


@dataclass(frozen=True)
class _Log:
    def __call__(self, values: Any, ctx: _Context) -> np.ndarray:
        return np.log(np.asarray(values).astype(np.float32) + 1)  # nvtabular.ops.LogOp


@dataclass(frozen=True)
class _Normalize:
    mean: Any  # the fitted scalars themselves: their types decide numpy's result dtype
    std: Any
    dtype: Any

    def __call__(self, values: Any, ctx: _Context) -> np.ndarray:
        values = np.asarray(values)
        out = (values - self.mean) / self.std if self.std > 0 else values - self.mean
        return out.astype(self.dtype)


@dataclass(frozen=True)
class _DifferenceLag:
    dtype: Any

    def __call__(self, values: Any, ctx: _Context) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        diff = np.full(values.shape, np.nan)
        diff[1:] = values[1:] - values[:-1]
        diff[ctx.first] = np.nan
        return diff.astype(self.dtype)


@dataclass(frozen=True)
class _Udf:
    """A LambdaOp's own function. NVTabular calls it on a pandas Series (and the frame when it
    takes two parameters); `on_numpy` calls it on the numpy array instead, ~10x cheaper, and is
    chosen at compile time only when both calls agree on a probe (plain arithmetic such as
    raytr's hour and weekday functions)."""

    function: Callable[..., Any]
    takes_frame: bool
    on_numpy: bool

    def __call__(self, values: Any, ctx: _Context) -> np.ndarray:
        if self.on_numpy:
            return np.asarray(self.function(np.asarray(values)))
        series = pd.Series(values)
        out = self.function(series, ctx.frame()) if self.takes_frame else self.function(series)
        return np.asarray(out)

    @classmethod
    def compile(cls, function: Callable[..., Any], param_count: int) -> "_Udf":
        takes_frame = param_count == 2
        params = list(inspect.signature(function).parameters.values())
        frame_optional = len(params) < 2 or params[1].default is not inspect.Parameter.empty
        return cls(function, takes_frame, on_numpy=frame_optional and _same_on_numpy(function))


_UDF_PROBE = np.array([0.0, 1.5, 59.9, 3599.0, 86_399.5, 86_400.0, 1_714_521_600.25, 1_714_608_000.0, -3600.0])


def _same_on_numpy(function: Callable[..., Any]) -> bool:
    try:
        expected = np.asarray(function(pd.Series(_UDF_PROBE)))
        actual = np.asarray(function(_UDF_PROBE.copy()))
    except Exception:  # noqa: BLE001 - any failure means: keep calling it as NVTabular does
        return False
    return expected.dtype == actual.dtype and np.array_equal(expected, actual, equal_nan=expected.dtype.kind == "f")


@dataclass(frozen=True)
class ColumnPlan:
    """How one per-event model input is computed: raw `source` column -> steps -> `name`."""

    name: str  # the column the Groupby lists, e.g. "price"; the model input is `<name>-list`
    source: str
    steps: tuple[Step, ...]
    categorical: bool

    def apply(self, values: Any, ctx: _Context) -> np.ndarray:
        for step in self.steps:
            values = step(values, ctx)
        return np.asarray(values)


# ------------------------------------------------------------------------------------ graph walk
_PASS_THROUGH_OPS = {"ConcatColumns", "SubsetColumns", "SelectionOp"}
_IDENTITY_OPS = {"Rename", "TagAsItemID", "TagAsUserID", "TagAsItemFeatures", "TagAsUserFeatures", "AddTags",
                 "AddMetadata", "AddProperties"}


def _find_node(node: Any, op_name: str, seen: set[int] | None = None) -> Any | None:
    seen = set() if seen is None else seen
    if id(node) in seen:
        return None
    seen.add(id(node))
    if any(cls.__name__ == op_name for cls in type(node.op).__mro__):  # subclasses too (ColumnarGroupby)
        return node
    for parent in node.parents_with_dependencies:
        found = _find_node(parent, op_name, seen)
        if found is not None:
            return found
    return None


def _parent_with(parents: Sequence[Any], column: str) -> Any | None:
    return next((p for p in parents if column in p.output_columns.names), None)


def _trace(parents: Sequence[Any], column: str) -> tuple[str, list[tuple[Any, str]]]:
    """Follow `column` back from the nodes `parents` to a raw column: (source, [(op, column)...])
    with ops in the order they run."""
    node = _parent_with(parents, column)
    if node is None:
        return column, []  # a raw column selected at the root
    op_name = type(node.op).__name__
    if op_name in _PASS_THROUGH_OPS:
        if not node.parents_with_dependencies:
            return column, []
        return _trace(node.parents_with_dependencies, column)
    inputs = node.op.column_mapping(node.input_columns).get(column)
    if not inputs:
        raise WorkflowCompileError(f"cannot trace column {column!r} through {op_name}")
    source, chain = _trace(node.parents_with_dependencies, inputs[0])
    return source, chain + [(node.op, column)]


def _compile_op(op: Any, column: str, config: DataConfig) -> Step | None:
    """One fitted op -> a numpy step (None for ops that do not change values)."""
    name = type(op).__name__
    if name in _IDENTITY_OPS:
        return None
    if name == "Categorify":
        settings = {"num_buckets": op.num_buckets, "max_size": op.max_size, "single_table": op.single_table}
        if any(settings.values()) or op.encode_type != "joint" or op.split_out not in (1, None):
            raise WorkflowCompileError(
                f"Categorify of {column!r} uses {settings}, encode_type={op.encode_type!r}, "
                f"split_out={op.split_out}: only plain vocabularies are compiled; serve with the NVTabular path"
            )
        storage = op.storage_name.get(column, column)
        return _Categorify(Vocabulary.from_parquet(op.categories[storage], storage))
    if name == "FillMissing":
        if op.add_binary_cols:
            raise WorkflowCompileError(f"FillMissing of {column!r} adds binary columns, which are not compiled")
        return _FillMissing(float(op.fill_val))
    if name == "LogOp":
        return _Log()
    if name == "Normalize":
        return _Normalize(op.means[column], op.stds[column], op.output_dtype)
    if name == "DifferenceLag":
        if list(op.partition_cols) != [config.session_col] or list(op.shifts) != [1]:
            raise WorkflowCompileError(
                f"DifferenceLag of {column!r} partitions by {op.partition_cols} with shifts {op.shifts}: "
                f"only shift 1 within {config.session_col!r} is compiled"
            )
        return _DifferenceLag(op.output_dtype)
    if name in ("UDF", "LambdaOp"):
        return _Udf.compile(op.f, getattr(op, "_param_count", 1))
    raise WorkflowCompileError(
        f"op {name} on column {column!r} is not compiled by raytr.online; add it there or serve with the "
        "NVTabular executor (raytr.data.workflow.transform_frame)"
    )


def compile_workflow(workflow: Any, config: DataConfig) -> tuple[list[ColumnPlan], int]:
    """The per-event plans of a fitted workflow built by `raytr.data.workflow.build_workflow`, and
    the number of events kept per session (ListSlice)."""
    groupby = _find_node(workflow.output_node, "Groupby")
    if groupby is None:
        raise WorkflowCompileError("the workflow has no Groupby: it does not build sessions")
    if list(groupby.op.groupby_cols) != [config.session_col] or list(groupby.op.sort_cols) != [
        config.timestamp_col, EVENT_ORDER
    ]:
        raise WorkflowCompileError(
            f"the workflow groups by {groupby.op.groupby_cols} sorted by {groupby.op.sort_cols}; the data config "
            f"says session {config.session_col!r}, timestamp {config.timestamp_col!r}: the bundle's prepare.json "
            "does not match its workflow"
        )
    categorical, continuous = sequence_features(config)
    plans = []
    for name, is_cat in [(config.item_col, True)] + [(c, True) for c in categorical] + [(c, False) for c in continuous]:
        if name not in groupby.input_columns.names:
            raise WorkflowCompileError(f"the workflow's Groupby has no column {name!r} (it has {groupby.input_columns.names})")
        source, chain = _trace(groupby.parents_with_dependencies, name)
        steps = tuple(s for s in (_compile_op(op, col, config) for op, col in chain) if s is not None)
        if is_cat != any(isinstance(s, _Categorify) for s in steps):
            raise WorkflowCompileError(f"column {name!r}: expected it {'' if is_cat else 'not '}to be categorified")
        plans.append(ColumnPlan(name=name, source=source, steps=steps, categorical=is_cat))
    sliced = _find_node(workflow.output_node, "ListSlice")
    length = config.max_sequence_length
    if sliced is not None and not (sliced.op.start == -length and sliced.op.end >= np.iinfo(np.int64).max):
        raise WorkflowCompileError(
            f"the workflow keeps events [{sliced.op.start}:{sliced.op.end}] but data.max_sequence_length={length}"
        )
    return plans, length


# ------------------------------------------------------------------------------------ requests
@dataclass
class EncodedSessions:
    """The sessions of one request, encoded.

    session_ids: [B] session keys in order of first appearance (indexes for `encode_sessions`).
    batch: the model input, [B, T] right-padded (T: the model's max_sequence_length), the last
        min(workflow's, model's max_sequence_length) events of each session, as the loaders keep them.
    lengths: [B] events per session before the cut.
    item_ids: [B] arrays of the encoded item ids of all events of each session (for exclude_seen).
    """

    session_ids: list[Any]
    batch: SessionBatch
    lengths: np.ndarray
    item_ids: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.session_ids)


class OnlinePreprocessor:
    """Raw events of one request -> `SessionBatch`, without the NVTabular executor.

    Build with `from_bundle(bundle_or_dir)` or `from_workflow_dir(dir, data_config)`; then
    `transform(events)`, `encode(events)` (with session ids and lengths) or
    `encode_sessions([[event, ...], ...])`, and `decode_items(ids)` back to raw item ids.
    """

    def __init__(self, config: DataConfig, plans: Sequence[ColumnPlan], max_sequence_length: int,
                 spec: FeatureSpec | None = None) -> None:
        self.config = config
        self.plans = list(plans)
        self.max_sequence_length = max_sequence_length  # the workflow's ListSlice
        self.item_vocabulary = next(s.vocabulary for s in self.plans[0].steps if isinstance(s, _Categorify))
        self.spec = spec or self._spec_from_plans()
        self._check_spec(self.spec)
        self._sources = sorted({p.source for p in self.plans} - {config.timestamp_col, config.item_col})

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_workflow_dir(cls, workflow_dir: str | Path, config: DataConfig,
                          spec: FeatureSpec | None = None) -> "OnlinePreprocessor":
        """Compile the fitted workflow saved in `workflow_dir` (loading it unpickles code: trusted
        directories only). `spec`, when given, is checked against the workflow's vocabularies."""
        from raytr.data.workflow import load_workflow

        plans, length = compile_workflow(load_workflow(workflow_dir), config)
        return cls(config, plans, length, spec)

    @classmethod
    def from_bundle(cls, bundle: "Bundle | str | Path") -> "OnlinePreprocessor":
        """Compile the workflow of a model bundle and check it against the model's FeatureSpec."""
        from raytr.bundle import Bundle

        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        return cls.from_workflow_dir(bundle.workflow_dir, bundle.data, bundle.feature_spec)

    def _spec_from_plans(self) -> FeatureSpec:
        cats = {list_name(p.name): _cardinality(p) for p in self.plans[1:] if p.categorical}
        return FeatureSpec(
            item_id=list_name(self.config.item_col),
            item_cardinality=self.item_vocabulary.cardinality,
            max_sequence_length=self.max_sequence_length,
            categorical=cats,
            continuous=tuple(list_name(p.name) for p in self.plans if not p.categorical),
        )

    def _check_spec(self, spec: FeatureSpec) -> None:
        produced = {list_name(p.name): p for p in self.plans}
        missing = [c for c in spec.columns if c not in produced]
        if missing:
            raise WorkflowCompileError(f"the model needs columns {missing} that the workflow does not produce ({sorted(produced)})")
        if spec.item_id != list_name(self.config.item_col):
            raise WorkflowCompileError(f"the model's item column is {spec.item_id!r}, the workflow's {list_name(self.config.item_col)!r}")
        cards = {spec.item_id: spec.item_cardinality, **spec.categorical}
        for name, expected in cards.items():
            actual = _cardinality(produced[name])
            # Items must match exactly: every id the model can recommend needs a raw id to decode to.
            if actual > expected or (name == spec.item_id and actual != expected):
                raise WorkflowCompileError(
                    f"column {name!r}: the workflow's vocabulary has {actual} ids but the model was built for "
                    f"{expected}: the model and workflow come from different `raytr prepare` runs"
                )
        # No check of max_sequence_length: a model may take fewer or more events than the workflow
        # keeps (training.max_sequence_length); `_assemble` cuts and pads as the loaders do.

    # ---------------------------------------------------------------- facts
    @property
    def catalog_size(self) -> int:
        """Number of recommendable items (ids FIRST_ITEM_ID..V-1)."""
        return self.spec.item_cardinality - FIRST_ITEM_ID

    def decode_items(self, ids: Iterable[int]) -> list[Any]:
        """Encoded item ids -> raw item ids (None for reserved ids)."""
        return self.item_vocabulary.decode(ids)

    # ---------------------------------------------------------------- transform
    def transform(self, events: pd.DataFrame | Sequence[Mapping[str, Any]],
                  timestamp_unit: Literal["s", "ms"] | None = None) -> SessionBatch:
        """Raw events of one or more sessions (a DataFrame or dicts with the raw columns of the data
        config, in its timestamp unit unless `timestamp_unit` says otherwise) -> [B, T] batch."""
        return self.encode(events, timestamp_unit).batch

    def encode(self, events: pd.DataFrame | Sequence[Mapping[str, Any]],
               timestamp_unit: Literal["s", "ms"] | None = None) -> EncodedSessions:
        """Like `transform`, with session ids, lengths and all item ids. Errors locate (event, field)."""
        c = self.config
        unit = timestamp_unit or c.timestamp_unit
        names = [c.session_col, c.item_col, c.timestamp_col, *self._sources]
        if isinstance(events, pd.DataFrame):
            columns, unit = self._frame_columns(events, names, unit)
        else:
            columns = self._dict_columns(events, names)
        keys = columns.pop(c.session_col)
        for i, value in enumerate(keys):
            if _is_null(value):
                raise OnlineInputError(f"event {i}: {c.session_col!r} is missing or null", (i, c.session_col))
        codes, session_ids = _first_appearance_codes(keys)
        return self._encode_columns(columns, codes, session_ids, [(i,) for i in range(len(codes))], unit)

    def encode_sessions(self, sessions: Sequence[Sequence[Mapping[str, Any]]],
                        timestamp_unit: Literal["s", "ms"] | None = None) -> EncodedSessions:
        """Sessions given as lists of event dicts (no session column needed): session i of the
        result is `sessions[i]`. Errors locate (session, event, field)."""
        c = self.config
        flat = [event for session in sessions for event in session]
        where = [(s, e) for s, session in enumerate(sessions) for e in range(len(session))]
        empty = [s for s, session in enumerate(sessions) if not session]
        if empty:
            raise OnlineInputError(f"session {empty[0]} has no events", (empty[0],))
        columns = self._dict_columns(flat, [c.item_col, c.timestamp_col, *self._sources], where)
        codes = np.asarray([s for s, _ in where], dtype=np.int64)
        return self._encode_columns(columns, codes, list(range(len(sessions))), where,
                                    timestamp_unit or c.timestamp_unit)

    def _frame_columns(self, frame: pd.DataFrame, names: list[str], unit: str) -> tuple[dict[str, Any], str]:
        """Columns of a DataFrame; datetime timestamps become seconds as in `normalize_events`."""
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise OnlineInputError(f"events have no column(s) {missing}; expected {names}", (missing[0],))
        ts_col = self.config.timestamp_col
        columns: dict[str, Any] = {n: frame[n].tolist() for n in names if n != ts_col}
        ts = frame[ts_col]
        if pd.api.types.is_datetime64_any_dtype(ts):
            if getattr(ts.dt, "tz", None) is not None:
                ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
            columns[ts_col] = (ts.astype("datetime64[ns]").astype(np.int64) / 1e9).to_numpy(dtype=np.float64)
            return columns, "s"
        columns[ts_col] = ts.to_numpy()
        return columns, unit

    @staticmethod
    def _dict_columns(events: Sequence[Mapping[str, Any]], names: Sequence[str],
                      where: Sequence[Loc] | None = None) -> dict[str, list[Any]]:
        for i, event in enumerate(events):
            if not isinstance(event, Mapping):
                raise OnlineInputError(f"event {i} is a {type(event).__name__}, expected a mapping",
                                       where[i] if where else (i,))
        return {n: [e.get(n) for e in events] for n in names}

    def _encode_columns(self, columns: dict[str, Any], codes: np.ndarray, session_ids: list[Any],
                        where: Sequence[Loc], unit: str) -> EncodedSessions:
        c = self.config
        if len(codes) == 0:
            raise OnlineInputError("no events", ())
        raw_ts = _float_column(columns[c.timestamp_col], c.timestamp_col, where, allow_null=False)
        ts = raw_ts / 1000.0 if unit == "ms" else raw_ts
        _check_unix_seconds(ts, raw_ts, c.timestamp_col, unit, where)
        for i, value in enumerate(columns[c.item_col]):
            if _is_null(value):
                raise OnlineInputError(f"{c.item_col!r} is missing or null", (*where[i], c.item_col))
        sources: dict[str, Any] = {c.timestamp_col: ts, c.item_col: columns[c.item_col]}
        for name in self._sources:
            values = columns[name]
            sources[name] = _float_column(values, name, where) if name in c.continuous else values

        order = np.lexsort((ts, codes))  # by session, then time; stable for equal timestamps
        sorted_codes = codes[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_codes[1:] != sorted_codes[:-1]
        ctx = _Context(first=first, sources={k: _take(v, order) for k, v in sources.items()})
        with np.errstate(all="ignore"):  # overflows become non-finite values, rejected just below
            outputs = {p.name: p.apply(ctx.sources[p.source], ctx) for p in self.plans}
        self._check_finite(outputs, ctx, order, where)
        return self._assemble(outputs, sorted_codes, first, session_ids)

    def _check_finite(self, outputs: Mapping[str, np.ndarray], ctx: _Context, order: np.ndarray,
                      where: Sequence[Loc]) -> None:
        """Continuous model inputs must be finite (e.g. a log-transformed value <= -1 is not)."""
        for plan in self.plans:
            if plan.categorical:
                continue
            bad = ~np.isfinite(outputs[plan.name])
            if bad.any():
                pos = int(np.flatnonzero(bad)[0])
                raise OnlineInputError(
                    f"{plan.source!r}: this value gives a non-finite {plan.name!r} after the fitted transforms "
                    "(e.g. the log of a value <= -1); send a value in the training data's range",
                    (*where[int(order[pos])], plan.source), ctx.sources[plan.source][pos],
                )

    def _assemble(self, outputs: Mapping[str, np.ndarray], sorted_codes: np.ndarray, first: np.ndarray,
                  session_ids: list[Any]) -> EncodedSessions:
        # As training sees a session: the workflow's ListSlice keeps its last events, the loaders
        # (`pad_rows`) keep the last spec.max_sequence_length of those and right-pad to that width.
        T = self.spec.max_sequence_length
        keep = min(self.max_sequence_length, T)
        starts = np.flatnonzero(first)  # [B] sessions appear in code order, codes 0..B-1
        ends = np.append(starts[1:], len(sorted_codes))
        kept = np.maximum(starts, ends - keep)
        index = kept[:, None] + np.arange(T)[None, :]  # [B, T]
        valid = index < ends[:, None]
        index = np.minimum(index, len(sorted_codes) - 1)

        def pad(values: np.ndarray, dtype: Any) -> torch.Tensor:
            return torch.from_numpy(np.where(valid, values[index], 0).astype(dtype))

        item_plan, spec = self.plans[0], self.spec
        by_list = {list_name(p.name): p for p in self.plans}
        items = outputs[item_plan.name]
        batch = SessionBatch(
            item_ids=pad(items, np.int64),
            categorical={n: pad(outputs[by_list[n].name], np.int64) for n in spec.categorical},
            continuous={n: pad(outputs[by_list[n].name], np.float32) for n in spec.continuous},
        )
        return EncodedSessions(
            session_ids=session_ids,
            batch=batch,
            lengths=ends - starts,
            item_ids=[items[s:e] for s, e in zip(starts, ends)],
        )


def _cardinality(plan: ColumnPlan) -> int:
    return next(s.vocabulary.cardinality for s in plan.steps if isinstance(s, _Categorify))


def _first_appearance_codes(keys: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """[N] session index of each event (0 = first session seen) and the session keys in order."""
    index: dict[Any, int] = {}
    codes = [index.setdefault(k.item() if isinstance(k, np.generic) else k, len(index)) for k in keys]
    return np.asarray(codes, dtype=np.int64), list(index)


def _take(values: Any, order: np.ndarray) -> Any:
    if isinstance(values, np.ndarray):
        return values[order]
    return [values[i] for i in order.tolist()]


def _float_column(values: Any, name: str, where: Sequence[Loc], allow_null: bool = True) -> np.ndarray:
    """[N] float64; None/NaN stay NaN (null) when `allow_null`; +-inf and non-numbers are errors."""
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        for i, value in enumerate(values):
            try:
                float(value if value is not None else "nan")
            except (TypeError, ValueError):
                raise OnlineInputError(f"{name!r} must be a number, got {value!r}", (*where[i], name),
                                       value) from None
        raise
    bad = np.isinf(out) if allow_null else ~np.isfinite(out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise OnlineInputError(f"{name!r} must be a finite number, got {values[i]!r}", (*where[i], name), values[i])
    return out


def _check_unix_seconds(seconds: np.ndarray, raw: np.ndarray, name: str, unit: str, where: Sequence[Loc]) -> None:
    """Refuse timestamps beyond the year 5000 (either side of 1970), as `raytr prepare` refuses them:
    they are in a finer unit than `unit`, and would silently turn into other time features."""
    bad = np.abs(seconds) > MAX_UNIX_SECONDS
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        expected, finer = unit_names(unit)
        raise OnlineInputError(
            f"{name!r} is {raw[i]:.6g}, more than {MAX_UNIX_SECONDS:.0e} s from 1970 (beyond the year 5000): "
            f"timestamps are unix {expected}, and this looks like {finer}", (*where[i], name), raw[i],
        )
