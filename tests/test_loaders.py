"""raytr.data.loaders: padded [B, T] batches, identical for both readers, equal steps per rank and
every session exactly once per epoch.

Most tests write their own tiny parquet files, where row r holds items r*1000+3, r*1000+4, ... so
a batch row tells which session it came from (item // 1000), even after the cut to the last T.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytr.data.loaders import (
    DataLoader,
    RaggedColumn,
    causal_target_counts,
    check_no_nulls,
    pad_rows,
    ragged_from_arrow,
    rank_row_range,
)
from raytr.features import FeatureSpec, SessionBatch
from raytr.models.masking import IGNORE_INDEX, causal_targets

T = 5
ENGINES = ["merlin", "pyarrow"]
SPEC = FeatureSpec(
    item_id="item_id-list", item_cardinality=1_000_000, max_sequence_length=T,
    categorical={"category-list": 10}, continuous=("price-list",),
)


def row_length(r: int) -> int:
    return 1 + (3 * r) % 8  # 1..8 events: some shorter than T, some longer


def row_values(r: int) -> tuple[list[int], list[int], list[float]]:
    n = row_length(r)
    return ([r * 1000 + j + 3 for j in range(n)], [(r + j) % 4 + 3 for j in range(n)],
            [r + j / 10 for j in range(n)])


def write_rows(directory: Path, rows_per_file: list[int], first: int = 0) -> list[str]:
    """Files of consecutive rows first..first+N-1, named so that sorting keeps the row order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, r = [], first
    for i, n in enumerate(rows_per_file):
        rows = [row_values(k) for k in range(r, r + n)]
        table = pa.table({
            "session_id": pa.array(range(r, r + n), pa.int64()),
            "item_id-list": pa.array([x[0] for x in rows], pa.list_(pa.int64())),
            "category-list": pa.array([x[1] for x in rows], pa.list_(pa.int64())),
            "price-list": pa.array([x[2] for x in rows], pa.list_(pa.float64())),
        })
        path = directory / f"part-{i:03d}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
        r += n
    return paths


def expected_row(r: int) -> tuple[list[int], list[int], list[float]]:
    """The padded row of session r: its last T events, right-padded with 0."""
    items, cats, prices = (v[-T:] for v in row_values(r))
    pad = T - len(items)
    return items + [0] * pad, cats + [0] * pad, prices + [0.0] * pad


def rows_of(batch: SessionBatch) -> list[int]:
    return (batch.item_ids[:, 0] // 1000).tolist()


def counted_targets(batch: SessionBatch) -> int:
    """The batch's CLM targets as the model labels them, counted on its tensors."""
    return int((causal_targets(batch.item_ids) != IGNORE_INDEX).sum())


def check_contents(batch: SessionBatch) -> None:
    assert batch.num_causal_targets == counted_targets(batch)  # the loader's count, made on the host
    for i, r in enumerate(rows_of(batch)):
        items, cats, prices = expected_row(r)
        assert batch.item_ids[i].tolist() == items, r
        assert batch.categorical["category-list"][i].tolist() == cats, r
        np.testing.assert_allclose(batch.continuous["price-list"][i].numpy(), prices, rtol=1e-6)


def same_batches(a: list[SessionBatch], b: list[SessionBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.item_ids, y.item_ids)
        assert x.categorical.keys() == y.categorical.keys() and x.continuous.keys() == y.continuous.keys()
        for k in x.categorical:
            assert torch.equal(x.categorical[k], y.categorical[k])
        for k in x.continuous:
            assert torch.equal(x.continuous[k], y.continuous[k])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    return write_rows(tmp_path_factory.mktemp("rows"), [4, 3, 6])  # 13 rows in 3 files


# --- contents --------------------------------------------------------------------------------


def test_engines_identical_without_shuffle(files):
    merlin = list(DataLoader(SPEC, files, 4, shuffle=False, engine="merlin"))
    pyarrow = list(DataLoader(SPEC, files, 4, shuffle=False, engine="pyarrow"))
    same_batches(merlin, pyarrow)
    assert [r for b in merlin for r in rows_of(b)] == list(range(13))  # file order, row order


@pytest.mark.parametrize("engine", ENGINES)
def test_right_padding_and_last_t_events(files, engine):
    batches = list(DataLoader(SPEC, files, 13, shuffle=False, engine=engine))
    assert len(batches) == 1
    batch = batches[0]
    check_contents(batch)
    # row 0 has 1 event, row 2 has 7 (> T): spelled out
    assert batch.item_ids[0].tolist() == [3, 0, 0, 0, 0]
    assert batch.item_ids[2].tolist() == [2005, 2006, 2007, 2008, 2009]
    assert batch.continuous["price-list"][0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.0])
    assert batch.lengths.tolist() == [min(row_length(r), T) for r in range(13)]
    assert batch.mask.tolist()[0] == [True, False, False, False, False]


@pytest.mark.parametrize("engine", ENGINES)
def test_shapes_and_dtypes(files, engine):
    loader = DataLoader(SPEC, files, 4, shuffle=False, engine=engine)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 3, 3, 3]  # 13 rows in ceil(13/4)=4 near-equal batches
    for b in batches:
        assert b.item_ids.shape == (len(b), T) and b.item_ids.dtype == torch.int64
        assert b.categorical["category-list"].shape == (len(b), T)
        assert b.categorical["category-list"].dtype == torch.int64
        assert b.continuous["price-list"].shape == (len(b), T)
        assert b.continuous["price-list"].dtype == torch.float32
        assert b.item_ids.device.type == "cpu"


