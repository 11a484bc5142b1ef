"""raytr.data.schema: the schema written by prepare is the one source of the data facts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from merlin.schema import ColumnSchema, Schema, Tags

from raytr.data.schema import (
    SCHEMA_JSON,
    SCHEMA_PBTXT,
    SchemaError,
    feature_spec,
    load_schema,
    save_schema,
    schema_from_spec,
)
from raytr.data.workflow import SESSION_LENGTH
from raytr.config import from_dict
from raytr.features import FeatureSpec

SPEC = FeatureSpec(
    item_id="item_id-list",
    item_cardinality=1_234,
    max_sequence_length=17,
    categorical={"category-list": 57, "hour-list": 27},
    continuous=("price-list", "time_since_prev-list"),
)


@pytest.mark.ray
def test_both_files_load_to_the_same_spec(prepared_dir, prepared_spec):
    assert (prepared_dir / SCHEMA_JSON).is_file() and (prepared_dir / SCHEMA_PBTXT).is_file()
    from_json = feature_spec(load_schema(prepared_dir / SCHEMA_JSON))
    from_pbtxt = feature_spec(load_schema(prepared_dir / SCHEMA_PBTXT))
    assert from_json == from_pbtxt == prepared_spec


@pytest.mark.ray
def test_prepared_spec_matches_the_data(prepared_dir, prepared_spec, raw_events, prepare_summary):
    spec = prepared_spec
    assert spec.item_id == "item_id-list"
    assert spec.max_sequence_length == 20
    assert set(spec.categorical) == {"category-list", "hour-list", "weekday-list"}
    assert spec.continuous == ("price-list", "time_since_prev-list")
    # cardinality = the fitted vocabulary + 3 reserved ids (pad, null, OOV)
    assert spec.item_cardinality == raw_events["item_id"].nunique() + 3 == prepare_summary.items
    assert spec.categorical["category-list"] == raw_events["category"].nunique() + 3
    categories = prepared_dir / "workflow" / "categories"
    for name in ("hour", "weekday"):
        assert spec.categorical[f"{name}-list"] == len(pd.read_parquet(categories / f"unique.{name}.parquet")) + 3
    # every id in the data is below its cardinality
    sessions = pd.read_parquet(prepared_dir / "sessions")
    for column, card in {spec.item_id: spec.item_cardinality, **spec.categorical}.items():
        values = np.concatenate(sessions[column].to_list())
        assert values.min() >= 1 and values.max() < card, column
    assert sessions[spec.item_id].map(len).max() <= spec.max_sequence_length


@pytest.mark.ray
def test_prepared_schema_tags(prepared_schema):
    item = prepared_schema["item_id-list"]
    assert {Tags.ITEM, Tags.ID, Tags.LIST, Tags.SEQUENCE, Tags.CATEGORICAL} <= set(item.tags)
    assert Tags.CONTINUOUS in prepared_schema["price-list"].tags
    # Groupby's count inherits the item tags; the schema must not call session_length an item id
    length = prepared_schema[SESSION_LENGTH]
    assert not {Tags.ITEM, Tags.ID, Tags.ITEM_ID, Tags.CATEGORICAL} & set(length.tags)


def test_load_schema_from_directory_prefers_json(tmp_path):
    save_schema(schema_from_spec(SPEC), tmp_path)
    assert feature_spec(load_schema(tmp_path)) == SPEC
    (tmp_path / SCHEMA_JSON).unlink()
    assert feature_spec(load_schema(tmp_path)) == SPEC  # falls back to the pbtxt
    (tmp_path / SCHEMA_PBTXT).unlink()
    with pytest.raises(FileNotFoundError, match="raytr prepare"):
        load_schema(tmp_path)


def test_schema_from_spec_round_trip(tmp_path):
    schema = schema_from_spec(SPEC)
    assert feature_spec(schema) == SPEC
    save_schema(schema, tmp_path)
    for name in (SCHEMA_JSON, SCHEMA_PBTXT):
        assert feature_spec(load_schema(tmp_path / name)) == SPEC, name
    assert from_dict(FeatureSpec, SPEC.to_dict(), where="spec") == SPEC


def test_max_sequence_length_argument_overrides_the_schema():
    assert feature_spec(schema_from_spec(SPEC), max_sequence_length=5).max_sequence_length == 5


def test_schema_without_item_id_column():
    schema = schema_from_spec(SPEC).excluding_by_name([SPEC.item_id])
    with pytest.raises(SchemaError) as info:
        feature_spec(schema)
    msg = str(info.value)
    assert "item-id" in msg and "category-list" in msg  # says what is missing and what was found


def test_schema_with_two_item_id_columns():
    schema = schema_from_spec(SPEC)
    twin = schema[SPEC.item_id].with_name("other_item-list")
    with pytest.raises(SchemaError, match="several item-id"):
        feature_spec(Schema([*schema, twin]))


def test_schema_without_cardinality_names_the_column():
    schema = schema_from_spec(SPEC)
    old = schema["category-list"]
    bare = ColumnSchema(old.name, tags=old.tags, dtype=old.dtype, is_list=True, is_ragged=True, dims=old.shape.dims)
    assert "domain" not in bare.properties and "embedding_sizes" not in bare.properties
    columns = [bare if c.name == "category-list" else c for c in schema]
    with pytest.raises(SchemaError, match="category-list"):
        feature_spec(Schema(columns))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"item_cardinality": 3}, "item_cardinality"), ({"max_sequence_length": 1}, "max_sequence_length"),
     ({"categorical": {"c": 1}}, "'c'")],
)
def test_feature_spec_validation(kwargs, match):
    values = {"item_id": "i", "item_cardinality": 10, "max_sequence_length": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        FeatureSpec(**values)
