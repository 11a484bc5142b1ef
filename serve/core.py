"""The light half of the service: hand-offs between deployments, version bookkeeping, helpers.

Imported by every replica (the ingress too), so it imports neither torch nor NVTabular; the heavy
half (Encoder, Scorer, LocalBackend) is serve/engine.py.

    Query (raw events, k) --Encoder.encode--> ScoringRequest (encoded [n, T] batch, bundle version)
                          --Scorer.score----> ScoringResult (encoded ids, scores) | VersionUnavailable
                          --Encoder.decode--> Recommendations (raw ids)
Every hand-off carries the bundle version: an encoded batch is only scored by the model of the
same bundle (a reload may change the vocabularies).
"""

from __future__ import annotations

import asyncio
import time
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
from safetensors import SafetensorError

from raytr.bundle import Bundle, bundle_files
from raytr.config import DataConfig
from serve.api import RecommendResponse, ReloadResponse, request_fields

if TYPE_CHECKING:
    from raytr.features import SessionBatch

log = logging.getLogger(__name__)

Loc = tuple[str | int, ...]


# ------------------------------------------------------------------------------------ hand-offs
@dataclass(frozen=True)
class Query:
    """One session to recommend for. `loc` prefixes error locations, e.g. ("body", "requests", 3)."""

    events: list[dict[str, Any]]  # raw columns of the data config, timestamps in unix seconds
    k: int
    exclude_seen: bool
    session_id: Any = None
    loc: Loc = ("body",)


@dataclass(frozen=True)
class Rejection:
    """A request the service will not answer: HTTP status and a FastAPI-shaped `detail`."""

    status: int
    detail: Any


@dataclass
class ScoringRequest:
    """Encoded sessions of one HTTP request, for the model of bundle `version`."""

    version: str
    batch: SessionBatch  # [n, T] on CPU
    k: list[int]  # [n]
    exclude: list[np.ndarray | None]  # [n] encoded item ids never to return (exclude_seen)

    def __len__(self) -> int:
        return len(self.k)


@dataclass
class ScoringResult:
    version: str
    ids: list[list[int]]  # [n][<=k] encoded item ids, best first
    scores: list[list[float]]
    batch_requests: int  # requests scored in the same model call (dynamic batching)


@dataclass
class VersionUnavailable:
    """The Recommender has no model for the requested bundle version."""

    requested: str
    available: list[str]


@dataclass
class Recommendations:
    version: str
    responses: list[RecommendResponse]
    batch_requests: int = 1


def unprocessable(loc: Sequence[str | int], message: str, kind: str = "value_error", value: Any = None) -> Rejection:
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)  # JSON has no NaN/inf: echoing one would turn the 422 into a 500
    return Rejection(422, [{"loc": list(loc), "msg": message, "type": kind, "input": value}])


# What loading a bundle raises when the bundle, not the code, is at fault: missing or half-written
# files, another data config, a workflow or weights that do not fit the model.
BUNDLE_LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError, SafetensorError)


class BundleRefused(ValueError):
    """A bundle the running service must not switch to; the message says why."""


class BundleChanging(OSError):
    """The bundle directory's files kept changing while they were loaded."""


def load_compatible(bundle_dir: str, data: DataConfig) -> Bundle:
    """`Bundle.load`, refusing a bundle whose data config differs from the service's in the event
    fields (`request_fields`): the ingress validates requests against the fields it started with."""
    bundle = Bundle.load(bundle_dir)
    if request_fields(bundle.data) != request_fields(data):
        raise BundleRefused(f"the bundle in {bundle_dir} has a different data config (event fields) than the "
                            "running service: deploy it as a new application (`serve deploy` / `serve run`)")
    return bundle


def check_default_k(default_k: int, catalog_size: int, bundle_dir: str | Path) -> None:
    """Refuse a bundle with fewer items than serve.default_k: every request without k would be a 422."""
    if default_k > catalog_size:
        raise BundleRefused(f"serve.default_k={default_k} is larger than the catalog of {bundle_dir} ({catalog_size} "
                            f"items), so every request without k would be refused: set serve.default_k to at most "
                            f"{catalog_size}")


def cannot_reload(bundle_dir: str, error: Exception) -> Rejection:
    return Rejection(409, f"cannot reload {bundle_dir}: {error}")


def reload_response(previous: str, current: str) -> ReloadResponse:
    changed = previous != current
    detail = f"now serving {current}" if changed else f"{current} is already served (the bundle did not change)"
    return ReloadResponse(previous_version=previous, model_version=current, changed=changed, detail=detail)