def test_columns_missing_from_the_spec_are_not_loaded(files):
    spec = FeatureSpec(item_id="item_id-list", item_cardinality=1_000_000, max_sequence_length=3)
    (batch,) = list(DataLoader(spec, files, 13, shuffle=False, engine="pyarrow"))
    assert batch.categorical == {} and batch.continuous == {}
    assert batch.item_ids.shape == (13, 3)
    assert batch.item_ids[2].tolist() == [2007, 2008, 2009]


# --- shuffling -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_shuffle_changes_order_and_covers_every_row(files, engine):
    loader = DataLoader(SPEC, files, 4, shuffle=True, seed=3, engine=engine)
    epochs = []
    for _ in range(3):
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        for b in batches:
            check_contents(b)
        epochs.append([r for b in batches for r in rows_of(b)])
    for order in epochs:
        assert sorted(order) == list(range(13))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(13))
    # reproducible: the same seed and epoch give the same order
    again = DataLoader(SPEC, files, 4, shuffle=True, seed=3, engine=engine)
    assert [r for b in again for r in rows_of(b)] == epochs[0]
    again.set_epoch(1)
    assert [r for b in again for r in rows_of(b)] == epochs[1]
    other_seed = DataLoader(SPEC, files, 4, shuffle=True, seed=4, engine=engine)
    assert [r for b in other_seed for r in rows_of(b)] != epochs[0]


def test_no_shuffle_repeats_the_same_order(files):
    loader = DataLoader(SPEC, files, 5, shuffle=False, engine="pyarrow")
    first, second = [rows_of(b) for b in loader], [rows_of(b) for b in loader]
    assert first == second


# --- ranks -----------------------------------------------------------------------------------


