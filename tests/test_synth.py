"""raytr.data.synth: deterministic, realistic, learnable raw events written by day."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from raytr.data.synth import DAY_SECONDS, START_TIMESTAMP, SynthConfig, generate_events, synthesize, write_events

SMALL = SynthConfig(sessions=3_000, items=300, days=4, seed=1)


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return generate_events(SMALL)


def next_item_hit_rates(frame: pd.DataFrame) -> tuple[float, float]:
    """Hit rate@1 of next-item prediction on half the sessions, learned on the other half:
    (bigram "most frequent successor of the current item", most popular item)."""
    frame = frame.sort_values(["session_id", "timestamp"], kind="stable")
    frame = frame.assign(next=frame.groupby("session_id")["item_id"].shift(-1)).dropna(subset=["next"])
    sessions = np.sort(frame["session_id"].unique())
    in_train = frame["session_id"].isin(sessions[::2])
    train, test = frame[in_train], frame[~in_train]
    successor = train.groupby("item_id")["next"].agg(lambda s: s.value_counts().index[0])
    popular = train["next"].value_counts().index[0]
    bigram_hits = (test["item_id"].map(successor) == test["next"]).mean()
    popular_hits = (test["next"] == popular).mean()
    return float(bigram_hits), float(popular_hits)


def test_columns_and_types(events):
    assert list(events.columns) == ["session_id", "item_id", "category", "price", "timestamp"]
    assert [str(t) for t in events.dtypes] == ["int64", "int64", "int64", "float64", "float64"]
    assert events["session_id"].nunique() == SMALL.sessions
    assert events["item_id"].notna().all() and (events["price"] > 0).all()
    # production-looking sparse ids, not 0..N-1
    assert events["item_id"].min() >= 100_000_000
    assert events["item_id"].nunique() <= SMALL.items
    # each item has one category and one price
    per_item = events.groupby("item_id")[["category", "price"]].nunique()
    assert (per_item == 1).all().all()
    # sorted by time
    assert events["timestamp"].is_monotonic_increasing


def test_same_seed_same_frame(events):
    pd.testing.assert_frame_equal(generate_events(SMALL), events)


def test_different_seed_differs(events):
    other = generate_events(SynthConfig(sessions=3_000, items=300, days=4, seed=2))
    assert len(other) != len(events) or not other.equals(events)
    assert not np.array_equal(other["item_id"].to_numpy()[:200], events["item_id"].to_numpy()[:200])


def test_popularity_is_zipf_like(events):
    counts = events["item_id"].value_counts()  # descending
    top = max(1, SMALL.items // 10)
    share = counts.iloc[:top].sum() / counts.sum()
    assert share > 0.4, f"top 10% of items hold {share:.2f} of events; uniform would be 0.10"
    # and a long tail: the median item is far less popular than the top item
    assert counts.iloc[0] > 10 * counts.median()


def test_sequences_are_learnable(events):
    bigram, popular = next_item_hit_rates(events)
    assert bigram > 0.35, bigram
    assert bigram > 4 * popular, (bigram, popular)


def test_without_structure_bigram_does_not_help():
    """Control for the test above: the advantage comes from the successor structure."""
    noise = generate_events(SynthConfig(sessions=3_000, items=300, days=4, seed=1, follow_probability=0.0))
    bigram, popular = next_item_hit_rates(noise)
    assert bigram < 0.2 and bigram < 2 * max(popular, 0.05), (bigram, popular)


def test_session_lengths(events):
    lengths = events.groupby("session_id").size()
    assert lengths.max() <= SMALL.max_session_length
    assert (lengths == 1).any()  # single-event sessions exist, as in real logs
    assert 4.0 < lengths.mean() < 9.0  # mean_session_length=6, long-tailed
    assert lengths.quantile(0.99) > 2 * lengths.median()


def test_timestamps_span_the_requested_days(events):
    first = events.groupby("session_id")["timestamp"].min()
    start_days = ((first - START_TIMESTAMP) // DAY_SECONDS).astype(int)
    assert sorted(start_days.unique()) == list(range(SMALL.days))
    assert events["timestamp"].min() >= START_TIMESTAMP
    duration = events.groupby("session_id")["timestamp"].agg(lambda s: s.max() - s.min())
    assert events["timestamp"].max() <= START_TIMESTAMP + SMALL.days * DAY_SECONDS + duration.max()
    # events within a session follow each other after >= 1 s
    gaps = events.sort_values(["session_id", "timestamp"]).groupby("session_id")["timestamp"].diff().dropna()
    assert gaps.min() >= 1.0


def test_some_sessions_cross_midnight(events):
    days = (events["timestamp"] // DAY_SECONDS).astype(int)
    assert (days.groupby(events["session_id"]).nunique() > 1).any()


def test_user_id_is_optional():
    assert "user_id" not in generate_events(SynthConfig(sessions=50, items=30, days=1)).columns
    with_users = generate_events(SynthConfig(sessions=200, items=30, days=1, users=7))
    assert with_users["user_id"].dtype == np.int64
    assert with_users["user_id"].nunique() <= 7
    assert (with_users.groupby("session_id")["user_id"].nunique() == 1).all()  # one user per session


def test_day_partitions_written(tmp_path):
    cfg = SynthConfig(sessions=400, items=50, days=3, seed=3)
    out = tmp_path / "raw"
    frame = synthesize(cfg, out)
    parts = sorted(out.glob("day=*/*.parquet"))
    day_numbers = sorted(int(p.parent.name.split("=")[1]) for p in parts)
    # days 1..3, plus day 4 only when a session of the last day runs past midnight
    assert day_numbers[:3] == [1, 2, 3] and day_numbers in ([1, 2, 3], [1, 2, 3, 4])
    back = []
    for path in parts:
        part = pq.read_table(path).to_pandas()
        day = int(path.parent.name.split("=")[1])
        event_days = (part["timestamp"] // DAY_SECONDS - START_TIMESTAMP // DAY_SECONDS + 1).astype(int)
        assert (event_days == day).all(), path
        back.append(part)
    restored = pd.concat(back).sort_values(["timestamp", "session_id"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(restored, frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no staging directory left
    assert (out / "_SUCCESS").is_file()


def test_write_replaces_previous_output(tmp_path):
    out = tmp_path / "raw"  # an earlier synth output: it has the _SUCCESS marker
    (out / "day=9").mkdir(parents=True)
    (out / "day=9" / "stale.parquet").write_text("old")
    (out / "_SUCCESS").write_text("")
    write_events(generate_events(SynthConfig(sessions=20, items=10, days=1)), out)
    assert not (out / "day=9").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_write_refuses_a_directory_it_did_not_write(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"directory with other contents \(no _SUCCESS"):
        write_events(generate_events(SynthConfig(sessions=20, items=10, days=1)), out)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sessions": 0}, "sessions"),
        ({"items": 3, "successors": 3}, "items"),
        ({"follow_probability": 1.5}, "follow_probability"),
        ({"mean_session_length": 1.0}, "mean_session_length"),
        ({"users": -5}, "users"),
    ],
)
def test_config_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SynthConfig(**kwargs)
