"""Dataclass configs for every stage, loaded from one YAML file and validated with clear errors.

A YAML config has one section per stage: `data`, `model`, `training`, `serve`. Unknown keys are an
error that names the key; closed choices are `Literal`s checked on load.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raytr.training.arguments import TrainingArguments


class ConfigError(ValueError):
    """A config value a user must fix; the message names the field."""


# The per-event features `data.time_features` may ask for (raytr.data.workflow makes them).
TIME_FEATURES = ("hour", "weekday", "time_since_prev")


@dataclass(frozen=True)
class DataConfig:
    """Which raw columns mean what, and how sessions are built from them.

    session_col, item_col, timestamp_col: required raw columns.
    categorical: item/event features encoded with Categorify (e.g. category).
    continuous: numeric features, normalised (log1p first for those in `log_transform`).
    timestamp_unit: unit of numeric timestamps ("s", "ms"); datetime columns are used as they are.
    freq_threshold: items seen fewer times than this in the fit data map to the OOV id.
    max_sequence_length: sessions keep their last T events.
    min_session_length: shorter sessions are dropped (2: one input and one target).
    user_col: optional raw user id column, kept as the session's first value (Categorify).
    time_features: per-event features made from the timestamp, any of TIME_FEATURES: "hour",
        "weekday" (categorical) and "time_since_prev" (seconds since the previous event, log1p and
        normalised); true (the default) for all three, false for none. Leave out "weekday" when the
        training days do not cover every weekday: a weekday first seen in the test days has an
        embedding that was never trained.
    read_format: "auto" (from the file names), or "parquet", "csv", "tsv" for every input file.
    Sessions are written in day partitions (`day=N`) by their first timestamp.
    """

    session_col: str = "session_id"
    item_col: str = "item_id"
    timestamp_col: str = "timestamp"
    categorical: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    log_transform: tuple[str, ...] = ()
    user_col: str | None = None
    timestamp_unit: Literal["s", "ms"] = "s"
    freq_threshold: int = 0
    max_sequence_length: int = 20
    min_session_length: int = 2
    time_features: tuple[str, ...] | bool = True
    read_format: Literal["auto", "parquet", "csv", "tsv"] = "auto"

    def __post_init__(self) -> None:
        if self.max_sequence_length < 2:
            raise ConfigError(f"data.max_sequence_length={self.max_sequence_length}: expected >= 2")
        if self.min_session_length < 2:
            raise ConfigError(f"data.min_session_length={self.min_session_length}: expected >= 2")
        if self.freq_threshold < 0:
            raise ConfigError(f"data.freq_threshold={self.freq_threshold}: expected >= 0")
        names = [self.session_col, self.item_col, self.timestamp_col, *self.categorical, *self.continuous,
                 *([self.user_col] if self.user_col else [])]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"data: column(s) {sorted(dupes)} named in more than one role")
        extra = set(self.log_transform) - set(self.continuous)
        if extra:
            raise ConfigError(f"data.log_transform names {sorted(extra)}, which are not in data.continuous")
        # One form from here on: the tuple of names (true: all, false: none), in TIME_FEATURES order.
        chosen = TIME_FEATURES if self.time_features is True else () if self.time_features is False \
            else self.time_features
        unknown = [name for name in chosen if name not in TIME_FEATURES]
        if unknown:
            raise ConfigError(f"data.time_features names {unknown}: expected true, false or a list of "
                              f"{list(TIME_FEATURES)}")
        object.__setattr__(self, "time_features", tuple(n for n in TIME_FEATURES if n in chosen))

    @property
    def raw_columns(self) -> list[str]:
        cols = [self.session_col, self.item_col, self.timestamp_col, *self.categorical, *self.continuous]
        return cols + ([self.user_col] if self.user_col else [])


@dataclass(frozen=True)
class ModelConfig:
    """The session model: inputs -> body -> next-item head.

    body: a Hugging Face transformer ("xlnet", "gpt2", "bert", "llama") or "gru".
    objective: "clm" (predict the next item at every position) or "mlm" (masked items).
    loss: "full" softmax over the catalog (chunked), or "sampled" softmax with logQ correction.
    logits_chunk_size: rows per chunk of the full softmax; None (the default): as many as the
        head's memory budget for a chunk allows (`raytr.models.head.chunk_rows`).
    hf_config: extra keyword arguments for the Hugging Face config (checked against its fields).
    repeat_bias: add to each item already in the session a learned score by how many events ago
        it was last seen (one number per distance; an earlier occurrence adds nothing): a copy prior
        for logs where users return to what they just viewed. CLM with the full softmax only; its
        loss is the chunked one with the bias added inside each chunk (any catalog size).
    repeat_mixture: RepeatNet-style: the next item is drawn either from the session's own items
        (a repeat distribution: attention over its events by the item's score and a learned weight
        per distance) or from the whole catalog (the softmax), mixed by a gate the model computes at
        each position: how likely this session is to go back to an item, rather than one fixed
        bonus. Scores are then log-probabilities. CLM with the full softmax only; its loss needs the
        catalog only through a summary of each position's logits, taken in chunks (any catalog size). It
        replaces repeat_bias (set one of the two).
    score_temperature: at scoring time only (training never reads it), the catalog logits are
        divided by it before the repeat bias is added, or before the mixture's softmax. The balance
        between the session's own items and the rest is learned on the training days, where the
        model predicts new items more sharply than it can on later days; a temperature above 1,
        chosen on a later day's held-out sessions, gives the session's own items back their weight.
        With repeat_bias or repeat_mixture only (otherwise it would move no ranking).
        `SessionModel.set_score_temperature` sets it on a trained model.
    """

    body: Literal["xlnet", "gpt2", "bert", "llama", "gru"] = "gpt2"
    objective: Literal["clm", "mlm"] = "clm"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    aggregation: Literal["concat", "sum"] = "concat"
    categorical_dim: int = 16
    mlm_probability: float = 0.2
    loss: Literal["full", "sampled"] = "full"
    num_negatives: int = 1024
    label_smoothing: float = 0.0
    logits_chunk_size: int | None = None
    tie_weights: bool = True
    hf_config: dict[str, Any] = field(default_factory=dict)
    repeat_bias: bool = False
    repeat_mixture: bool = False
    score_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_layers < 1 or self.n_heads < 1:
            raise ConfigError("model.d_model, model.n_layers and model.n_heads must be >= 1")
        if self.categorical_dim < 1:  # 0 would silently drop every categorical and continuous feature
            raise ConfigError(f"model.categorical_dim={self.categorical_dim}: expected >= 1")
        if self.body != "gru" and self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: expected 0 <= dropout < 1")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"model.mlm_probability={self.mlm_probability}: expected 0 < p < 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"model.label_smoothing={self.label_smoothing}: expected 0 <= s < 1")
        if self.num_negatives < 1 or (self.logits_chunk_size is not None and self.logits_chunk_size < 1):
            raise ConfigError("model.num_negatives and model.logits_chunk_size must be >= 1")
        for name in ("repeat_bias", "repeat_mixture"):
            if getattr(self, name) and (self.objective != "clm" or self.loss != "full"):
                raise ConfigError(
                    f"model.{name} needs objective='clm' and loss='full' (got objective={self.objective!r}, "
                    f"loss={self.loss!r})"
                )
        if self.repeat_bias and self.repeat_mixture:
            raise ConfigError("model.repeat_bias and model.repeat_mixture are two ways to score the session's own "
                              "items: set one of them")
        if not (math.isfinite(self.score_temperature) and self.score_temperature > 0):
            raise ConfigError(f"model.score_temperature={self.score_temperature}: expected a finite number > 0")
        if self.score_temperature != 1.0 and not self.scores_repeats:
            raise ConfigError(f"model.score_temperature={self.score_temperature}: divides the catalog logits to "
                              "rebalance them against the session's own items, so it needs model.repeat_bias or "
                              "model.repeat_mixture (alone it would move no ranking)")
        if self.objective == "mlm" and self.body in ("gpt2", "llama", "gru"):
            raise ConfigError(
                f"model.objective='mlm' needs a bidirectional body (bert, xlnet); body={self.body!r} is "
                "causal: use objective='clm'"
            )

    @property
    def scores_repeats(self) -> bool:
        """Whether the head scores the session's own items apart (repeat_bias or repeat_mixture)."""
        return self.repeat_bias or self.repeat_mixture


