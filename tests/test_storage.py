"""raytr.storage: local paths and fsspec URLs behind one set of functions, and the commit rule
(an output is complete when its marker exists; a failure never leaves a marker)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from raytr import storage


@pytest.fixture
def memory_root() -> str:
    """A fresh directory on fsspec's in-memory filesystem (an object store with no rename)."""
    return f"memory://raytr-{uuid.uuid4().hex[:8]}"


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "b.parquet").write_text("b")
    (root / "a.parquet").write_text("a")
    (root / "_SUCCESS").write_text("")
    (root / ".a.parquet.crc").write_text("")
    (root / "notes.txt").write_text("n")
    return root


def test_paths_normalize_to_absolute_or_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("x/y") == str(tmp_path / "x" / "y")
    assert storage.normalize(f"file://{tmp_path}/z") == str(tmp_path / "z")
    assert storage.normalize("s3://bucket/out/") == "s3://bucket/out"
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b") and not storage.is_url(f"file://{tmp_path}")
    assert storage.join("s3://b/out/", "runs", "r1") == "s3://b/out/runs/r1"
    assert storage.join("x", "a") == str(tmp_path / "x" / "a")
    assert storage.parent("s3://b/out/model") == "s3://b/out" and storage.name("s3://b/out/model") == "model"
    assert storage.staging_path("s3://b/out/prepared", "ab12") == "s3://b/out/.prepared.tmp-ab12"


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot open 'nosuchproto://x'"):
        storage.exists("nosuchproto://x")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory"])
def test_listing_skips_hidden_and_underscore_folders_and_ignores_the_suffixes_case(tmp_path, memory_root, remote):
    """Stale copies (Spark's _temporary/, Jupyter's .ipynb_checkpoints/) would be read as data twice;
    an upper-case EVENTS.CSV would be silently left out. The root's own path may start with either."""
    root = storage.join(memory_root if remote else str(tmp_path), "_staging", ".out")
    for name in ("a.csv", "B.CSV", "_temporary/0/a.csv", ".ipynb_checkpoints/a-checkpoint.csv", "day=1/.x.csv"):
        storage.write_text(storage.join(root, name), "")
    assert [storage.name(f) for f in storage.list_files(root, (".csv",))] == ["B.CSV", "a.csv"]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory"])
def test_listings_are_in_natural_order(tmp_path, memory_root, remote):
    """day=2 before day=10 and part-9 before part-10, as merlin's dask reader takes them."""
    root = memory_root if remote else str(tmp_path)
    for day in (10, 2, 1):
        for part in (10, 9):
            storage.write_text(storage.join(root, f"day={day}", f"part-{part}.parquet"), "")
    assert [storage.name(d) for d in storage.list_dirs(root)] == ["day=1", "day=2", "day=10"]
    assert ["/".join(f.rsplit("/", 2)[-2:]) for f in storage.list_files(root)] == [
        f"day={d}/part-{p}.parquet" for d in (1, 2, 10) for p in (9, 10)]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory"])
def test_listing_reading_and_writing(tmp_path, memory_root, remote):
    local = _tree(tmp_path / "src")
    root = memory_root if remote else str(tmp_path / "dst")
    storage.put_dir(local, root)
    files = storage.list_files(root)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.parquet", "b.parquet"]  # hidden and _ files skipped
    assert all(f.startswith("memory://" if remote else str(tmp_path)) for f in files)
    assert storage.list_files(files[0]) == [files[0]]  # a file lists as itself
    assert [storage.name(d) for d in storage.list_dirs(root)] == ["sub"]
    assert storage.list_files(storage.join(root, "missing")) == []
    storage.write_text(storage.join(root, "deep", "x.json"), "{}")
    assert storage.read_text(storage.join(root, "deep", "x.json")) == "{}"
    assert storage.is_dir(root) and storage.is_file(storage.join(root, "notes.txt"))
    with storage.local_copy(root) as copy:
        assert (copy / "sub" / "b.parquet").read_text() == "b" and (copy / "deep" / "x.json").is_file()
    with storage.local_copy(storage.join(root, "notes.txt")) as copy:
        assert copy.read_text() == "n"
    storage.remove(storage.join(root, "sub"))
    storage.remove(storage.join(root, "sub"))  # already gone: no error
    assert not storage.exists(storage.join(root, "sub", "b.parquet"))


def test_writable_dir_uploads_only_on_success(memory_root):
    target = storage.join(memory_root, "model")
    with pytest.raises(RuntimeError):
        with storage.writable_dir(target) as local:
            (local / "weights").write_text("half")
            raise RuntimeError("crashed while writing")
    assert not storage.exists(target)
    with storage.writable_dir(target) as local:
        (local / "weights").write_text("whole")
    assert storage.read_text(storage.join(target, "weights")) == "whole"


