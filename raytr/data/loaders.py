"""Batches of padded session tensors from prepared parquet, for one rank of W.

    files --(reader: "merlin" merlin-dataloader, or "pyarrow")--> resident ragged columns
          --(epoch plan: shuffle, equal step count per rank)-----> row indices per batch
          --(gather + right-pad on the target device)------------> SessionBatch [B, T]

Files are local paths or fsspec URLs (raytr.storage), read in place and in natural order (day=2
before day=10) whatever order they are given in. The reader loads this rank's
contiguous share of the rows once (W shares differ by at most one row); the columns stay resident
as (values, offsets), on the GPU when `device` is one, and each batch is gathered and padded there. Every rank runs the same number of steps per epoch
(`steps_per_epoch`, computed from the global row count), every row of the rank's share is seen
exactly once per epoch, and the order changes every epoch (seeded by seed, epoch and rank). Each
batch carries its next-item target count, summed on the host from per-session counts made at load
(`causal_target_counts`), so that a training step never reads it back from the GPU. The columns
are checked once at load: a null, a NaN or an id outside its cardinality is a ValueError naming the
column, the file and its row (`check_no_nulls`, `check_column_values`); so is a file given twice.

Example (B=2, T=4, item ids after Categorify; sessions longer than T keep their last T events):
    session events [5, 9, 3]       -> item_ids[0] = [5, 9, 3, 0]
    session events [8, 7, 2, 6, 4] -> item_ids[1] = [7, 2, 6, 4]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raytr import storage
from raytr.features import FIRST_ITEM_ID, FeatureSpec, SessionBatch, check_id_ranges

log = logging.getLogger(__name__)

Engine = Literal["merlin", "pyarrow"]

NULL_ADVICE = ("`raytr prepare` writes a missing id as 1 and a missing continuous value as 0: prepare the "
               "sessions with it, or fill the nulls")


class BadValuesError(ValueError):
    """A value of `column` that no batch may hold (a null, a NaN, an id that is not one), found at
    `row` of the rows a reader read: `located` names the file that row came from, which only the
    reader's caller knows."""

    def __init__(self, column: str, problem: str, advice: str, row: int) -> None:
        self.column, self.problem, self.advice, self.row = column, problem, advice, row
        super().__init__(f"column {column!r} {problem}: {advice}")

    def located(self, where: str, row: int | None = None) -> ValueError:
        """The same error as one line naming `where` (a file) and the `row` there."""
        at = f" in {where}" + ("" if row is None else f" (row {row}, 0-based)")
        return ValueError(f"column {self.column!r} {self.problem}{at}: {self.advice}")


@dataclass
class RaggedColumn:
    values: torch.Tensor  # [total events]
    offsets: torch.Tensor  # [rows + 1] int64

    def to(self, device: torch.device | str) -> "RaggedColumn":
        return RaggedColumn(self.values.to(device), self.offsets.to(device))


def row_counts(files: Sequence[str]) -> list[int]:
    """Rows (sessions) of each parquet file, from its footer (local or remote storage)."""
    return [storage.parquet_file(f).metadata.num_rows for f in files]


def check_session_files(spec: FeatureSpec, paths: Sequence[str]) -> list[int]:
    """The rows of each session file, refusing, naming the file, a path that is not a parquet file
    or lacks a column the model reads (`spec.columns`): only the files' footers are read."""
    counts = []
    for path in paths:
        try:
            meta = storage.parquet_file(path).metadata
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(f"{path} is not a parquet file ({error}): pass a `raytr prepare` output or its "
                             "sessions' parquet files") from None
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in spec.columns if c not in names]
        if missing:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"{path} has no column {', '.join(map(repr, missing))}, which the model reads (the "
                             f"file has: {shown}): pass sessions prepared with the model's data config")
        counts.append(meta.num_rows)
    return counts


