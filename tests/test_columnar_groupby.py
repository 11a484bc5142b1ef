"""raytr.data.columnar_groupby: the same frame as NVTabular's Groupby, on frames built to be awkward.

Each case runs one Groupby op directly on a pandas frame, once as `nvtabular.ops.Groupby` (pandas'
per-group Python aggregation) and once as `ColumnarGroupby`, and compares every cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from merlin.dag import ColumnSelector
from nvtabular import ops

from raytr.data.columnar_groupby import ColumnarGroupby


def run_both(frame: pd.DataFrame, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    columns = ColumnSelector([c for c in frame.columns])
    reference = ops.Groupby(**kwargs).transform(columns, frame.copy())
    columnar = ColumnarGroupby(**kwargs).transform(columns, frame.copy())
    return reference, columnar


def assert_same(reference: pd.DataFrame, columnar: pd.DataFrame) -> None:
    assert sorted(columnar.columns) == sorted(reference.columns)
    assert len(columnar) == len(reference)
    for name in reference.columns:
        ref, got = reference[name], columnar[name]
        if ref.dtype == object and len(ref) and isinstance(ref.iloc[0], list):
            for r, g in zip(ref, got):
                assert np.array_equal(np.asarray(r, dtype=np.asarray(g).dtype), g, equal_nan=True), name
                assert np.asarray(r).dtype.kind == np.asarray(g).dtype.kind, name
        else:
            assert got.dtype == ref.dtype, name
            pd.testing.assert_series_equal(got.reset_index(drop=True), ref.reset_index(drop=True), check_names=False)


def random_events(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "session": rng.integers(0, rows // 4, rows),
        "ts": rng.integers(0, 50, rows).astype(np.float64),  # many ties on purpose
        "order": rng.permutation(rows),  # breaks the ties, as sort_events' event_order does
        "item": rng.integers(3, 40, rows),
        "price": np.where(rng.random(rows) < 0.1, np.nan, rng.random(rows)),  # NaNs inside lists
    })


AGGS = {"item": ["list", "count"], "ts": ["first", "last"], "price": ["list", "count", "first"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sessions_with_ties_and_nans(seed):
    frame = random_events(2_000, seed)
    assert_same(*run_both(frame, groupby_cols=["session"], sort_cols=["ts", "order"], aggs=AGGS, name_sep="-"))


def test_lists_follow_the_sort_columns_not_the_input_order():
    frame = pd.DataFrame({"session": [7, 3, 7, 7, 3], "ts": [30.0, 5.0, 10.0, 20.0, 1.0], "item": [1, 2, 3, 4, 5]})
    reference, columnar = run_both(frame, groupby_cols=["session"], sort_cols=["ts"],
                                   aggs={"item": ["list", "first", "last", "count"]}, name_sep="-")
    assert_same(reference, columnar)
    assert columnar["session"].tolist() == [3, 7]
    assert [list(x) for x in columnar["item-list"]] == [[5, 2], [3, 4, 1]]
    assert columnar["item-first"].tolist() == [5, 3] and columnar["item-last"].tolist() == [2, 1]
    assert columnar["item-count"].dtype == np.int32


def test_descending_sort():
    frame = random_events(500, 3)
    assert_same(*run_both(frame, groupby_cols=["session"], sort_cols=["ts", "order"], ascending=False,
                          aggs=AGGS, name_sep="-"))


def test_two_group_keys_string_keys_and_null_keys_dropped():
    frame = random_events(800, 4)
    frame["shop"] = np.where(frame["order"] % 3 == 0, "b", "a")
    frame["user"] = [None if i % 17 == 0 else f"u{i % 9}" for i in range(len(frame))]
    reference, columnar = run_both(frame, groupby_cols=["user", "shop"], sort_cols=["ts", "order"],
                                   aggs={"item": ["list", "count"], "session": ["first"]}, name_sep="_")
    assert_same(reference, columnar)
    assert columnar["user"].notna().all()


def test_without_sort_columns_keeps_input_order_within_a_group():
    frame = random_events(300, 5)
    assert_same(*run_both(frame, groupby_cols=["session"], aggs={"item": ["list", "last"]}, name_sep="-"))


def test_other_aggregations_and_empty_frames_take_nvtabulars_path():
    frame = random_events(300, 6)
    assert_same(*run_both(frame, groupby_cols=["session"], sort_cols=["ts"], aggs={"item": ["list", "sum"]},
                          name_sep="-"))
    empty = frame.iloc[:0]
    reference, columnar = run_both(empty, groupby_cols=["session"], sort_cols=["ts"], aggs=AGGS, name_sep="-")
    assert len(columnar) == 0 and sorted(columnar.columns) == sorted(reference.columns)