RANK_CASES = [
    ([13], 2, 4),
    ([4, 3], 3, 2),  # 7 rows, 3 ranks: shares 3/2/2
    ([7], 3, 2),  # one file, fewer files than ranks
    ([5, 5, 1], 2, 3),
    ([2, 2, 2, 2, 2], 3, 3),
    ([1, 1, 1, 1], 3, 2),  # one row per file
    ([6], 3, 2),  # even split
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("rows_per_file, world_size, batch_size", RANK_CASES)
def test_ranks_equal_steps_and_cover_each_row_once(tmp_path, engine, shuffle, rows_per_file, world_size, batch_size):
    paths = write_rows(tmp_path, rows_per_file)
    total = sum(rows_per_file)
    loaders = [
        DataLoader(SPEC, paths, batch_size, shuffle=shuffle, seed=11, engine=engine, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    steps = {len(loader) for loader in loaders}
    assert len(steps) == 1, f"ranks disagree on the step count: {[len(x) for x in loaders]}"
    for _epoch in range(2):
        seen = Counter()
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                assert 0 < len(b) <= batch_size
                check_contents(b)
                seen.update(rows_of(b))
        assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}


@pytest.mark.parametrize("engine", ENGINES)
def test_files_are_read_in_natural_order_whatever_order_they_come_in(tmp_path, engine):
    """day=10 after day=2 (merlin's dask reader takes files so; the rank shares must index its
    order): the ranks' rows in sequence are every session once, in order, for any order of paths."""
    days, first = {}, 0
    for day, rows in [(1, 3), (2, 4), (10, 5)]:
        days[day] = write_rows(tmp_path / f"day={day}", [rows], first)
        first += rows
    lexicographic = days[1] + days[10] + days[2]
    as_paths = [Path(p) for p in days[10] + days[2] + days[1]]  # pathlib entries are taken too
    for paths in (lexicographic, days[10] + days[2] + days[1], as_paths):
        got = [[r for b in DataLoader(SPEC, paths, 4, shuffle=False, engine=engine, rank=k, world_size=2)
                for r in rows_of(b)] for k in range(2)]
        assert got == [list(range(6)), list(range(6, 12))], paths


@pytest.mark.parametrize("engine", ENGINES)
def test_rank_shares_are_contiguous_without_shuffle(tmp_path, engine):
    paths = write_rows(tmp_path, [4, 3])
    got = [
        [r for b in DataLoader(SPEC, paths, 2, shuffle=False, engine=engine, rank=k, world_size=3) for r in rows_of(b)]
        for k in range(3)
    ]
    assert got == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize("engine", ENGINES)
def test_drop_last(tmp_path, engine):
    paths = write_rows(tmp_path, [6, 5])  # 11 rows
    seen = Counter()
    loaders = [DataLoader(SPEC, paths, 2, shuffle=True, drop_last=True, engine=engine, rank=r, world_size=2)
               for r in range(2)]
    assert [len(x) for x in loaders] == [2, 2]  # (11 // 2) // 2
    for loader in loaders:
        batches = list(loader)
        assert [len(b) for b in batches] == [2, 2]
        seen.update(r for b in batches for r in rows_of(b))
    assert len(seen) == 8 and set(seen.values()) == {1}

    single = DataLoader(SPEC, paths, 4, shuffle=False, drop_last=True, engine=engine)
    assert [rows_of(b) for b in single] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(DataLoader(SPEC, paths, 4, shuffle=False, drop_last=False, engine=engine)) == 3


def test_batch_size_one_with_uneven_shares_is_rejected(tmp_path):
    """7 sessions over 3 ranks hold 3/2/2: equal step counts would give two ranks an empty batch."""
    paths = write_rows(tmp_path, [7])
    with pytest.raises(ValueError, match="drop_last"):
        DataLoader(SPEC, paths, 1, shuffle=False, engine="pyarrow", rank=1, world_size=3)
    # even shares, or drop_last, are fine
    loaders = [DataLoader(SPEC, paths, 1, drop_last=True, engine="pyarrow", rank=r, world_size=3) for r in range(3)]
    assert [len(x) for x in loaders] == [2, 2, 2]
    assert all(len(b) == 1 for x in loaders for b in x)
    six = write_rows(tmp_path / "six", [6])
    assert [len(list(DataLoader(SPEC, six, 1, engine="pyarrow", rank=r, world_size=3))) for r in range(3)] == [2, 2, 2]


def test_fewer_rows_than_ranks(tmp_path):
    paths = write_rows(tmp_path, [2])
    with pytest.raises(ValueError, match="2 sessions cannot feed 3 workers"):
        DataLoader(SPEC, paths, 4, engine="pyarrow", rank=0, world_size=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"engine": "ray"}, "engine='ray'"),
        ({"paths": []}, "no parquet files"),
        ({"batch_size": 20, "drop_last": True}, "no full batch of 20"),
    ],
)
def test_bad_arguments(files, kwargs, match):
    args = {"spec": SPEC, "paths": files, "batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        DataLoader(**args)


def test_rank_row_range():
    for total, world in itertools.product([1, 2, 7, 10, 13], [1, 2, 3, 4]):
        if total < world:
            continue
        ranges = [rank_row_range(total, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_pad_rows():
    column = RaggedColumn(values=torch.tensor([1, 2, 3, 4, 5, 6]), offsets=torch.tensor([0, 2, 2, 6]))
    # rows: [1, 2], [], [3, 4, 5, 6]
    out = pad_rows(column, torch.tensor([2, 0, 1]), 3, torch.int64)
    assert out.tolist() == [[4, 5, 6], [1, 2, 0], [0, 0, 0]]
    assert pad_rows(column, torch.tensor([0]), 3, torch.float32).dtype == torch.float32


def test_causal_target_counts_are_what_causal_targets_labels():
    """Counted from the ragged column, per row: rows longer than T (their dropped events count for
    nothing), empty rows, one-event rows, and reserved ids (null 1, OOV 2) that are never targets,
    first, last and in the middle of a kept window."""
    rows = [[5, 6, 7], [], [9], [1, 2, 5, 1], [4, 5, 6, 7, 8, 9, 10], [2, 3, 4, 5, 6, 1, 7], [3, 1, 4, 2, 5, 2]]
    column = ragged_from_arrow(pa.array(rows, pa.list_(pa.int64())))
    for length in (1, 2, 3, 5, 8):
        padded = pad_rows(column, torch.arange(len(rows)), length, torch.int64)
        expected = (causal_targets(padded) != IGNORE_INDEX).sum(dim=1)
        assert causal_target_counts(column, length).tolist() == expected.tolist(), length
    assert causal_target_counts(column, 3).tolist() == [2, 0, 0, 1, 2, 1, 1]  # last 3 events


def test_batches_carry_their_causal_target_count_through_to_but_not_select(files):
    batch = next(iter(DataLoader(SPEC, files, 4, shuffle=False)))
    assert batch.num_causal_targets == counted_targets(batch) == 8  # 0 + 3 + 4 + 1: rows of 1, 4, 7 (5 kept), 2 events
    assert batch.to("cpu").num_causal_targets == 8
    assert batch.select(slice(0, 2)).num_causal_targets is None  # not known for a subset


ROWS = [[1, 2, 3], [4], [], [5, 6]]


@pytest.mark.parametrize("make", [
    lambda: pa.array(ROWS, pa.list_(pa.int64())),
    lambda: pa.array(ROWS, pa.large_list(pa.int64())),
    lambda: pa.chunked_array([pa.array(ROWS[:1], pa.list_(pa.int64())), pa.array(ROWS[1:], pa.list_(pa.int64()))]),
    lambda: pa.array([[0, 0]] + ROWS, pa.list_(pa.int64())).slice(1),  # values start past offset 0
], ids=["list", "large_list", "chunked", "sliced"])
def test_ragged_from_arrow(make):
    column = ragged_from_arrow(make())
    assert column.values.tolist() == [1, 2, 3, 4, 5, 6]
    assert column.offsets.tolist() == [0, 3, 4, 4, 6]
    assert pad_rows(column, torch.tensor([3, 2, 0]), 2, torch.int64).tolist() == [[5, 6], [0, 0], [2, 3]]


def test_ragged_from_arrow_fixed_size_rows():
    """A non-list column (fixed-size lists here) is read row by row."""
    column = ragged_from_arrow(pa.array([[1, 2], [3, 4]], pa.list_(pa.int64(), 2)))
    assert column.values.tolist() == [1, 2, 3, 4] and column.offsets.tolist() == [0, 2, 4]


@pytest.mark.ray
def test_ragged_from_arrow_reads_ray_datas_in_memory_columns(ray_cluster):
    """What the Ray engine meets in a user's in-memory Ray Dataset: tensor columns (fixed and
    variable shape) and lists."""
    import ray

    datasets = {
        "fixed-shape tensor": ray.data.from_numpy(np.array([[1, 2], [3, 4]])).rename_columns({"data": "x"}),
        "variable-shape tensor": ray.data.from_items([{"x": np.array([1, 2, 3])}, {"x": np.array([4])}]),
        "list": ray.data.from_pandas(pd.DataFrame({"x": [[1, 2, 3], [4]]})),
    }
    offsets = {"fixed-shape tensor": [0, 2, 4], "variable-shape tensor": [0, 3, 4], "list": [0, 3, 4]}
    for name, ds in datasets.items():
        table = next(iter(ds.iter_batches(batch_size=10, batch_format="pyarrow")))
        check_no_nulls("x", table.column("x"))  # what the Ray engine checks first
        column = ragged_from_arrow(table.column("x"))
        assert column.values.tolist() == [1, 2, 3, 4] and column.offsets.tolist() == offsets[name], name


# --- the prepared synthetic dataset ----------------------------------------------------------


@pytest.mark.ray
def test_prepared_data_both_engines_and_ranks(prepared_dir, prepared_schema, prepared_spec):
    from raytr.data.layout import day_paths

    paths = day_paths(prepared_dir)
    merlin = list(DataLoader.from_schema(prepared_schema, paths, 128, shuffle=False, engine="merlin"))
    pyarrow = list(DataLoader.from_schema(prepared_spec, paths, 128, shuffle=False, engine="pyarrow"))
    same_batches(merlin, pyarrow)

    # the batches are the prepared rows, in file order, padded to T
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    length = prepared_spec.max_sequence_length
    items = torch.cat([b.item_ids for b in pyarrow])
    assert items.shape == (len(frame), length)
    expected = torch.tensor([list(v) + [0] * (length - len(v)) for v in frame[prepared_spec.item_id]])
    assert torch.equal(items, expected)
    prices = torch.cat([b.continuous["price-list"] for b in pyarrow])
    first_price = torch.tensor([float(v[0]) for v in frame["price-list"]], dtype=torch.float32)
    assert torch.allclose(prices[:, 0], first_price)

    # two ranks, in order, are the two halves of the same rows
    for engine in ENGINES:
        halves = [
            torch.cat([b.item_ids for b in DataLoader(prepared_spec, paths, 128, shuffle=False, engine=engine,
                                                      rank=r, world_size=2)])
            for r in range(2)
        ]
        assert torch.equal(torch.cat(halves), expected), engine


# --- id ranges, checked once per loader ------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_ids_beyond_the_cardinality_are_rejected_at_load_naming_column_and_file(files, engine):
    small = FeatureSpec(item_id="item_id-list", item_cardinality=1_000_000, max_sequence_length=T,
                        categorical={"category-list": 5}, continuous=("price-list",))  # the files hold 3..6
    # the first bad id in the files' order: session 1's categories are 4, 5, 6, 3
    with pytest.raises(ValueError, match=r"^column 'category-list' has id 5 in \S*part-000\.parquet "
                                         r"\(row 1, 0-based\): its cardinality is 5 "):
        DataLoader(small, files, 4, engine=engine)


def test_batches_carry_the_spec_their_ids_were_checked_against(files):
    batch = next(iter(DataLoader(SPEC, files, 4)))
    assert batch.ids_checked == SPEC
    assert batch.select(slice(0, 2)).ids_checked == SPEC and batch.to("cpu").ids_checked == SPEC


def test_without_equal_steps_each_rank_runs_its_own_share_even_an_empty_one(prepared_dir, prepared_spec):
    """Evaluation meets the other ranks only to reduce its metrics: 3 sessions over 4 ranks, or
    batches of 1 over uneven shares, are fine there (training refuses both)."""
    paths = sorted(str(p) for p in (Path(prepared_dir) / "sessions" / "day=1").glob("*.parquet"))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    seen = 0
    for rank in range(total + 1):  # one rank more than sessions: the last one holds none
        loader = DataLoader(prepared_spec, paths, 1, shuffle=False, engine="pyarrow", rank=rank,
                            world_size=total + 1, equal_steps=False)
        batches = list(loader)
        assert len(batches) == len(loader) == (0 if rank == total else 1)
        seen += sum(len(b.item_ids) for b in batches)
    assert seen == total
    with pytest.raises(ValueError, match=f"{total} sessions cannot feed {total + 1} workers"):
        DataLoader(prepared_spec, paths, 1, shuffle=False, engine="pyarrow", rank=0, world_size=total + 1)
    uneven = [len(list(DataLoader(prepared_spec, paths, 1, shuffle=False, engine="merlin", rank=r, world_size=2,
                                  equal_steps=False))) for r in range(2)]
    assert sum(uneven) == total and sorted(uneven) == [total // 2, total - total // 2]


def set_value(path: str, column: str, row: int, value, index: int | None = None) -> None:
    """Rewrite `path` with row `row` of the list column `column` replaced by `value` (a whole list, or
    None), or only its element `index` replaced, keeping the column's type."""
    table = pq.read_table(path)
    rows = table.column(column).to_pylist()
    if index is None:
        rows[row] = value
    else:
        rows[row][index] = value
    field = table.schema.get_field_index(column)
    pq.write_table(table.set_column(field, column, pa.array(rows, table.schema.field(column).type)), path)


@pytest.mark.parametrize("engine", ENGINES)
def test_ids_beyond_the_cardinality_name_the_file_and_row_that_hold_them(tmp_path, engine):
    paths = write_rows(tmp_path, [4, 3, 6])
    set_value(paths[2], "item_id-list", 2, 1_000_000, index=0)
    with pytest.raises(ValueError, match=r"^column 'item_id-list' has id 1000000 in \S*part-002\.parquet \(row 2, "
                                         r"0-based\): its cardinality is 1000000 \(valid ids 0\.\.999999\)"):
        DataLoader(SPEC, paths, 4, engine=engine)
    # a rank's share that does not hold the row loads: each rank checks the rows it reads
    assert len(DataLoader(SPEC, paths, 2, engine=engine, rank=0, world_size=2)) == 4


NULLS = {  # (column, row of part-001, element or None for the whole list, expected message)
    "id": ("item_id-list", 1, 2, r"^column 'item_id-list' holds null values in \S*part-001\.parquet \(row 1, "),
    "categorical": ("category-list", 0, 0, r"^column 'category-list' holds null values in \S*part-001\.parquet"),
    # merlin reads a null as NaN, and cannot tell one from a NaN in the file
    "continuous": ("price-list", 2, 1, r"^column 'price-list' holds null (or NaN )?values in \S*part-001\.parquet "
                                       r"\(row 2, "),
    "null list": ("category-list", 1, None,
                  r"^column 'category-list' holds a null list \(a session without its events\) in \S*part-001\.parquet "
                  r"\(row 1, 0-based\)"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", NULLS)
def test_nulls_are_refused_naming_column_file_and_row(tmp_path, engine, case):
    """A null id would be padded to -2^63 (an IndexError in the model), a null price would make the
    loss NaN, a null list would be an empty session in one engine and a TypeError in another."""
    column, row, index, match = NULLS[case]
    paths = write_rows(tmp_path, [4, 3, 6])
    set_value(paths[1], column, row, None, index=index)
    with pytest.raises(ValueError, match=match):
        DataLoader(SPEC, paths, 4, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_in_a_continuous_list_is_refused(tmp_path, engine):
    """merlin reads a null as NaN: a NaN in the file is refused alike by every engine."""
    paths = write_rows(tmp_path, [4, 3])
    set_value(paths[0], "price-list", 3, float("nan"), index=0)
    with pytest.raises(ValueError, match=r"^column 'price-list' holds null or NaN values in \S*part-000\.parquet "
                                         r"\(row 3, "):
        DataLoader(SPEC, paths, 4, engine=engine)


def cast_lists(path: str, types: dict[str, pa.DataType]) -> None:
    table = pq.read_table(path)
    for name, value_type in types.items():
        field = table.schema.get_field_index(name)
        table = table.set_column(field, name, table.column(name).cast(pa.list_(value_type)))
    pq.write_table(table, path)


@pytest.mark.parametrize("engine", ENGINES)
def test_list_types_may_differ_between_files(tmp_path, engine):
    """int32 and float32 lists in one file beside int64 and double in another (other writers than
    prepare), and float ids holding whole numbers: the batches are those of the int64 files."""
    expected = list(DataLoader(SPEC, write_rows(tmp_path / "int64", [4, 3, 6]), 4, shuffle=False, engine=engine))
    paths = write_rows(tmp_path / "mixed", [4, 3, 6])
    cast_lists(paths[1], {"item_id-list": pa.int32(), "category-list": pa.int32(), "price-list": pa.float32()})
    cast_lists(paths[2], {"item_id-list": pa.float64()})
    same_batches(list(DataLoader(SPEC, paths, 4, shuffle=False, engine=engine)), expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_float_ids_that_are_not_whole_numbers_are_refused(tmp_path, engine):
    (path,) = write_rows(tmp_path, [4])
    cast_lists(path, {"category-list": pa.float64()})
    set_value(path, "category-list", 2, 4.5, index=1)
    with pytest.raises(ValueError, match=r"^column 'category-list' holds the non-integer id 4\.5 in "
                                         r"\S*part-000\.parquet \(row 2, 0-based\)"):
        DataLoader(SPEC, [path], 4, engine=engine)


def test_a_file_given_twice_is_refused_naming_it(files, monkeypatch):
    """Its sessions would be trained on twice an epoch and counted twice in the metrics."""
    with pytest.raises(ValueError, match=r"^data file \S*part-000\.parquet is given twice"):
        DataLoader(SPEC, [files[0], files[1], files[0]], 4, engine="pyarrow")
    monkeypatch.chdir(Path(files[0]).parent)  # the same file by a relative path
    with pytest.raises(ValueError, match="part-001.parquet is given twice"):
        DataLoader(SPEC, [*files, "part-001.parquet"], 4, engine="pyarrow")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bad_value_in_a_ranks_share_is_named_by_its_row_in_the_file(tmp_path, engine):
    """Rank 1 of 2 reads rows 4..6 of one 7-row file (a slice): row 5 is row 5 of the file."""
    (path,) = write_rows(tmp_path, [7])
    set_value(path, "item_id-list", 5, None, index=1)
    with pytest.raises(ValueError, match=r"^column 'item_id-list' holds null values in \S*part-000\.parquet \(row 5, "):
        DataLoader(SPEC, [path], 2, engine=engine, rank=1, world_size=2)


def test_merlin_names_a_null_list_it_meets_outside_the_ranks_share(tmp_path):
    """merlin reads whole files and fails on a null list anywhere in them: rank 0 of 2 (rows 0..3
    of one 7-row file) names the null list in row 5 too, where PyArrow reads only its share."""
    (path,) = write_rows(tmp_path, [7])
    set_value(path, "category-list", 5, None)
    with pytest.raises(ValueError, match=r"^column 'category-list' holds a null list .* in \S*part-000\.parquet "
                                         r"\(row 5, "):
        DataLoader(SPEC, [path], 2, engine="merlin", rank=0, world_size=2)
    assert len(DataLoader(SPEC, [path], 2, engine="pyarrow", rank=0, world_size=2)) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_a_file_without_a_column_the_model_reads_is_named(files, tmp_path, engine):
    """The loaders check the files' footers themselves (merlin had raised a KeyError, pyarrow an
    ArrowInvalid, where a caller had not checked them first)."""
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(pq.read_table(files[0]).drop_columns(["price-list"]), lacking)
    with pytest.raises(ValueError, match=r"lacking\.parquet has no column 'price-list', which the model reads"):
        DataLoader(SPEC, [files[1], str(lacking)], 4, engine=engine)
    (tmp_path / "notes.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"notes\.parquet is not a parquet file"):
        DataLoader(SPEC, [str(tmp_path / "notes.parquet")], 4, engine=engine)
