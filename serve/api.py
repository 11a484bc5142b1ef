"""Request and response models of the recommendation API (pydantic v2).

An event carries the item and time, plus the item features the bundle's data config names:

    item_id        int | str      the item as the client knows it (the raw id of the training data)
    timestamp      number         unix time in seconds (beyond the year 5000, e.g. milliseconds: a 422)
    <categorical>  int | str | null   one field per `data.categorical` (e.g. "category")
    <continuous>   number | null      one field per `data.continuous` (e.g. "price")

The event model is built from the data config (`build_api_models`) rather than taking a free
`features: dict[str, ...]`: pydantic then checks each feature's name and type with the field in the
error's `loc`, `extra="forbid"` rejects a misspelled feature, and /docs shows the real fields. A
null or absent feature means "unknown": a categorical gets the null id, a continuous feature the
workflow's fill value (as a missing value in the training data would).

Every request model forbids unknown fields, takes strict types (no "1" for 1, no true for 1),
finite numbers and valid unicode only (no lone surrogate such as "\\ud800"). Example request and
answer:

    POST /recommend
    {"session_id": "s-1", "k": 3, "exclude_seen": true,
     "events": [{"item_id": 100007932, "timestamp": 1714550000.0, "category": 1030, "price": 19.9},
                {"item_id": 100015851, "timestamp": 1714550042.5, "category": 1030, "price": 24.5}]}
    -> {"session_id": "s-1", "model_version": "run-...-3f9a0c1d2e4b",
        "items": [{"item_id": 100023770, "score": 7.41}, {"item_id": 100031689, "score": 6.9}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model, field_validator
from pydantic_core import PydanticCustomError

from raytr.config import ConfigError, DataConfig, ServeConfig

ITEM_FIELD = "item_id"
TIMESTAMP_FIELD = "timestamp"

# Any id the training data can hold (an empty string and a URL too): max_body_bytes bounds the size.
RawId = StrictInt | StrictStr


class StrictModel(BaseModel):
    """Base of request models: unknown fields, coercions, NaN/inf and lone surrogates are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON lets a string hold a lone surrogate ("\\ud800"): no training id (UTF-8 data) can
        # be one, and the answer, which echoes session_id, could not be encoded (a 500).
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PydanticCustomError(
                    "string_unicode",
                    "String should be valid unicode: a lone surrogate {escape} at position {position} "
                    "(\\ud800-\\udbff must be followed by \\udc00-\\udfff)",
                    {"escape": f"\\u{ord(value[exc.start]):04x}", "position": exc.start},
                ) from None
        return value


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ responses
class ScoredItem(ResponseModel):
    item_id: RawId = Field(description="raw item id, as in the training data")
    score: float = Field(description="the model's score; items are sorted by it, best first")


class RecommendResponse(ResponseModel):
    session_id: RawId | None = Field(None, description="echoed from the request")
    items: list[ScoredItem] = Field(description="up to k items, best first (fewer only when exclude_seen "
                                                "leaves fewer than k items in the catalog)")
    model_version: str


class BatchRecommendResponse(ResponseModel):
    results: list[RecommendResponse] = Field(description="one per request, in request order")
    model_version: str


class FeatureSummary(ResponseModel):
    categorical: dict[str, int] = Field(description="categorical model input -> cardinality")
    continuous: list[str] = Field(description="continuous model inputs")


class BatchingStats(ResponseModel):
    replica: str = Field(description="the Recommender replica that answered")
    requests: int = Field(description="requests scored by this replica")
    batches: int = Field(description="model calls of this replica")
    max_batch_requests: int = Field(description="most requests scored in one model call")


class ModelInfo(ResponseModel):
    model_version: str
    run_name: str | None
    item_cardinality: int = Field(description="item ids incl. padding, null and OOV")
    catalog_size: int = Field(description="recommendable items: the largest k")
    max_sequence_length: int = Field(description="events per session the model reads (the last ones)")
    max_events_per_session: int
    event_fields: list[str] = Field(description="fields of an event in a request")
    features: FeatureSummary
    metrics: dict[str, float] = Field(description="from the bundle's train_result.json")
    batching: BatchingStats | None = None


class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"
    model_version: str


class ReloadResponse(ResponseModel):
    previous_version: str
    model_version: str
    changed: bool
    detail: str


# ------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class ApiModels:
    """The request models of one data config (built per replica, never pickled)."""

    event: type[StrictModel]
    request: type[StrictModel]
    batch_request: type[StrictModel]


def request_fields(data: DataConfig) -> tuple[Any, ...]:
    """What the request models and `request_events` take from a data config: two configs equal in
    these take the same requests (the rest, e.g. min_session_length, only concerns preparation)."""
    return data.item_col, data.timestamp_col, frozenset(data.categorical), frozenset(data.continuous)  # named, not ordered


def build_api_models(data: DataConfig, serve: ServeConfig) -> ApiModels:
    """Event, RecommendRequest and BatchRecommendRequest for the features `data` names."""
    features = [*data.categorical, *data.continuous]
    clashes = [n for n in features if n in (ITEM_FIELD, TIMESTAMP_FIELD) or not n.isidentifier() or n.startswith("_")]
    if clashes:
        raise ConfigError(
            f"data feature(s) {clashes} cannot be API fields (reserved names {ITEM_FIELD!r}, {TIMESTAMP_FIELD!r}, "
            "or not a Python identifier): rename the column in the raw data and the config"
        )
    fields: dict[str, Any] = {
        ITEM_FIELD: (RawId, Field(description=f"the item (raw {data.item_col!r} of the training data)")),
        TIMESTAMP_FIELD: (float, Field(description="unix time in seconds (not milliseconds: a time beyond the year "
                                                   "5000 is refused, as `raytr prepare` refuses it)")),
    }
    for name in data.categorical:
        fields[name] = (RawId | None, Field(None, description="categorical feature; null = unknown"))
    for name in data.continuous:
        fields[name] = (float | None, Field(None, description="continuous feature; null = unknown"))
    event = create_model("Event", __base__=StrictModel, **fields)
    request = create_model(
        "RecommendRequest",
        __base__=StrictModel,
        session_id=(RawId | None, Field(None, description="echoed in the response")),
        events=(list[event], Field(min_length=1, max_length=serve.max_events_per_session,
                                   description="the session so far, any order (sorted by timestamp)")),
        k=(int, Field(serve.default_k, ge=1, description="number of items (at most the catalog size)")),
        exclude_seen=(bool, Field(True, description="never recommend an item of this session")),
    )
    batch_request = create_model(
        "BatchRecommendRequest",
        __base__=StrictModel,
        requests=(list[request], Field(min_length=1, max_length=serve.max_sessions_per_batch)),
    )
    return ApiModels(event=event, request=request, batch_request=batch_request)


def request_events(request: StrictModel, data: DataConfig) -> list[dict[str, Any]]:
    """The events of a validated request as raw-column dicts, as `OnlinePreprocessor` reads them."""
    out = []
    for event in request.events:  # type: ignore[attr-defined]
        values = event.model_dump()
        values[data.item_col] = values.pop(ITEM_FIELD)
        values[data.timestamp_col] = values.pop(TIMESTAMP_FIELD)
        out.append(values)
    return out


def api_field(column: str, data: DataConfig) -> str:
    """The API name of a raw column (for error locations)."""
    return {data.item_col: ITEM_FIELD, data.timestamp_col: TIMESTAMP_FIELD}.get(column, column)