def rank_row_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous share [start, stop) of `total` rows for `rank`; shares differ by at most one."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_no_nulls(name: str, column: pa.Array | pa.ChunkedArray) -> None:
    """Raise BadValuesError for a null list (a session row without its list) or a null in a list:
    `ragged_from_arrow` would make the first an empty session and the second a NaN, which int64
    padding turns into -2^63. Arrow keeps null counts, so a column without nulls costs nothing."""
    if column.null_count:
        row = pc.index(column.is_null(), True).as_py()
        raise BadValuesError(name, "holds a null list (a session without its events)",
                             "write the session's events, or leave the session out", row)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        return  # e.g. Ray Data's tensor columns, which hold no nulls
    values = pc.list_flatten(column)  # the column's own rows only, also of a slice
    if values.null_count:
        if isinstance(column, pa.ChunkedArray):
            column, values = column.combine_chunks(), values.combine_chunks()
        first = pc.index(values.is_null(), True).as_py()
        raise BadValuesError(name, "holds null values", NULL_ADVICE, pc.list_parent_indices(column)[first].as_py())


def _read_pyarrow(files: Sequence[str], counts: Sequence[int], columns: Sequence[str], start: int,
                  stop: int) -> dict[str, RaggedColumn]:
    """Rows [start, stop) of `files` (whose row counts are `counts`), read with PyArrow."""
    tables, seen = [], 0
    for file, rows in zip(files, counts):
        lo, hi = max(start - seen, 0), min(stop - seen, rows)
        if lo < hi:
            tables.append(storage.read_table(file, columns).slice(lo, hi - lo))
        seen += rows
    # Files from other writers than prepare may hold list<int32> or list<float> beside list<int64>
    # or list<double>: widened to the wider type (merlin and Ray Data accept them too).
    table = pa.concat_tables(tables, promote_options="permissive")
    for name in columns:
        check_no_nulls(name, table.column(name))
    return {name: ragged_from_arrow(table.column(name)) for name in columns}


def ragged_from_arrow(column: pa.Array | pa.ChunkedArray) -> RaggedColumn:
    """An Arrow list column as (values, offsets), without a Python loop over rows. Other column
    types (e.g. Ray Data's tensor columns of an in-memory dataset) are converted row by row first."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.int64()))
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        column = pa.array([np.asarray(row).reshape(-1) for row in column.to_numpy(zero_copy_only=False)])
    offsets = np.asarray(column.offsets, dtype=np.int64)
    # `.values` ignores the slice: a sliced array's rows start at values[offsets[0]], not 0.
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
    return RaggedColumn(torch.from_numpy(np.array(values)), torch.from_numpy(offsets - offsets[0]))


def _read_merlin(files: Sequence[str], counts: Sequence[int], columns: Sequence[str], start: int,
                 stop: int) -> dict[str, RaggedColumn]:
    """Read with merlin-dataloader (cuDF on GPU when installed, pandas otherwise), no shuffle, one
    pass; merlin yields ragged lists as `name__values` / `name__offsets`."""
    from merlin.dataloader.torch import Loader
    from merlin.io import Dataset

    bounds = np.concatenate([[0], np.cumsum(counts)])
    chosen = [i for i in range(len(files)) if bounds[i] < stop and bounds[i + 1] > start]
    skip = start - int(bounds[chosen[0]])
    take = stop - start
    dataset = Dataset([files[i] for i in chosen], engine="parquet")
    dataset.schema = dataset.schema.select_by_name(list(columns))
    values: dict[str, list[torch.Tensor]] = {c: [] for c in columns}
    lengths: dict[str, list[torch.Tensor]] = {c: [] for c in columns}
    try:
        with Loader(dataset, batch_size=65_536, shuffle=False) as loader:
            for inputs, _ in loader:
                for name in columns:
                    vals, offs = inputs[f"{name}__values"], inputs[f"{name}__offsets"]
                    values[name].append(vals.reshape(-1).cpu())
                    lengths[name].append((offs[1:] - offs[:-1]).cpu().to(torch.int64))
    except TypeError:
        # merlin fails on a null list with "'NoneType' object is not iterable": read the rows it
        # read (the chosen files, whole) with PyArrow, which raises the BadValuesError naming the
        # column and row; else the TypeError was not that.
        first = int(bounds[chosen[0]])
        try:
            _read_pyarrow(files, counts, columns, first, int(bounds[chosen[-1] + 1]))
        except BadValuesError as err:
            err.row += first - start  # numbered from `start`, as the caller maps rows to files
            raise
        raise
    out = {}
    for name in columns:
        lens = torch.cat(lengths[name])[skip: skip + take]
        all_vals = torch.cat(values[name])
        all_lens = torch.cat(lengths[name])
        first = int(all_lens[:skip].sum())
        vals = all_vals[first: first + int(lens.sum())]
        offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=offsets[1:])
        out[name] = RaggedColumn(vals, offsets)
    return out


def pad_rows(column: RaggedColumn, rows: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Gather `rows` of a ragged column into a right-padded [len(rows), length] tensor, keeping each
    row's last `length` values (all on the column's device)."""
    starts, ends = column.offsets[rows], column.offsets[rows + 1]
    starts = torch.maximum(starts, ends - length)  # keep the last `length` events
    steps = torch.arange(length, device=rows.device)
    index = starts[:, None] + steps[None, :]  # [B, T]
    valid = index < ends[:, None]
    if column.values.numel() == 0:
        return torch.zeros(len(rows), length, dtype=dtype, device=rows.device)
    # index_select on the flat index: ~1.8x faster than advanced indexing with a 2-D index on CPU.
    flat = index.clamp(max=column.values.numel() - 1).view(-1)
    gathered = column.values.index_select(0, flat).view(index.shape).to(dtype)
    return torch.where(valid, gathered, torch.zeros((), dtype=dtype, device=rows.device))


