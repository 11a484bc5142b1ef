"""Where raytr reads and writes: a local path or any fsspec URL (s3://, gs://, abfs://, file://, ...).

Three rules, so that every node of a cluster sees the same data and no reader sees half an output:
- Parquet is read in place, through the URL's fsspec filesystem (`parquet_file`, `read_table`,
  `pyarrow_location` for Ray Data): training workers on any node read the dataset directly.
- Small artifacts (a model, a fitted workflow, a checkpoint) are written to a local directory and
  uploaded (`writable_dir`, `put_dir`), and read from a local copy (`local_copy`, `download`).
- An output directory is complete when its marker file exists: `commit_dir` moves a finished
  staging directory into place with the marker last (`check_output` first refuses an output whose
  replacement would lose data). Locally that is two renames (old aside, new in); object stores
  cannot rename, so there the old marker goes first, the new files are copied over, and the new
  marker comes last: a crash in between leaves no marker, and the staging copy to retry from.

The filesystem of a URL comes from fsspec (`fsspec.core.url_to_fs`): credentials and endpoints are
the backend's own (AWS_* variables, an instance role, fsspec's config files), the same on every node.
The backend package must be installed (s3fs for s3://, gcsfs for gs://, adlfs for abfs://).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for a remote URL (a scheme other than file://); local paths and file:// are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def normalize(path: PathLike) -> str:
    """A URL without its trailing slash, or an absolute local path (file:// stripped). Absolute
    because Ray workers do not run in the caller's directory."""
    text = str(path)
    if is_url(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).resolve())


def join(base: PathLike, *names: str) -> str:
    base = normalize(base)
    if is_url(base):
        return "/".join([base, *(n.strip("/") for n in names)])
    return str(Path(base, *names))


def name(path: PathLike) -> str:
    return normalize(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: PathLike) -> str:
    path = normalize(path)
    if not is_url(path):
        return str(Path(path).parent)
    _, _, rest = path.partition("://")
    if "/" not in rest.strip("/"):
        raise ValueError(f"{path!r} is the root of its store (a bucket): name a directory inside it")
    return path.rsplit("/", 1)[0]


def filesystem(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of `path` and the path as that filesystem names it."""
    if not is_url(path):  # plain paths are never parsed as URLs ("::" chains, "~")
        return LocalFileSystem(), normalize(path)
    try:
        fs, stripped = fsspec.core.url_to_fs(normalize(path))
    except (ImportError, ValueError) as error:  # an unknown scheme, or its backend not installed
        raise ValueError(f"cannot open {str(path)!r}: {error}") from None
    # Other processes (Ray tasks, workers) write the same paths: never answer from a stale listing.
    fs.invalidate_cache(stripped)
    return fs, stripped


def _full(fs: fsspec.AbstractFileSystem, stripped: str) -> str:
    return stripped if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(stripped)


def exists(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def is_file(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.isfile(p)


def is_dir(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def read_text(path: PathLike) -> str:
    fs, p = filesystem(path)
    with fs.open(p, "r") as f:
        return f.read()


def write_text(path: PathLike, text: str) -> None:
    fs, p = filesystem(path)
    fs.makedirs(fs._parent(p), exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(text)


def natural_sort_key(path: str) -> list[str | int]:
    """Sort key that orders the numbers in a path by value (day=2 before day=10, part-9 before
    part-10): the order in which merlin's dask parquet reader takes files, whatever order it is given."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def list_dirs(path: PathLike, prefix: str = "") -> list[str]:
    """Full paths of the subdirectories of `path` whose names start with `prefix`, in natural order."""
    fs, p = filesystem(path)
    if not fs.isdir(p):
        return []
    found = [e["name"] for e in fs.ls(p, detail=True) if e["type"] == "directory"]
    return sorted((_full(fs, d) for d in found if d.rstrip("/").rsplit("/", 1)[-1].startswith(prefix)),
                  key=natural_sort_key)


def list_files(path: PathLike, suffixes: Sequence[str] = (".parquet",)) -> list[str]:
    """Full paths of the files under `path` (recursively) ending in one of `suffixes` (any case), in
    natural order. Hidden and underscore files and folders below `path` (`.crc`, `_SUCCESS`,
    `_metadata`, Spark's `_temporary/`, `.ipynb_checkpoints/`) are skipped: they hold no data, or
    stale copies of it."""
    fs, p = filesystem(path)
    if fs.isfile(p):
        return [_full(fs, p)]
    files = fs.find(p) if fs.isdir(p) else []
    root, endings = p.rstrip("/"), tuple(s.lower() for s in suffixes)

    def kept(file: str) -> bool:
        below = file[len(root):].lstrip("/").split("/")
        return file.lower().endswith(endings) and not any(part.startswith((".", "_")) for part in below)

    return sorted((_full(fs, f) for f in files if kept(f)), key=natural_sort_key)


def remove(path: PathLike) -> None:
    """Remove a file or a directory tree; nothing happens when it does not exist. A local symbolic
    link is removed itself, never what it points to (`normalize` resolves links)."""
    text = str(path).removeprefix("file://")
    if not is_url(text) and os.path.islink(text):
        os.unlink(text)
        return
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def makedirs(path: PathLike) -> None:
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)