@dataclass(frozen=True)
class ServeConfig:
    """The online service: where the model is, how many items, request limits.

    max_batch_size, batch_wait_timeout_s: the Recommender's dynamic batching (`@serve.batch`).
    reload_poll_s: how often replicas check whether `POST /admin/reload` announced a new bundle.
    admin_token_file: a file holding the admin token (the env var RAYTR_ADMIN_TOKEN wins); with
        neither, /admin/reload is disabled.
    """

    model_dir: str = "runs/demo/model"
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10
    max_events_per_session: int = 1000
    max_sessions_per_batch: int = 256
    max_body_bytes: int = 1_000_000
    batch_wait_timeout_s: float = 0.005
    max_batch_size: int = 32
    reload_poll_s: float = 2.0
    admin_token_file: str | None = None
    # "exported": the Recommender scores with a torch.export program of the model, made at load on
    # its device (raytr.models.export); "eager": the SessionModel itself.
    scorer: Literal["eager", "exported"] = "eager"

    def __post_init__(self) -> None:
        for name in ("default_k", "max_events_per_session", "max_sessions_per_batch", "max_body_bytes", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}={getattr(self, name)}: expected >= 1")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port={self.port}: expected a TCP port, 1 to 65535")
        if not (math.isfinite(self.batch_wait_timeout_s) and self.batch_wait_timeout_s >= 0):
            raise ConfigError(f"serve.batch_wait_timeout_s={self.batch_wait_timeout_s}: expected a finite number "
                              ">= 0 (seconds)")
        if not (math.isfinite(self.reload_poll_s) and self.reload_poll_s > 0):
            raise ConfigError(f"serve.reload_poll_s={self.reload_poll_s}: expected a finite number > 0 (seconds)")