@pytest.mark.parametrize("remote", [False, True], ids=["local", "memory"])
def test_commit_replaces_the_output_marker_last(tmp_path, memory_root, remote):
    base = memory_root if remote else str(tmp_path)
    output, staging = storage.join(base, "out"), storage.join(base, ".out.tmp-1")
    storage.write_text(storage.join(output, "old.txt"), "old")
    storage.write_text(storage.join(output, "done.json"), "old")
    storage.write_text(storage.join(staging, "data", "part.parquet"), "new")
    storage.write_text(storage.join(staging, "done.json"), "new")
    storage.commit_dir(staging, output, marker="done.json")
    assert not storage.exists(staging)
    assert not storage.exists(storage.join(output, "old.txt"))  # replaced, not merged
    assert storage.read_text(storage.join(output, "done.json")) == "new"
    assert storage.read_text(storage.join(output, "data", "part.parquet")) == "new"


def test_a_commit_that_fails_midway_leaves_no_marker_and_can_be_retried(memory_root, monkeypatch):
    output, staging = storage.join(memory_root, "out"), storage.join(memory_root, ".out.tmp-1")
    storage.write_text(storage.join(output, "done.json"), "old")
    storage.write_text(storage.join(output, "stale.parquet"), "old")
    for name in ("a", "b", "c"):
        storage.write_text(storage.join(staging, f"{name}.parquet"), name)
    storage.write_text(storage.join(staging, "done.json"), "new")
    fs = fsspec.filesystem("memory")
    copied = []

    def flaky_copy(src, dst, **kwargs):
        if len(copied) == 2:
            raise OSError("connection reset")
        copied.append(dst)
        return original(src, dst, **kwargs)

    original = fs.copy
    monkeypatch.setattr(fs, "copy", flaky_copy)
    with pytest.raises(OSError, match="connection reset"):
        storage.commit_dir(staging, output, marker="done.json")
    assert not storage.exists(storage.join(output, "done.json"))  # readers see an incomplete output
    assert all(not c.endswith("done.json") for c in copied)
    assert len(storage.list_files(staging, (".parquet", ".json"))) == 4  # nothing lost: retry works
    monkeypatch.setattr(fs, "copy", original)
    storage.commit_dir(staging, output, marker="done.json")
    assert [storage.name(f) for f in storage.list_files(output, (".parquet", ".json"))] == [
        "a.parquet", "b.parquet", "c.parquet", "done.json"]  # the old output's stale file is gone
    assert not storage.exists(staging)


def test_a_local_commit_whose_second_rename_fails_puts_the_old_output_back(tmp_path, monkeypatch):
    import os

    output, staging = tmp_path / "out", tmp_path / ".out.tmp-1"
    storage.write_text(str(output / "done.json"), "old")
    storage.write_text(str(staging / "done.json"), "new")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the staging directory into place
            raise OSError("disk trouble")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"):
        storage.commit_dir(str(staging), str(output), marker="done.json")
    assert (output / "done.json").read_text() == "old" and (staging / "done.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out"]


def test_check_output_compares_inputs_on_the_same_filesystem_only(tmp_path, memory_root):
    storage.check_output(f"{memory_root}/out", "prepare.json", [f"/{memory_root[len('memory://'):]}/out/a.parquet"])
    with pytest.raises(ValueError, match="holds the input"):
        storage.check_output(f"{memory_root}/out", "prepare.json", [f"{memory_root}/out/raw/a.parquet"])
    with pytest.raises(ValueError, match="holds the input"):
        storage.check_output(str(tmp_path), "prepare.json", [str(tmp_path / "raw" / "a.parquet")])


def test_a_bucket_root_is_refused_as_an_output():
    for output in ("s3://bucket", "s3://bucket/"):
        with pytest.raises(ValueError, match="root of its store"):
            storage.staging_path(output, "x")


def test_local_paths_are_never_parsed_as_urls(tmp_path):
    odd = tmp_path / "a::b" / "x.parquet"
    odd.parent.mkdir()
    odd.write_text("1")
    assert storage.list_files(odd.parent) == [str(odd)]


def test_copy_file_across_filesystems(tmp_path, memory_root):
    (tmp_path / "state.pt").write_bytes(b"\x00\x01")
    remote = storage.join(memory_root, "runs", "r", "state.pt")
    storage.copy_file(tmp_path / "state.pt", remote)
    storage.copy_file(remote, tmp_path / "back" / "state.pt")
    assert (tmp_path / "back" / "state.pt").read_bytes() == b"\x00\x01"


def test_staged_output_commits_on_success_and_cleans_up_on_error(memory_root):
    output = storage.join(memory_root, "out")
    storage.write_text(storage.join(output, "done.json"), "old")
    with pytest.raises(RuntimeError):
        with storage.staged_output(output, marker="done.json") as staging:
            storage.write_text(storage.join(staging, "part.parquet"), "half")
            raise RuntimeError("failed while building")
    assert storage.read_text(storage.join(output, "done.json")) == "old"  # the old output is untouched
    assert [storage.name(d) for d in storage.list_dirs(memory_root)] == ["out"]  # no staging left
    with storage.staged_output(output, marker="done.json") as staging:
        storage.write_text(storage.join(staging, "part.parquet"), "new")
        storage.write_text(storage.join(staging, "done.json"), "new")
    assert storage.read_text(storage.join(output, "part.parquet")) == "new"
    assert [storage.name(d) for d in storage.list_dirs(memory_root)] == ["out"]
