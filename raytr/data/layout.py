"""The layout of a prepared dataset, and the functions that read it (no Ray: training, evaluation
and serving read prepared data without starting anything).

    <prepared>/
        sessions/day=N/*.parquet   one row per session, partitioned by the day the session started
        workflow/                  the fitted NVTabular workflow
        schema.json, schema.pbtxt  the Merlin schema of sessions/
        prepare.json               the data config and a summary; written last (`raytr prepare`
                                   commits the directory with it), so a directory with sessions/
                                   but no prepare.json is an interrupted run and is refused

Every path may be local or an fsspec URL (raytr.storage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from raytr import storage

SESSIONS_DIR = "sessions"
WORKFLOW_DIR = "workflow"
PREPARE_JSON = "prepare.json"
DAY = "day"


def load_prepare_info(directory: str | Path) -> dict:
    path = storage.join(directory, PREPARE_JSON)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{directory} is not a prepared dataset (no {PREPARE_JSON}): run `raytr prepare`")
    return json.loads(storage.read_text(path))


def categories_digest(directory: str | Path) -> str | None:
    """A digest of the category files of the fitted workflow in `directory` (a prepared dataset, or
    a model bundle, which holds a byte copy of its data's): equal digests mean every id stands for
    the same item or value. None where `directory` holds no workflow."""
    root = storage.join(directory, WORKFLOW_DIR, "categories")
    files = storage.list_files(root) if storage.is_dir(root) else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        fs, path = storage.filesystem(file)
        with fs.open(path, "rb") as f:
            digest.update(storage.name(file).encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def prepared_root(path: str | Path) -> str | None:
    """The prepared dataset `path` is or lies in (its sessions/, a day=N/ partition or one of their
    files), or None: the nearest of `path` and its three parents that holds a prepare.json."""
    current = storage.normalize(path)
    for _ in range(4):  # <prepared>/sessions/day=N/part.parquet
        if storage.is_file(storage.join(current, PREPARE_JSON)):
            return current
        try:
            parent = storage.parent(current)
        except ValueError:  # the root of a bucket
            break
        if parent == current:
            break
        current = parent
    return None


def sessions_root(directory: str | Path) -> str:
    """Where the day=N/ partitions are: `directory/sessions` of a prepared dataset (which must be
    complete: its prepare.json is written last), or `directory` itself."""
    nested = storage.join(directory, SESSIONS_DIR)
    if not storage.is_dir(nested):
        return storage.normalize(directory)
    if not storage.is_file(storage.join(directory, PREPARE_JSON)):
        raise FileNotFoundError(f"{directory} has {SESSIONS_DIR}/ but no {PREPARE_JSON}: an interrupted "
                                "`raytr prepare` wrote it; run prepare again")
    return nested


def _days_in(root: str) -> list[int]:
    return sorted(int(storage.name(d).split("=")[1]) for d in storage.list_dirs(root, f"{DAY}="))


def available_days(directory: str | Path) -> list[int]:
    """The days of a prepared dataset (none when `directory` is not one)."""
    if not storage.is_dir(storage.join(directory, SESSIONS_DIR)):
        return []
    return _days_in(sessions_root(directory))


def day_paths(directory: str | Path, days: list[int] | None = None) -> list[str]:
    """Absolute paths (or URLs) of the parquet files of the given days (all days when None), in day order."""
    root = sessions_root(directory)
    available = _days_in(root)
    chosen = available if days is None else days
    repeated = sorted({d for d in chosen if chosen.count(d) > 1})
    if repeated:  # its sessions would be read twice
        raise ValueError(f"day(s) {repeated} named more than once in {chosen}")
    missing = [d for d in chosen if d not in available]
    if missing:
        raise FileNotFoundError(f"day(s) {missing} not in {root}; available days: {available}")
    return [f for d in chosen for f in storage.list_files(storage.join(root, f"{DAY}={d}"))]
