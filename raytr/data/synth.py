"""A generator of realistic raw interaction logs for demos, tests and benchmarks.

What makes it realistic enough to be useful:
- item popularity is Zipf-like and items belong to categories (also Zipf-like) with prices;
- sessions have learnable sequential structure: each item has a few likely successors, mostly in
  its own category, so a sequence model beats popularity; the rest is popularity noise;
- session lengths are long-tailed; sessions start over several days with a daily rhythm and events
  follow each other after exponential gaps, so some sessions cross midnight;
- raw ids look like production ids (large, sparse integers), not 0..N-1.

Output: parquet partitioned by the day of each event (`day=1/part-0.parquet`, ...), columns
session_id, item_id, category, price, timestamp (unix seconds, float64) and optionally user_id.
Deterministic under `seed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raytr import storage

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400
SUCCESS = "_SUCCESS"  # the marker of a complete raw dataset
START_TIMESTAMP = 1_714_521_600  # 2024-05-01 00:00:00 UTC


@dataclass(frozen=True)
class SynthConfig:
    sessions: int = 20_000
    items: int = 2_000
    categories: int = 50
    days: int = 7
    seed: int = 0
    successors: int = 3  # likely next items per item
    follow_probability: float = 0.75  # chance the next event follows the sequential structure
    mean_session_length: float = 6.0
    max_session_length: int = 60
    users: int = 0  # 0: no user_id column
    zipf_exponent: float = 1.1

    def __post_init__(self) -> None:
        for name in ("sessions", "items", "categories", "days", "successors"):
            if getattr(self, name) < 1:
                raise ValueError(f"synth {name}={getattr(self, name)}: expected >= 1")
        if self.items < self.successors + 1:
            raise ValueError(f"synth items={self.items}: expected more than successors={self.successors}")
        if not 0.0 <= self.follow_probability <= 1.0:
            raise ValueError(f"synth follow_probability={self.follow_probability}: expected 0..1")
        if self.mean_session_length < 2:
            raise ValueError(f"synth mean_session_length={self.mean_session_length}: expected >= 2")
        if self.users < 0:
            raise ValueError(f"synth users={self.users}: expected >= 0 (0: no user id column)")


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(weights / weights.sum())  # popularity not tied to the index


def generate_events(config: SynthConfig) -> pd.DataFrame:
    """All events of `config.sessions` sessions, sorted by timestamp."""
    rng = np.random.default_rng(config.seed)
    n_items, n_sessions = config.items, config.sessions

    # Items: category, price, popularity, and a few preferred successors (same category 80%).
    item_pop = _zipf_weights(n_items, config.zipf_exponent, rng)
    item_cat = rng.choice(config.categories, size=n_items, p=_zipf_weights(config.categories, 1.0, rng))
    cat_price = rng.lognormal(mean=3.0, sigma=0.8, size=config.categories)
    item_price = np.round(cat_price[item_cat] * rng.lognormal(0.0, 0.3, size=n_items), 2)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(config.categories)]
    successors = np.empty((n_items, config.successors), dtype=np.int64)
    for i in range(n_items):
        same = by_cat[item_cat[i]]
        for j in range(config.successors):
            pool = same if (len(same) > 1 and rng.random() < 0.8) else np.arange(n_items)
            p = item_pop[pool] / item_pop[pool].sum()
            nxt = rng.choice(pool, p=p)
            successors[i, j] = nxt if nxt != i else (i + 1) % n_items
    succ_p = np.array([0.6, 0.3, 0.1][: config.successors] + [0.0] * max(0, config.successors - 3))
    succ_p = succ_p + (succ_p == 0) * 0.05
    succ_p /= succ_p.sum()

    # Sessions: lengths >= 1 (some single-event sessions exist, as in real logs), long-tailed.
    lengths = 1 + rng.geometric(1.0 / (config.mean_session_length - 0.5), size=n_sessions)
    lengths = np.minimum(lengths - (rng.random(n_sessions) < 0.1), config.max_session_length)
    t_max = int(lengths.max())

    # Walk all sessions at once, one step at a time.
    items = np.zeros((n_sessions, t_max), dtype=np.int64)
    items[:, 0] = rng.choice(n_items, size=n_sessions, p=item_pop)
    for t in range(1, t_max):
        prev = items[:, t - 1]
        follow = rng.random(n_sessions) < config.follow_probability
        pick = rng.choice(config.successors, size=n_sessions, p=succ_p)
        noise = rng.choice(n_items, size=n_sessions, p=item_pop)
        items[:, t] = np.where(follow, successors[prev, pick], noise)

    # Times: session starts follow a daily rhythm (busier in the evening); gaps ~ Exp(60 s).
    day = rng.integers(0, config.days, size=n_sessions)
    hour = rng.choice(24, size=n_sessions, p=_daily_rhythm())
    start = START_TIMESTAMP + day * DAY_SECONDS + hour * 3600 + rng.uniform(0, 3600, size=n_sessions)
    gaps = rng.exponential(60.0, size=(n_sessions, t_max)) + 1.0
    gaps[:, 0] = 0.0
    times = start[:, None] + np.cumsum(gaps, axis=1)

    valid = np.arange(t_max)[None, :] < lengths[:, None]
    sess_idx = np.broadcast_to(np.arange(n_sessions)[:, None], items.shape)[valid]
    item_idx = items[valid]
    # Production-looking sparse ids, a fixed bijection of the dense ones.
    item_raw = 100_000_000 + item_idx * 7_919 + 13
    frame = pd.DataFrame(
        {
            "session_id": (sess_idx * 31 + 1_000_003).astype(np.int64),
            "item_id": item_raw.astype(np.int64),
            "category": (item_cat[item_idx] + 1_000).astype(np.int64),
            "price": item_price[item_idx].astype(np.float64),
            "timestamp": np.round(times[valid], 3),
        }
    )
    if config.users:
        user_of_session = rng.integers(0, config.users, size=n_sessions) + 5_000_000
        frame["user_id"] = user_of_session[sess_idx].astype(np.int64)
    return frame.sort_values(["timestamp", "session_id"], kind="stable").reset_index(drop=True)


def _daily_rhythm() -> np.ndarray:
    hours = np.arange(24)
    weights = 0.3 + np.exp(-((hours - 20) ** 2) / 18.0) + 0.5 * np.exp(-((hours - 12) ** 2) / 8.0)
    return weights / weights.sum()


def write_events(frame: pd.DataFrame, output: str | Path) -> list[str]:
    """Write events as parquet partitioned by the UTC day of each event: day=1/, day=2/, ...

    `output` is a local path or an fsspec URL. Written to a temporary sibling and moved into place
    with a `_SUCCESS` marker last (raytr.storage.commit_dir), so a failed run leaves no partial
    dataset; readers skip the marker like any file starting with "_".
    """
    day_index = (frame["timestamp"] // DAY_SECONDS).astype(np.int64)
    day_number = day_index - day_index.min() + 1
    names = []
    with storage.staged_output(output, marker=SUCCESS) as staging:
        for day, part in frame.groupby(day_number, sort=True):
            name = f"day={day}/part-0.parquet"
            storage.makedirs(storage.join(staging, f"day={day}"))
            part.reset_index(drop=True).to_parquet(storage.join(staging, name), index=False)
            names.append(name)
        storage.write_text(storage.join(staging, SUCCESS), "")
    return [storage.join(output, n) for n in names]


def synthesize(config: SynthConfig, output: str | Path) -> pd.DataFrame:
    """Generate events and write them to `output` (a local path or a URL); returns the events."""
    frame = generate_events(config)
    files = write_events(frame, output)
    log.info("wrote %d events of %d sessions to %s (%d day partitions by the events' day: the last day's "
             "sessions can run past midnight)", len(frame), frame["session_id"].nunique(), output, len(files))
    return frame
