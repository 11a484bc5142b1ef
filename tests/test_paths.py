"""Paths handed to Ray workers are absolute: workers do not run in the caller's directory."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytr.data.layout import day_paths
from raytr.training.trainer import resolve_paths


def _prepared_layout(root: Path) -> None:
    for day in (1, 2):
        part = root / "sessions" / f"day={day}" / "part-00000.parquet"
        part.parent.mkdir(parents=True)
        pq.write_table(pa.table({"x": [day]}), part)


def _prepared_dataset(root: Path) -> None:
    _prepared_layout(root)
    (root / "prepare.json").write_text("{}")


def test_relative_inputs_resolve_to_absolute_paths(tmp_path, monkeypatch):
    _prepared_dataset(tmp_path / "prepared")
    monkeypatch.chdir(tmp_path)
    for paths in (resolve_paths("prepared"), resolve_paths(["prepared/sessions/day=1"]), day_paths("prepared", [2])):
        assert paths and all(os.path.isabs(p) for p in paths), paths
        assert all(Path(p).is_file() for p in paths)
    assert day_paths("prepared") == resolve_paths("prepared")


def test_an_interrupted_prepare_is_refused(tmp_path):
    from raytr.data.layout import available_days

    _prepared_layout(tmp_path / "prepared")  # sessions/ but no prepare.json: the marker never came
    with pytest.raises(FileNotFoundError, match="no prepare.json: an interrupted"):
        day_paths(tmp_path / "prepared")
    with pytest.raises(FileNotFoundError, match="no prepare.json"):
        resolve_paths(tmp_path / "prepared")
    (tmp_path / "prepared" / "prepare.json").write_text("{}")
    assert available_days(tmp_path / "prepared") == [1, 2]
    assert available_days(tmp_path / "prepared" / "sessions") == []  # not a prepared dataset itself