def put_dir(local_dir: PathLike, path: PathLike) -> None:
    """Copy the contents of a local directory to `path` (replacing files of the same names)."""
    fs, p = filesystem(path)
    if isinstance(fs, LocalFileSystem):
        shutil.copytree(local_dir, p, dirs_exist_ok=True)
        return
    files = [f for f in Path(local_dir).rglob("*") if f.is_file()]
    if files:
        targets = [f"{p}/{f.relative_to(local_dir).as_posix()}" for f in files]
        fs.put([str(f) for f in files], targets)


def download(path: PathLike, local_dir: PathLike) -> Path:
    """Copy a directory (its contents) or a file (into `local_dir`) to the local disk."""
    fs, p = filesystem(path)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if fs.isfile(p):
        target = local_dir / p.rsplit("/", 1)[-1]
        fs.get(p, str(target))
        return target
    if not fs.isdir(p):
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    files = fs.find(p)
    fs.get(files, [str(local_dir / f[len(p):].lstrip("/")) for f in files])
    return local_dir


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy one file, across filesystems if need be."""
    with local_copy(src) as local:
        fs, p = filesystem(dst)
        fs.makedirs(fs._parent(p), exist_ok=True)
        fs.put_file(str(local), p)


@contextmanager
def local_copy(path: PathLike) -> Iterator[Path]:
    """A local path to read `path` from: itself when local, else a temporary copy removed after."""
    if not is_url(path):
        yield Path(normalize(path))
        return
    scratch = Path(tempfile.mkdtemp(prefix="raytr-read-"))
    try:
        yield download(path, scratch / "copy") if is_dir(path) else download(path, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def writable_dir(path: PathLike) -> Iterator[Path]:
    """A local directory to write `path`'s contents into: itself when local, else a temporary one
    uploaded to `path` when the block succeeds (nothing is uploaded when it raises)."""
    if not is_url(path):
        local = Path(normalize(path))
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    scratch = Path(tempfile.mkdtemp(prefix="raytr-write-"))
    try:
        yield scratch
        put_dir(scratch, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_within(path: str, outer: str) -> bool:
    """Whether `path` is `outer` or lies below it (both as `normalize` or `filesystem` give them)."""
    return path == outer or path.startswith(outer.rstrip("/") + "/")


def _has_marker(fs: fsspec.AbstractFileSystem, directory: str, marker: str) -> bool:
    """Whether `directory` holds `marker`, a relative path whose components may be `*` patterns."""
    if "*" in marker:
        return bool(fs.glob(f"{glob.escape(directory.rstrip('/'))}/{marker}"))
    return fs.exists(f"{directory.rstrip('/')}/{marker}")


def check_output(output: PathLike, marker: str | Sequence[str], inputs: Sequence[PathLike] = (),
                 layout: Collection[str] | None = None) -> None:
    """Refuse an `output` whose replacement would lose data: a file, a non-empty directory that is
    not an earlier output of the same command (it has no `marker`, or none of several; a marker may
    hold `*` patterns, e.g. runs/*/init; with `layout`, the names such an output holds, it holds
    another entry too: another command's output that carries the marker, a model bundle holding
    its data's prepare.json), or one that holds an input."""
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    fs, dst = filesystem(output)
    for path in inputs:
        in_fs, p = filesystem(path)
        if type(in_fs) is type(fs) and is_within(p, dst):
            raise ValueError(f"output {str(output)!r} holds the input {str(path)!r}, which replacing it would "
                             "delete: choose another output")
    if not fs.exists(dst):
        return
    if not fs.isdir(dst):
        raise ValueError(f"output {str(output)!r} is a file: choose a directory")
    if not any(_has_marker(fs, dst, m) for m in markers) and fs.ls(dst):
        raise ValueError(f"output {str(output)!r} is a directory with other contents (no {' or '.join(markers)}, "
                         "so not an "
                         "earlier output of this command, or one whose commit failed): choose another output "
                         "or empty it")
    # Hidden entries (.DS_Store, an editor's) are nobody's output.
    foreign = sorted(n for n in (name(e) for e in fs.ls(dst, detail=False))
                     if n not in layout and not n.startswith(".")) if layout is not None else []
    if foreign:
        raise ValueError(f"output {str(output)!r} holds {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}, "
                         f"which an output of this command does not (it holds {', '.join(sorted(layout))}), so "
                         "replacing it would delete them: choose another output")


@contextmanager
def staged_output(output: PathLike, marker: str, inputs: Sequence[PathLike] = (),
                  layout: Collection[str] | None = None) -> Iterator[str]:
    """Build `output` in a staging directory beside it (yielded), then commit it (`commit_dir`) when
    the block succeeds; the block writes `marker` inside last. `check_output` first refuses an
    output that must not be replaced. When the block raises, the staging directory is removed;
    when the commit fails, it is kept, with the finished output to retry from."""
    check_output(output, marker, inputs, layout)
    staging = staging_path(output, uuid.uuid4().hex[:8])
    makedirs(staging)
    try:
        yield staging
    except BaseException:
        try:
            remove(staging)
        except Exception:  # noqa: BLE001 - the block's error is the one to report
            log.warning("could not remove the staging directory %s", staging)
        raise
    try:
        commit_dir(staging, output, marker)
    except BaseException:
        log.error("moving %s to %s failed; the finished output is kept in %s", staging, output, staging)
        raise


def staging_path(output: PathLike, tag: str) -> str:
    """A hidden sibling of `output` (same filesystem, so a local rename moves it in one step)."""
    return join(parent(output), f".{name(output)}.tmp-{tag}")


def commit_dir(staging: PathLike, output: PathLike, marker: str) -> None:
    """Move a finished staging directory to `output`, replacing it; `marker` (a file name inside)
    arrives last. Locally two renames: the old output aside, the new one in, then the old one is
    deleted (a crash between the renames leaves it beside the output, not lost). On an object
    store: the old marker is removed first, the new files are copied over the output, files of the
    old output not in the new one are removed, then the marker is copied and the staging directory
    removed. A failure before the
    marker leaves the output without one (readers refuse it) and the staging directory intact,
    so nothing is lost and the commit can be retried."""
    fs, src = filesystem(staging)
    out_fs, dst = filesystem(output)
    if type(fs) is not type(out_fs):
        raise ValueError(f"staging {str(staging)!r} and output {str(output)!r} are on different filesystems")
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(dst):
            os.rename(src, dst)
            return
        old = staging_path(dst, "old-" + uuid.uuid4().hex[:8])
        os.rename(dst, old)
        try:
            os.rename(src, dst)
        except OSError:
            os.rename(old, dst)  # the previous output back where it was; the staging copy is kept
            raise
        shutil.rmtree(old, ignore_errors=True)  # committed: a file still held open must not fail it
        if os.path.exists(old):
            log.warning("the previous output could not be removed entirely: %s", old)
        return
    if fs.exists(f"{dst}/{marker}"):
        fs.rm(f"{dst}/{marker}")
    new = {f[len(src):].lstrip("/") for f in fs.find(src)} - {marker}
    for name in sorted(new):
        fs.copy(f"{src}/{name}", f"{dst}/{name}")
    stale = [f for f in (fs.find(dst) if fs.isdir(dst) else []) if f[len(dst):].lstrip("/") not in new]
    if stale:
        fs.rm(stale)
    fs.copy(f"{src}/{marker}", f"{dst}/{marker}")
    fs.rm(src, recursive=True)


def parquet_file(path: PathLike):
    """A `pyarrow.parquet.ParquetFile` over a local path or URL (metadata, row groups)."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    return pq.ParquetFile(p, filesystem=None if isinstance(fs, LocalFileSystem) else fs)


def read_table(path: PathLike, columns: Sequence[str] | None = None):
    """A parquet file or a directory of parquet files, as one `pyarrow.Table`."""
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    return pq.read_table(p, columns=list(columns) if columns is not None else None,
                         filesystem=None if isinstance(fs, LocalFileSystem) else fs)


def pyarrow_location(paths: Sequence[PathLike]):
    """(paths, filesystem) for Ray Data's readers and writers: local paths as they are with no
    filesystem, or URLs as their fsspec filesystem names them with that filesystem wrapped for
    pyarrow, so Ray Data and the rest of raytr reach storage with the same configuration."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    resolved = [filesystem(p) for p in paths]
    if not resolved or all(isinstance(fs, LocalFileSystem) for fs, _ in resolved):
        return [p for _, p in resolved], None
    protocols = {type(fs) for fs, _ in resolved}
    if len(protocols) > 1:
        raise ValueError(f"paths on more than one filesystem: {[str(p) for p in paths][:4]}")
    return [p for _, p in resolved], PyFileSystem(FSSpecHandler(resolved[0][0]))