@dataclass(frozen=True)
class RaytrConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name. None (an
    empty or absent section) means the defaults; anything else that is not a mapping is an error."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}={_short(values)}: expected a mapping of keys (or nothing, for the defaults), "
                          f"got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: expected one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):  # the first type that takes the value
            try:
                return _coerce(option, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r}: expected {_describe(tp)}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return tuple(_coerce(args[0], v, where) for v in value)
    if origin is list:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        return [_coerce(args[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        key_type, value_type = args or (Any, Any)
        return {_coerce(key_type, k, f"{where} key {k!r}"): _coerce(value_type, v, f"{where}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    return value


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters for an error's one line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(tp: Any) -> str:
    """How a value of type `tp` is written in YAML, for errors: "a list of strings, or true or false"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return ", or ".join(_describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (tuple, list):
        plural = {str: "strings", int: "integers", float: "numbers"}.get(args[0] if args else None)
        return f"a list of {plural}" if plural else "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one), and
    reading `1e-3` as a number, as YAML 1.2 does (1.1's rule wants `1.0e-3`: `learning_rate: 1e-3`
    was a string)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key)
        self.key, self.first_line, self.line = key, first_line, line


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML `text` read from `source` (a file or a --set argument, named by errors): a syntax
    error or a key given twice in one mapping is a ConfigError naming the source and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(f"{source}: key {dup.key!r} is given twice (line {dup.first_line} and line {dup.line}); "
                          "keep one") from None
    except yaml.MarkedYAMLError as error:
        # Both marks where both exist: the context's is the culprit of "while scanning a simple key"
        # (a key without its colon), the problem's where the parser gave up (the next line, or past the end).
        def at(mark) -> str:
            return f"line {mark.line + 1}, column {mark.column + 1}"

        mark = error.problem_mark or error.context_mark
        where = f" at {at(mark)}" if mark is not None else ""
        context = error.context and (f"{error.context} ({at(error.context_mark)})"
                                     if error.context_mark is not None and error.problem_mark is not None
                                     else error.context)
        what = "; ".join(str(m) for m in (context, error.problem) if m)
        raise ConfigError(f"{source}: invalid YAML{where}: {what}") from None
    except yaml.reader.ReaderError as error:
        line = text[:error.position].count("\n") + 1
        char = chr(error.character) if isinstance(error.character, int) else error.character
        raise ConfigError(f"{source}: invalid YAML at line {line}: {error.reason} ({char!r})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML: {error}") from None


def _check_override(section: str, values: dict[str, Any]) -> None:
    """Unknown keys and wrong types of `--set section.key=value` overrides, named as given: merged
    into the file's section first, they would be reported as the file's."""
    sections = {f.name: f.type for f in dataclasses.fields(RaytrConfig)}
    if section not in sections:
        raise ConfigError(f"--set {section}.*: unknown section {section!r}; known sections: {sorted(sections)}")
    cls = typing.get_type_hints(RaytrConfig)[section]
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"--set {section}.{key}: unknown key; known keys of {section}: {sorted(hints)}")
        _coerce(hints[key], value, f"--set {section}.{key}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RaytrConfig:
    """Read a YAML config (defaults when `path` is None); `overrides` maps section -> {key: value}
    (the CLI's `--set` and options; their unknown keys and wrong types are named as `--set`s)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; name a YAML file (e.g. configs/synthetic.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            line = error.object[:error.start].count(b"\n") + 1
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: line {line} has the byte "
                              f"{error.object[error.start:error.start + 1]!r} (save it as UTF-8)") from None
        raw = load_yaml(text, f"config file {str(path)!r}")
        if raw is None:  # empty, or only comments: the defaults
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} holds {type(raw).__name__} {_short(raw)}: expected a "
                              "mapping of sections (data, model, training, serve)")
    for section, values in (overrides or {}).items():
        _check_override(section, values)
        current = raw.get(section)
        if current is None:
            current = {}
        if not isinstance(current, dict):
            raise ConfigError(f"{path or 'config'}: section {section!r} must be a mapping, got {current!r}")
        raw[section] = {**current, **values}
    return from_dict(RaytrConfig, raw, where=str(path) if path else "config")