# ------------------------------------------------------------------------------------ versions
def _files_key(bundle_dir: str) -> tuple | None:
    """What identifies the contents of the files `Bundle.load` reads (`bundle_files`): their inode,
    size and times; None for a URL, or a file that cannot be looked at: read it again."""
    if "://" in bundle_dir:
        return None
    key = []
    for path in bundle_files(bundle_dir):
        try:
            st = path.stat()
        except FileNotFoundError:
            key.append(None)  # train_result.json is optional; Bundle.load names the others
            continue
        except OSError:
            return None
        key.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(key)


class Versioned(Protocol):
    version: str


S = TypeVar("S", bound=Versioned)


class VersionedStates(Generic[S]):
    """The loaded states (Encoder or Scorer) of the last `keep` bundle versions, newest first.

    `sync_to_disk()` loads the bundle directory when it holds a version not loaded yet (in a
    thread, one load at a time; the old state keeps serving until the new one is ready, then they
    swap). `follow(current)` polls an announced version (the registry) and syncs when it changes.
    A bundle with another data config than `data` (the service's) is never loaded: it raises
    `BundleRefused`, and the loaded versions keep serving.
    """

    def __init__(self, bundle_dir: str | Path, load: Callable[[Bundle], S], keep: int, data: DataConfig) -> None:
        self.bundle_dir = str(bundle_dir)
        self.data = data
        self._load = load
        self._keep = keep
        self._states: list[S] = []
        self._lock: asyncio.Lock | None = None
        self._last_read: tuple[tuple, Bundle] | None = None
        self.failed_at: float | None = None  # monotonic time of the last failed load

    @property
    def latest(self) -> S:
        if not self._states:
            raise RuntimeError("no bundle loaded yet: call sync_to_disk() first")
        return self._states[0]

    @property
    def versions(self) -> list[str]:
        return [s.version for s in self._states]

    @property
    def states(self) -> list[S]:
        return list(self._states)

    def get(self, version: str) -> S | None:
        return next((s for s in self._states if s.version == version), None)

    def load_sync(self) -> S:
        """Load the bundle directory now, blocking (for constructors); return the newest state."""
        state = self._fetch()
        if state is not None:
            self._add(state)
        return self.latest

    async def sync_to_disk(self) -> S:
        """Load the bundle directory's version unless it is loaded already; return the newest state."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                state = await asyncio.to_thread(self._fetch)
                if state is not None:
                    self._add(state)
            except Exception:
                self.failed_at = time.monotonic()
                raise
            return self.latest

    def failed_within(self, seconds: float) -> bool:
        """Whether a load (by the follower or on demand) failed in the last `seconds`."""
        return self.failed_at is not None and time.monotonic() - self.failed_at < seconds

    def _fetch(self, attempts: int = 3) -> S | None:
        """The state of the directory's version, loaded; None when that version is loaded already.
        Loaded again when the files changed while it loaded: a bundle moved into place meanwhile would
        otherwise be served under the version (the name) of the files read first."""
        for _ in range(attempts):
            bundle = self._read()
            if self.get(bundle.version) is not None:
                return None
            state = self._load(bundle)
            if self._last_read is None or _files_key(self.bundle_dir) == self._last_read[0]:
                return state  # a URL bundle is a local copy: it cannot change under the load
        raise BundleChanging(f"{self.bundle_dir} changed during each of {attempts} loads: finish writing the bundle "
                             "(write it beside and move it into place), then reload")

    def _read(self) -> Bundle:
        """`load_compatible`, reusing the last read while the files it reads are unchanged (same inode,
        size, mtime, ctime): Bundle.load hashes the whole weights file for the version, and a load that
        keeps failing is retried every poll."""
        key = _files_key(self.bundle_dir)
        if key is not None and self._last_read is not None and self._last_read[0] == key:
            return self._last_read[1]
        bundle = load_compatible(self.bundle_dir, self.data)
        self._last_read = None if key is None else (key, bundle)  # stat before reading: a change meanwhile is read next time
        return bundle

    def _add(self, state: S) -> None:
        self._states = [state, *self._states][: self._keep]  # one assignment: readers see old or new
        log.info("loaded bundle %s from %s (kept: %s)", state.version, self.bundle_dir, self.versions)

    async def follow(self, current: Callable[[], Awaitable[str]], poll_s: float) -> None:
        """Forever: when the announced version changes and is not loaded, sync to disk."""
        announced: str | None = None
        while True:
            await asyncio.sleep(poll_s)
            try:
                version = await current()
                if version != announced:
                    if self.get(version) is None:
                        await self.sync_to_disk()
                    announced = version  # only once loaded: a failed load is retried next poll
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the loaded bundle; try again next poll
                log.warning("following bundle versions of %s failed (%r); still serving %s",
                            self.bundle_dir, exc, self.versions)