def causal_target_counts(items: RaggedColumn, length: int) -> torch.Tensor:
    """[rows] int64: how many positions of each row's padded sequence (its last `length` events)
    have a next-item target, i.e. a next event that is a real item (id >= FIRST_ITEM_ID): the
    positions `raytr.models.masking.causal_targets` labels. Counted from the ragged item column in
    one pass over its values; the loaders do it on the host, so a batch's count costs no GPU read."""
    predictable = torch.zeros(items.values.numel() + 1, dtype=torch.int64, device=items.values.device)
    torch.cumsum(items.values >= FIRST_ITEM_ID, 0, out=predictable[1:])
    starts, ends = items.offsets[:-1], items.offsets[1:]
    kept = torch.maximum(starts, ends - length)  # the first event kept; it is nobody's target
    return predictable[ends] - predictable[torch.minimum(kept + 1, ends)]


def _first_bad(column: RaggedColumn, bad: torch.Tensor) -> tuple[int, float]:
    """(row, value) of the first True of `bad`, a mask over the column's values (an error path)."""
    index = int(bad.nonzero()[0, 0])
    row = int(np.searchsorted(column.offsets.cpu().numpy(), index, side="right")) - 1
    return row, column.values[index].item()


def check_column_values(spec: FeatureSpec, columns: dict[str, RaggedColumn]) -> None:
    """Every value of the spec's columns one the model can take, else BadValuesError naming the
    column and the first bad row: no NaN (merlin reads a null as NaN), and ids (float in files of
    other writers, or with merlin's nulls) whole numbers within their cardinality. Vectorised over
    whole columns, two host syncs in all; int id columns (prepare's) cost only their min and max.
    Batches gathered from checked columns skip the model's per-step id check."""
    ids = {spec.item_id: spec.item_cardinality, **spec.categorical}
    floats = [n for n in spec.columns if columns[n].values.is_floating_point() and columns[n].values.numel()]

    def bad_values(name: str) -> torch.Tensor:
        values = columns[name].values
        # ids: NaN or a fraction (NaN != NaN); an infinite id is left to the range check
        return values != values.trunc() if name in ids else values.isnan()

    # continuous: min propagates NaN (one reduction, ~3x faster than a mask)
    flagged = torch.stack([bad_values(n).any() if n in ids else columns[n].values.min().isnan()
                           for n in floats]).tolist() if floats else []
    for name in (n for n, bad in zip(floats, flagged) if bad):
        row, value = _first_bad(columns[name], bad_values(name))
        if name not in ids:
            raise BadValuesError(name, "holds null or NaN values", NULL_ADVICE, row)
        if math.isnan(value):
            raise BadValuesError(name, "holds null values", NULL_ADVICE, row)
        raise BadValuesError(name, f"holds the non-integer id {value:g}",
                             "ids are whole numbers: encode the column with the workflow of `raytr prepare`", row)
    try:
        check_id_ranges({n: columns[n].values for n in ids}, ids)
    except ValueError:
        for name, cardinality in ids.items():  # the column it names (the first bad one) and its first bad row
            values = columns[name].values
            bad = (values < 0) | (values >= cardinality)
            if bad.any():
                row, value = _first_bad(columns[name], bad)
                raise BadValuesError(name, f"has id {value}",
                                     f"its cardinality is {cardinality} (valid ids 0..{cardinality - 1}); the data "
                                     "was encoded with a different workflow than this model", row) from None
        raise


