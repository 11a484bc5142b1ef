"""Paths handed to Ray workers are absolute: workers do not run in the caller's directory."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raytr.data.prepare import day_paths
from raytr.training.trainer import resolve_paths


def _prepared_layout(root: Path) -> None:
    for day in (1, 2):
        part = root / "sessions" / f"day={day}" / "part-00000.parquet"
        part.parent.mkdir(parents=True)
        pq.write_table(pa.table({"x": [day]}), part)


def test_relative_inputs_resolve_to_absolute_paths(tmp_path, monkeypatch):
    _prepared_layout(tmp_path / "prepared")
    monkeypatch.chdir(tmp_path)
    for paths in (resolve_paths("prepared"), resolve_paths(["prepared/sessions/day=1"]), day_paths("prepared", [2])):
        assert paths and all(os.path.isabs(p) for p in paths), paths
        assert all(Path(p).is_file() for p in paths)
    assert day_paths("prepared") == resolve_paths("prepared")
