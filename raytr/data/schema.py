"""The Merlin schema of prepared sessions: build it in code, read/write it, derive `FeatureSpec`.

The schema written by `raytr prepare` is the one source of the data facts (item cardinality,
padding, maximum sequence length, which columns are categorical or continuous sequences).
Files: `schema.json` and `schema.pbtxt` (Merlin's TensorFlow-Metadata formats).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from merlin.schema import ColumnSchema, Schema, Tags
from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

from raytr import storage
from raytr.features import FeatureSpec

SCHEMA_JSON = "schema.json"
SCHEMA_PBTXT = "schema.pbtxt"


class SchemaError(ValueError):
    """The schema lacks something a model needs; the message says what."""


def save_schema(schema: Schema, directory: str | Path) -> None:
    meta = TensorflowMetadata.from_merlin_schema(schema)
    meta.to_json_file(str(directory), SCHEMA_JSON)
    meta.to_proto_text_file(str(directory), SCHEMA_PBTXT)


def load_schema(path: str | Path) -> Schema:
    """Read `schema.json` (or `schema.pbtxt`) from a prepared directory or a file path (local or URL)."""
    if storage.is_dir(path):
        found = [f for f in (storage.join(path, SCHEMA_JSON), storage.join(path, SCHEMA_PBTXT)) if storage.is_file(f)]
        if not found:
            raise FileNotFoundError(f"no {SCHEMA_JSON} or {SCHEMA_PBTXT} in {path}: run `raytr prepare` first")
        path = found[0]
    text = storage.read_text(path)
    if str(path).endswith(".json"):
        return TensorflowMetadata.from_json(text).to_merlin_schema()
    return TensorflowMetadata.from_proto_text(text).to_merlin_schema()


def _cardinality(col: ColumnSchema) -> int:
    sizes = col.properties.get("embedding_sizes", {})
    if "cardinality" in sizes:
        return int(sizes["cardinality"])
    domain = col.properties.get("domain", {}) or {}
    if col.int_domain is not None and col.int_domain.max is not None:
        return int(col.int_domain.max) + 1
    if "max" in domain:
        return int(domain["max"]) + 1
    raise SchemaError(f"column {col.name!r} has no cardinality (embedding_sizes or domain.max) in the schema")


def _max_length(col: ColumnSchema) -> int | None:
    dims = col.shape.dims if col.shape is not None and col.shape.dims is not None else ()
    if len(dims) == 2 and dims[1].max:
        return int(dims[1].max)
    return None


def feature_spec(schema: Schema, max_sequence_length: int | None = None) -> FeatureSpec:
    """The model inputs a schema describes: the item-id list column, other categorical and
    continuous list columns, cardinalities and the maximum length (`max_sequence_length`, or the
    schema's when it is None)."""
    lists = [c for c in schema if Tags.LIST in c.tags or c.is_list]
    items = [c for c in lists if Tags.ITEM_ID in c.tags or {Tags.ITEM, Tags.ID} <= set(c.tags)]
    if not items:
        raise SchemaError(
            "the schema has no item-id sequence column (a list column tagged item + id); "
            f"list columns found: {[c.name for c in lists]}"
        )
    if len(items) > 1:
        raise SchemaError(f"the schema has several item-id sequence columns: {[c.name for c in items]}")
    item = items[0]
    categorical = {
        c.name: _cardinality(c) for c in lists if c is not item and Tags.CATEGORICAL in c.tags
    }
    continuous = tuple(c.name for c in lists if Tags.CONTINUOUS in c.tags)
    length = _max_length(item) if max_sequence_length is None else max_sequence_length  # 0 is FeatureSpec's error
    if length is None:
        raise SchemaError(f"the schema gives no maximum length for {item.name!r}: pass max_sequence_length")
    return FeatureSpec(
        item_id=item.name,
        item_cardinality=_cardinality(item),
        max_sequence_length=length,
        categorical=categorical,
        continuous=continuous,
    )


def schema_from_spec(spec: FeatureSpec) -> Schema:
    """Build the Merlin schema of a session dataset in code (no prepared data needed)."""
    length = spec.max_sequence_length

    def seq(name: str, tags: list, dtype, cardinality: int | None = None) -> ColumnSchema:
        props = {"value_count": {"min": 0, "max": length}}
        if cardinality is not None:
            props["domain"] = {"min": 0, "max": cardinality - 1, "name": name}
            props["embedding_sizes"] = {"cardinality": cardinality, "dimension": 16}
        return ColumnSchema(
            name, tags=[Tags.LIST, Tags.SEQUENCE, *tags], dtype=dtype, is_list=True, is_ragged=True,
            properties=props, dims=(None, (0, length)),
        )

    columns = [seq(spec.item_id, [Tags.ITEM, Tags.ID, Tags.CATEGORICAL], np.int64, spec.item_cardinality)]
    columns += [seq(n, [Tags.CATEGORICAL], np.int64, c) for n, c in spec.categorical.items()]
    columns += [seq(n, [Tags.CONTINUOUS], np.float32) for n in spec.continuous]
    return Schema(columns)