def gather_batch(spec: FeatureSpec, columns: dict[str, RaggedColumn], rows: torch.Tensor,
                 num_causal_targets: int | None = None) -> SessionBatch:
    """Rows of checked ragged columns (`check_column_values`) as a padded [B, T] SessionBatch, on the
    columns' device; `num_causal_targets`: the rows' `causal_target_counts` summed on the host."""
    length = spec.max_sequence_length
    return SessionBatch(
        item_ids=pad_rows(columns[spec.item_id], rows, length, torch.int64),
        categorical={n: pad_rows(columns[n], rows, length, torch.int64) for n in spec.categorical},
        continuous={n: pad_rows(columns[n], rows, length, torch.float32) for n in spec.continuous},
        ids_checked=spec,
        num_causal_targets=num_causal_targets,
    )


def gather_batches(spec: FeatureSpec, columns: dict[str, RaggedColumn], causal_targets: torch.Tensor,
                   order: torch.Tensor, sizes: int | list[int]) -> Iterator[SessionBatch]:
    """Consecutive batches of the host tensor `order`'s rows (`sizes`: rows per batch, or each batch's
    rows, as torch.split takes them), gathered from the columns on their device (where the order is
    copied once, not once per batch), each with its rows' `causal_targets` (the per-row counts, on
    the host) summed on the host."""
    device = columns[spec.item_id].values.device
    for host_rows, rows in zip(torch.split(order, sizes), torch.split(order.to(device), sizes)):
        yield gather_batch(spec, columns, rows, int(causal_targets[host_rows].sum()))


def check_distinct_paths(paths: Sequence[str]) -> None:
    """Refuse a file given twice (by any spelling of its path): its sessions would be trained on
    twice an epoch and counted twice in the metrics."""
    seen: set[str] = set()
    for path in paths:
        key = storage.normalize(path)
        if key in seen:
            raise ValueError(f"data file {path} is given twice: its sessions would be read twice; pass each file "
                             "once (a prepared directory already holds all its days' files)")
        seen.add(key)


class DataLoader:
    """Iterates `SessionBatch`es for one rank; see the module docstring for the guarantees."""

    def __init__(
        self,
        spec: FeatureSpec,
        paths: Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        engine: Engine = "merlin",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        equal_steps: bool = True,
    ) -> None:
        """`equal_steps`: every rank runs `steps_per_epoch` steps, as DDP training needs; False gives
        each rank the steps of its own share, none for an empty one (evaluation, which meets the
        other ranks only once, to reduce its metrics)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if engine not in ("merlin", "pyarrow"):
            raise ValueError(f"engine={engine!r}: expected 'merlin' or 'pyarrow' (Ray Data has its own path)")
        # One global row order for every engine and rank: merlin's dask reader takes files in natural
        # order whatever order they come in, and the ranks' row ranges must index that order.
        paths = sorted(map(str, paths), key=storage.natural_sort_key)  # Path entries too
        if not paths:
            raise ValueError("no parquet files to load: the data path is empty")
        check_distinct_paths(paths)
        self.spec, self.batch_size, self.shuffle, self.drop_last = spec, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.epoch = 0
        counts = check_session_files(spec, paths)  # a file without a column the model reads: named here
        self.total_rows = sum(counts)
        if self.total_rows < world_size and equal_steps:
            raise ValueError(f"{self.total_rows} sessions cannot feed {world_size} workers: need at least one each")
        start, stop = rank_row_range(self.total_rows, rank, world_size)
        self.num_rows = stop - start
        self.columns: dict[str, RaggedColumn] = {}
        if self.num_rows:
            reader = _read_merlin if engine == "merlin" else _read_pyarrow
            try:
                columns = reader(paths, counts, spec.columns, start, stop)
                # Per session, on the host: each batch's CLM target count without reading the GPU.
                self.causal_targets = causal_target_counts(columns[spec.item_id], spec.max_sequence_length)
                self.columns = {name: col.to(self.device) for name, col in columns.items()}
                # Checked once here, on the resident columns, so that batches skip the per-step check.
                check_column_values(spec, self.columns)
            except BadValuesError as err:
                # The bad row among this rank's rows -> the file that holds it, by the files' row counts.
                row, ends = start + err.row, np.cumsum(counts)
                file = int(np.searchsorted(ends, row, side="right"))
                raise err.located(paths[file], row - int(ends[file] - counts[file])) from None
        if not equal_steps:
            self.steps_per_epoch = self.num_rows // batch_size if drop_last else math.ceil(self.num_rows / batch_size)
            return
        per_rank = math.ceil(self.total_rows / world_size)  # the largest share
        if drop_last:
            self.steps_per_epoch = (self.total_rows // world_size) // batch_size
        else:
            self.steps_per_epoch = math.ceil(per_rank / batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.total_rows} sessions over {world_size} worker(s) make no full batch of {batch_size}")
        if self.steps_per_epoch > self.total_rows // world_size:
            # Only batch_size=1 with uneven shares: the smaller shares cannot fill every step.
            raise ValueError(
                f"batch_size={batch_size} with {self.total_rows} sessions over {world_size} workers: some "
                f"workers hold {self.total_rows // world_size} sessions but every worker must run "
                f"{self.steps_per_epoch} steps; use drop_last=True or batch_size >= 2"
            )

    @classmethod
    def from_schema(cls, schema, paths: Sequence[str], batch_size: int, **kwargs) -> "DataLoader":
        """Build from a Merlin schema (or a FeatureSpec) and parquet paths."""
        from raytr.data.schema import feature_spec

        spec = schema if isinstance(schema, FeatureSpec) else feature_spec(schema)
        return cls(spec, paths, batch_size, **kwargs)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        """This epoch's rows, in the order batches take them (on the host)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919 + self.rank)
            order = torch.randperm(self.num_rows, generator=gen)
        else:
            order = torch.arange(self.num_rows)
        if self.drop_last:
            order = order[: self.steps_per_epoch * self.batch_size]
        return order

    def __iter__(self) -> Iterator[SessionBatch]:
        order = self._order()
        if self.shuffle:
            self.epoch += 1
        if self.steps_per_epoch == 0:  # an empty share (equal_steps=False)
            return
        # Near-equal batches: every rank gets exactly steps_per_epoch non-empty batches.
        sizes = [len(rows) for rows in torch.tensor_split(order, self.steps_per_epoch)]
        yield from gather_batches(self.spec, self.columns, self.causal_targets, order, sizes)
