"""raytr.data.prepare on Ray: layout, sessions kept whole and counted right, the online round trip,
input checks before any work, and atomic output.

Most tests read the one prepared synthetic dataset of conftest (`prepared_dir`); the few that must
run prepare themselves use tiny inputs. The input checks run without Ray (they must fail first).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytr.data import prepare as prepare_module
from raytr.data.events import InputError, normalize_events, read_file, sort_events, validate_input
from raytr.data.layout import PREPARE_JSON, available_days, day_paths, load_prepare_info
from raytr.data.prepare import prepare
from raytr.data.synth import DAY_SECONDS
from raytr.data.workflow import SESSION_LENGTH, load_workflow, transform_frame

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sessions(prepared_dir) -> pd.DataFrame:
    """All prepared sessions, with the hive `day` partition as an int column, indexed by session."""
    frame = pd.read_parquet(prepared_dir / "sessions")
    frame["day"] = frame["day"].astype(int)
    return frame.set_index("session_id", verify_integrity=False)


@pytest.fixture(scope="module")
def raw_parts(raw_dir) -> pd.DataFrame:
    """Raw events with the day partition they were read from."""
    parts = []
    for path in sorted(raw_dir.glob("day=*/*.parquet")):
        parts.append(pd.read_parquet(path).assign(raw_day=int(path.parent.name.split("=")[1])))
    return pd.concat(parts, ignore_index=True)


def raw_sizes(raw_events: pd.DataFrame) -> pd.Series:
    return raw_events.groupby("session_id").size()


def assert_same_session(got: pd.Series, want: pd.Series, sid) -> None:
    """Two session rows are equal: list columns element-wise (floats to 1e-6), scalars exactly."""
    for column in want.index:
        if column == "day":
            continue
        a, b = got[column], want[column]
        if column.endswith("-list"):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, (sid, column, a, b)
            if np.issubdtype(b.dtype, np.floating):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{sid} {column}")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{sid} {column}")
        else:
            assert a == pytest.approx(b), (sid, column, a, b)


# --- the prepared synthetic dataset -----------------------------------------------------------


@pytest.mark.ray
def test_output_layout(prepared_dir):
    names = sorted(p.name for p in prepared_dir.iterdir())
    assert names == ["prepare.json", "schema.json", "schema.pbtxt", "sessions", "workflow"]
    assert (prepared_dir / "workflow" / "workflow.pkl").is_file()
    days = sorted(p.name for p in (prepared_dir / "sessions").iterdir())
    assert days == ["day=1", "day=2", "day=3", "day=4"]  # by each session's first event
    for day in days:
        files = list((prepared_dir / "sessions" / day).iterdir())
        assert files and all(f.suffix == ".parquet" for f in files)
    # nothing of the staging directory survives next to the output
    assert sorted(p.name for p in prepared_dir.parent.iterdir()) == [prepared_dir.name]


@pytest.mark.ray
def test_sessions_columns(sessions):
    assert list(sessions.reset_index().columns) == [
        "session_id", "timestamp-first", "timestamp-last", "item_id-list", "category-list", "hour-list",
        "weekday-list", "price-list", "time_since_prev-list", SESSION_LENGTH, "day",
    ]


@pytest.mark.ray
def test_every_session_once_and_counts_match_pandas(sessions, raw_events, prepare_summary):
    assert sessions.index.is_unique
    sizes = raw_sizes(raw_events)
    kept = sizes[sizes >= 2]
    assert (sizes < 2).any()  # single-event sessions exist in the raw data and are dropped
    assert set(sessions.index) == set(kept.index)
    assert sessions[SESSION_LENGTH].to_dict() == kept.to_dict()
    assert sessions["item_id-list"].map(len).to_dict() == kept.clip(upper=20).to_dict()
    # per day, by the day of the session's first event
    first = raw_events.groupby("session_id")["timestamp"].min()[kept.index]
    per_day = (first // DAY_SECONDS - raw_events["timestamp"].min() // DAY_SECONDS + 1).astype(int)
    assert sessions["day"].sort_index().to_dict() == per_day.sort_index().to_dict()
    assert prepare_summary.sessions_per_day == per_day.value_counts().sort_index().to_dict()


@pytest.mark.ray
def test_sessions_crossing_midnight_are_not_split(sessions, raw_parts):
    days_per_session = raw_parts.groupby("session_id")["raw_day"].agg(["nunique", "min", "size"])
    crossing = days_per_session[(days_per_session["nunique"] > 1) & (days_per_session["size"] >= 2)]
    assert len(crossing) >= 1, "the synthetic data should have sessions that cross midnight"
    for sid, row in crossing.iterrows():
        assert (sessions.index == sid).sum() == 1, sid
        assert sessions.loc[sid, "day"] == row["min"]  # the day of its first event
        assert sessions.loc[sid, SESSION_LENGTH] == row["size"]  # all its events, from both days


@pytest.mark.ray
def test_summary_numbers(prepared_dir, prepare_summary, raw_events, data_config):
    sizes = raw_sizes(raw_events)
    kept = sizes[sizes >= 2]
    s = prepare_summary
    assert s.output == str(prepared_dir)
    assert s.events == len(raw_events)
    assert s.sessions == len(kept)
    assert s.items == raw_events["item_id"].nunique() + 3
    assert s.mean_session_length == pytest.approx(kept.mean())
    assert s.origin_day == int(raw_events["timestamp"].min() // DAY_SECONDS)
    assert sum(s.sessions_per_day.values()) == s.sessions
    assert s.seconds > 0
    text = s.to_text()
    assert f"{s.sessions:,} sessions" in text and f"{s.events:,} events" in text and "day 4:" in text

    info = load_prepare_info(prepared_dir)
    assert set(info) == {"data", "summary", "input"}
    assert info["data"] == json.loads(json.dumps(dataclasses.asdict(data_config)))
    assert info["summary"]["sessions"] == s.sessions and info["summary"]["origin_day"] == s.origin_day
    assert {int(k): v for k, v in info["summary"]["sessions_per_day"].items()} == s.sessions_per_day


@pytest.mark.ray
def test_day_helpers(prepared_dir):
    assert available_days(prepared_dir) == [1, 2, 3, 4]
    all_files = day_paths(prepared_dir)
    assert len(all_files) == len(list((prepared_dir / "sessions").glob("day=*/*.parquet")))
    assert all("/day=2/" in f for f in day_paths(prepared_dir, [2]))
    assert day_paths(prepared_dir / "sessions", [1]) == day_paths(prepared_dir, [1])
    with pytest.raises(FileNotFoundError, match=r"\[9\]"):
        day_paths(prepared_dir, [1, 9])
    with pytest.raises(ValueError, match=r"day\(s\) \[2\] named more than once in \[1, 2, 3, 2\]"):
        day_paths(prepared_dir, [1, 2, 3, 2])  # e.g. --train-days 1-3,2
    with pytest.raises(FileNotFoundError, match="raytr prepare"):
        load_prepare_info(prepared_dir / "sessions")


# --- the round trip: raw events through the saved workflow == what prepare wrote ---------------


@pytest.mark.ray
def test_round_trip_one_raw_day_file(prepared_dir, raw_dir, data_config, sessions, raw_parts):
    events = read_file(str(raw_dir / "day=2" / "part-0.parquet"), "parquet")
    workflow = load_workflow(prepared_dir / "workflow")
    out = transform_frame(workflow, sort_events(normalize_events(events, data_config), data_config))
    out = out.set_index("session_id")

    # sessions with every event in this file; the others cross midnight and are partial here
    days = raw_parts.groupby("session_id")["raw_day"].agg(set)
    whole = {sid for sid in events["session_id"].unique() if days[sid] == {2}}
    sizes = events.groupby("session_id").size()
    expected = {sid for sid in whole if sizes[sid] >= 2}
    assert len(expected) > 100
    assert expected <= set(out.index)
    assert len(whole) < events["session_id"].nunique()  # partial sessions exist and were excluded
    for sid in sorted(expected):
        assert_same_session(out.loc[sid], sessions.loc[sid], sid)


@pytest.mark.ray
def test_round_trip_one_session_in_memory(prepared_dir, data_config, sessions, raw_events):
    sizes = raw_sizes(raw_events)
    sid = sizes.idxmax()  # the longest session: also checks the cut to the last 20 events
    assert sizes[sid] > 20
    events = raw_events[raw_events["session_id"] == sid].sample(frac=1.0, random_state=0)  # any row order
    workflow = load_workflow(prepared_dir / "workflow")
    out = transform_frame(workflow, sort_events(normalize_events(events, data_config), data_config))
    assert len(out) == 1 and out.loc[0, "session_id"] == sid
    assert out.loc[0, SESSION_LENGTH] == sizes[sid] and len(out.loc[0, "item_id-list"]) == 20
    assert_same_session(out.loc[0], sessions.loc[sid], sid)


# --- bad input: InputError naming the problem, before Ray or any output ------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """Input checks must run before Ray starts: fail loudly if prepare gets that far."""

    def refuse():
        raise AssertionError("prepare reached ensure_ray(): the input was not rejected first")

    monkeypatch.setattr(prepare_module, "ensure_ray", refuse)


def _small(raw_events: pd.DataFrame) -> pd.DataFrame:
    return raw_events.head(300).copy()


def _run_bad(config, tmp_path: Path, write, match: str) -> None:
    source = tmp_path / "in"
    source.mkdir(parents=True)
    write(source)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        prepare(config, source, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temp sibling


@pytest.mark.parametrize(
    "case, change, match",
    [
        ("missing column", lambda f: f.drop(columns=["price"]), r"\['price'\].*missing"),
        ("string timestamp", lambda f: f.assign(timestamp=f["timestamp"].astype(str)), r"'timestamp'.*string"),
        ("string price", lambda f: f.assign(price=f["price"].astype(str)), r"'price' \(continuous feature\)"),
        ("float item id", lambda f: f.assign(item_id=f["item_id"] + 0.5), r"'item_id' \(item id\)"),
        ("no rows", lambda f: f.head(0), "has no rows"),
        ("milliseconds read as seconds", lambda f: f.assign(timestamp=f["timestamp"] * 1000),
         r"'timestamp' reaches 1.7\d+e\+12, after the year 5000 as unix seconds.*set data.timestamp_unit: ms"),
    ],
)
def test_bad_parquet_input(no_ray, tmp_path, raw_events, data_config, case, change, match):
    _run_bad(data_config, tmp_path, lambda d: change(_small(raw_events)).to_parquet(d / "a.parquet"), match)


def test_config_naming_a_missing_feature(no_ray, tmp_path, raw_events, data_config):
    config = dataclasses.replace(data_config, categorical=("category", "brand"))
    _run_bad(config, tmp_path, lambda d: _small(raw_events).to_parquet(d / "a.parquet"), "brand")


def test_null_item_ids(no_ray, tmp_path, raw_events, data_config):
    def write(d: Path) -> None:
        table = pa.Table.from_pandas(_small(raw_events), preserve_index=False)
        items = table.column("item_id").to_pylist()
        items[5] = None
        table = table.set_column(table.schema.get_field_index("item_id"), "item_id", pa.array(items, pa.int64()))
        pq.write_table(table, d / "a.parquet")

    _run_bad(data_config, tmp_path, write, r"'item_id'.*1 null")


def test_null_item_ids_in_csv(no_ray, tmp_path, raw_events, data_config):
    def write(d: Path) -> None:
        frame = _small(raw_events).astype({"item_id": "Int64"})
        frame.loc[[3, 7], "item_id"] = pd.NA
        frame.to_csv(d / "a.csv", index=False)

    _run_bad(data_config, tmp_path, write, r"'item_id'.*2 null")


@pytest.mark.parametrize(("column", "role"), [("session_id", "session id"), ("timestamp", "timestamp")])
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_null_session_ids_and_timestamps(no_ray, tmp_path, raw_events, data_config, column, role, fmt):
    """A null session id would drop or split its session; a null timestamp would move every day."""
    def write(d: Path) -> None:
        frame = _small(raw_events)
        frame[column] = frame[column].astype("Float64" if column == "timestamp" else "Int64")
        frame.loc[[4, 9, 11], column] = pd.NA
        frame.to_parquet(d / "a.parquet") if fmt == "parquet" else frame.to_csv(d / "a.csv", index=False)

    _run_bad(data_config, tmp_path, write, rf"a\.{fmt}: column '{column}' \({role}\) has 3 null")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize(
    "column, value, log_transform, match",
    [
        ("timestamp", np.nan, True, r"'timestamp' has 2 NaN or infinite"),  # a CSV's NaN is a null
        ("timestamp", np.inf, True, r"'timestamp' has 2 NaN or infinite"),
        ("price", np.inf, False, r"'price' has 2 infinite"),
        ("price", -np.inf, True, r"'price' has 2 infinite"),
        ("price", -1.0, True, r"'price' has 2 value\(s\) <= -1.*log_transform"),
        # finite in float64, not in the workflow's float32: inf, and log1p(-1) = -inf
        ("price", 1e300, False, r"'price' has 2 infinite or beyond float32"),
        ("price", -0.9999999999, True, r"'price' has 2 value\(s\) <= -1 \(in float32\).*log_transform"),
    ],
)
def test_values_that_would_poison_every_row(no_ray, tmp_path, raw_events, data_config, fmt, column, value,
                                            log_transform, match):
    """A NaN timestamp lands its session in a bogus day; one inf (or, under log1p, one <= -1) in a
    continuous feature makes Normalize's mean infinite and so the feature inf/NaN everywhere."""
    config = data_config if log_transform else dataclasses.replace(data_config, log_transform=())

    def write(d: Path) -> None:
        frame = _small(raw_events).astype({column: np.float64})
        frame.loc[[4, 9], column] = value
        if fmt == "csv":
            frame.to_csv(d / "a.csv", index=False)
            return
        # As Spark or Polars write it: NaN as a float value (pandas' to_parquet would make it a null).
        table = pa.Table.from_pandas(frame.drop(columns=[column]), preserve_index=False)
        pq.write_table(table.append_column(column, pa.array(frame[column].to_numpy())), d / "a.parquet")

    if fmt == "csv" and np.isnan(value):
        match = rf"'{column}' \({column}\) has 2 null"
    _run_bad(config, tmp_path, write, rf"a\.{fmt}: column {match}")


def test_csv_value_checks_see_the_types_of_the_whole_file(no_ray, tmp_path, data_config):
    """A CSV's column types come from the rows read: integer timestamps for the first 64 KiB and an
    `inf` further down make a float column, whose inf must be found (a prefix's schema said int)."""
    rows = 6000
    frame = pd.DataFrame({
        "session_id": np.arange(rows) // 3, "item_id": np.arange(rows) % 50 + 1,
        "timestamp": 1_700_000_000 + np.arange(rows), "category": np.arange(rows) % 7,
        "price": np.ones(rows),
    }).astype({"timestamp": object})
    frame.loc[rows - 10, "timestamp"] = "inf"
    frame.to_csv(tmp_path / "a.csv", index=False)
    assert (tmp_path / "a.csv").stat().st_size > 2 * (1 << 16)
    config = dataclasses.replace(data_config, log_transform=())
    with pytest.raises(InputError, match=r"a\.csv: column 'timestamp' has 1 NaN or infinite"):
        validate_input(config, tmp_path)


@pytest.mark.parametrize("column", ["item_id", "session_id", "category"])
def test_an_id_that_is_a_number_in_one_file_and_a_string_in_another(no_ray, tmp_path, raw_events, data_config, column):
    def write(d: Path) -> None:
        frame = _small(raw_events)
        frame.iloc[:150].to_parquet(d / "a.parquet")
        frame.iloc[150:].astype({column: str}).to_parquet(d / "b.parquet")

    _run_bad(data_config, tmp_path, write, rf"column '{column}' holds numbers in .*a\.parquet but strings in .*b\.parquet")


def test_negative_values_without_log_transform_and_nan_features_are_fine(tmp_path, raw_events, data_config):
    frame = _small(raw_events)
    frame.loc[[4, 9], "price"] = [-5.0, np.nan]  # FillMissing fills the NaN; no log, so -5 is a value
    frame.to_parquet(tmp_path / "a.parquet")
    assert validate_input(dataclasses.replace(data_config, log_transform=()), tmp_path).num_rows == len(frame)


def test_null_check_finds_the_column_after_a_nested_one(no_ray, tmp_path, raw_events, data_config):
    """Parquet statistics are per leaf column: a struct before the item id has two leaves."""
    def write(d: Path) -> None:
        frame = _small(raw_events)
        context = pa.array([{"a": 1, "b": None}] * len(frame), pa.struct([("a", pa.int64()), ("b", pa.int64())]))
        items = frame["item_id"].tolist()
        items[7] = None
        table = pa.Table.from_pandas(frame.drop(columns=["item_id"]), preserve_index=False)
        table = table.add_column(0, "context", context).append_column("item_id", pa.array(items, pa.int64()))
        pq.write_table(table, d / "a.parquet")

    _run_bad(data_config, tmp_path, write, r"'item_id' \(item id\) has 1 null")


def test_unreadable_or_unnamed_files_are_named(no_ray, tmp_path, data_config):
    source = tmp_path / "in"
    source.mkdir()
    (source / "events.json").write_text('{"session_id": 1}')
    with pytest.raises(InputError, match=r"events\.json.*not named \.parquet, \.csv or \.tsv.*read_format"):
        prepare(data_config, source / "events.json", tmp_path / "out")
    (source / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"broken\.parquet: cannot be read as parquet"):
        prepare(data_config, source / "broken.parquet", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("name", ["hour", "session_length"])
def test_raw_columns_named_like_generated_ones(no_ray, tmp_path, raw_events, data_config, name):
    from raytr.config import ConfigError

    config = dataclasses.replace(data_config, categorical=(*data_config.categorical, name))
    fix = " or leave 'hour' out of data.time_features" if name == "hour" else ""
    with pytest.raises(ConfigError, match=rf"data\.categorical names '{name}', a column raytr generates.*{fix}"):
        prepare(config, tmp_path, tmp_path / "out")
    if name == "hour":  # without the hour feature no hour column is generated: then the name is free
        prepare_module.check_generated_names(dataclasses.replace(config, time_features=False))
        prepare_module.check_generated_names(dataclasses.replace(config, time_features=("weekday",)))


def test_bad_partition_count(no_ray, tmp_path, raw_dir, data_config):
    with pytest.raises(InputError, match=r"partitions=0: expected >= 1"):
        prepare(data_config, raw_dir, tmp_path / "out", num_buckets=0)


@pytest.mark.parametrize("case", ["other contents", "a model bundle", "a file", "the input itself",
                                  "the input's parent"])
def test_outputs_whose_replacement_would_lose_data_are_refused(no_ray, tmp_path, raw_events, data_config, case):
    source = tmp_path / "in"
    source.mkdir()
    _small(raw_events).to_parquet(source / "a.parquet")
    if case == "other contents":
        output = tmp_path / "notes"
        output.mkdir()
        (output / "precious.txt").write_text("keep me")
        match = r"directory with other contents \(no prepare\.json"
    elif case == "a model bundle":  # `raytr train` copies the data's prepare.json into its output
        output = tmp_path / "bundle"
        (output / "model").mkdir(parents=True)
        (output / "model" / "config.json").write_text("{}")
        for name in ("prepare.json", "train_result.json", "schema.json"):
            (output / name).write_text("{}")
        match = r"bundle' holds model, train_result\.json, which an output of this command does not"
    elif case == "a file":
        output = tmp_path / "notes.txt"
        output.write_text("keep me")
        match = "is a file"
    else:
        output = source if case == "the input itself" else tmp_path
        match = "holds the input"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=match):
        prepare(data_config, source, output)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_one_bad_file_among_good_ones_is_named(no_ray, tmp_path, raw_events, data_config):
    def write(d: Path) -> None:
        _small(raw_events).to_parquet(d / "a.parquet")
        _small(raw_events).drop(columns=["category"]).to_parquet(d / "b.parquet")

    _run_bad(data_config, tmp_path, write, r"b\.parquet.*'category'")


def test_mixed_formats(no_ray, tmp_path, raw_events, data_config):
    def write(d: Path) -> None:
        _small(raw_events).to_parquet(d / "a.parquet")
        _small(raw_events).to_csv(d / "b.csv", index=False)

    _run_bad(data_config, tmp_path, write, "mixes file formats.*set data.read_format to read only that format's files")


def test_read_format_reads_its_files_and_names_the_ones_left_out(no_ray, tmp_path, raw_events, data_config, caplog):
    """data.read_format chooses the files of one format (it had left the others out silently)."""
    _small(raw_events).to_parquet(tmp_path / "a.parquet")
    _small(raw_events).to_csv(tmp_path / "b.csv", index=False)
    with caplog.at_level("WARNING", logger="raytr.data.events"):
        files = validate_input(dataclasses.replace(data_config, read_format="parquet"), tmp_path)
    assert [Path(p).name for p in files.paths] == ["a.parquet"] and files.num_rows == 300
    assert "read_format: parquet reads 1 file(s) and leaves out 1 of another format" in caplog.text
    assert "b.csv" in caplog.text
    (tmp_path / "b.csv").unlink()
    with pytest.raises(InputError, match=r"has no \.csv files \(data\.read_format: csv\)"):
        validate_input(dataclasses.replace(data_config, read_format="csv"), tmp_path)


def test_input_that_does_not_exist(no_ray, tmp_path, data_config):
    with pytest.raises(InputError, match="does not exist"):
        prepare(data_config, tmp_path / "nowhere", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_validate_input_counts_rows(tmp_path, raw_dir, raw_events, data_config):
    files = validate_input(data_config, raw_dir)
    assert files.format == "parquet" and files.num_rows == len(raw_events)
    assert len(files.paths) == len(list(raw_dir.glob("day=*/*.parquet")))
    _small(raw_events).to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    assert validate_input(data_config, tmp_path).format == "tsv"


# --- atomic output -----------------------------------------------------------------------------


@pytest.mark.ray
def test_failure_after_ray_work_leaves_no_output(tmp_path, raw_events, data_config, ray_cluster):
    """All sessions are single events: prepare buckets, sorts, fits, transforms, then finds no
    session to keep and fails, leaving neither the output nor its staging directory."""
    source = tmp_path / "in"
    source.mkdir()
    singles = raw_events.drop_duplicates("session_id").head(200)
    singles.to_parquet(source / "a.parquet")
    with pytest.raises(InputError, match="min_session_length=2"):
        prepare(data_config, source, tmp_path / "out", num_buckets=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.ray
def test_failure_mid_run_keeps_previous_output(tmp_path, raw_events, data_config, ray_cluster, monkeypatch):
    source = tmp_path / "in"
    source.mkdir()
    _small(raw_events).to_parquet(source / "a.parquet")
    out = tmp_path / "out"
    (out / "sessions" / "day=1").mkdir(parents=True)
    (out / "sessions" / "day=1" / "old.parquet").write_bytes(b"previous run")
    (out / PREPARE_JSON).write_text('{"previous": true}')
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def broken(*args, **kwargs):
        raise RuntimeError("transform failed")

    monkeypatch.setattr(prepare_module, "_transform_parts", broken)
    with pytest.raises(RuntimeError, match="transform failed"):
        prepare(data_config, source, out, num_buckets=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging sibling left
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "sessions" / "day=1" / "old.parquet").read_bytes() == b"previous run"
    assert json.loads((out / PREPARE_JSON).read_text()) == {"previous": True}


@pytest.mark.ray
def test_millisecond_timestamps_give_what_seconds_give(tmp_path, raw_events, data_config, ray_cluster):
    """timestamp_unit: ms is normalised once: the same sessions, days and time features as seconds."""
    frame = raw_events.head(600).copy()
    got = {}
    for unit, scale in (("s", 1), ("ms", 1000)):
        source = tmp_path / f"in-{unit}"
        source.mkdir()
        frame.assign(timestamp=frame["timestamp"] * scale).to_parquet(source / "a.parquet")
        summary = prepare(dataclasses.replace(data_config, timestamp_unit=unit), source, tmp_path / f"out-{unit}",
                          num_buckets=2)
        sessions = pd.read_parquet(tmp_path / f"out-{unit}" / "sessions")
        got[unit] = summary.sessions_per_day, sessions.sort_values("session_id").reset_index(drop=True)
    assert got["ms"][0] == got["s"][0] and min(got["s"][0]) == 1
    pd.testing.assert_frame_equal(got["ms"][1], got["s"][1])


@pytest.mark.ray
def test_datetime_timestamps_and_string_ids_give_what_seconds_and_numbers_give(tmp_path, raw_events, data_config,
                                                                              ray_cluster):
    """Ray Data hands out arrow-backed pandas columns: a datetime timestamp (naive or in any time
    zone) was read as nanoseconds taken for seconds, and a string session id broke the workflow's
    time features; a pandas category column is written dictionary-encoded. Each gives the sessions,
    days and features plain seconds and numbers give."""
    frame = raw_events.head(600).copy()
    stamps = pd.to_datetime(frame["timestamp"], unit="s")
    variants = {
        "seconds": frame,
        "naive": frame.assign(timestamp=stamps),
        "tokyo": frame.assign(timestamp=stamps.dt.tz_localize("UTC").dt.tz_convert("Asia/Tokyo")),
        "string-ids": frame.assign(session_id="s-" + frame["session_id"].astype(str)),
        "category-ids": frame.assign(item_id=frame["item_id"].astype("category")),  # dictionary-encoded
    }
    got = {}
    for name, variant in variants.items():
        source = tmp_path / f"in-{name}"
        source.mkdir()
        variant.to_parquet(source / "a.parquet")
        summary = prepare(data_config, source, tmp_path / f"out-{name}", num_buckets=2)
        sessions = pd.read_parquet(tmp_path / f"out-{name}" / "sessions")
        if name == "string-ids":
            sessions["session_id"] = sessions["session_id"].str.removeprefix("s-").astype(np.int64)
        got[name] = summary.sessions_per_day, sessions.sort_values("session_id").reset_index(drop=True)
    for name in ("naive", "tokyo", "string-ids", "category-ids"):
        assert got[name][0] == got["seconds"][0], name
        pd.testing.assert_frame_equal(got[name][1], got["seconds"][1], check_dtype=name != "string-ids",
                                      obj=name)


# --- the real YOOCHOOSE sample -----------------------------------------------------------------


@pytest.mark.ray
def test_prepare_yoochoose_sample(shared_data, tmp_path, ray_cluster):
    from raytr.config import load_config

    config = load_config(REPO_ROOT / "configs" / "yoochoose.yaml").data
    files = sorted(shared_data.glob("*.csv"))
    raw = pd.concat([read_file(str(f), "tsv") for f in files], ignore_index=True)
    sizes = raw.groupby("session_id").size()

    summary = prepare(config, shared_data, tmp_path / "yoochoose")
    assert summary.events == len(raw)
    assert summary.sessions == int((sizes >= 2).sum()) <= 17_713
    assert summary.items == raw["item_id"].nunique() + 3
    days = sorted(summary.sessions_per_day)
    assert days[0] == 1 and len(days) <= 10
    assert sum(summary.sessions_per_day.values()) == summary.sessions
    out = pd.read_parquet(tmp_path / "yoochoose" / "sessions")
    assert out["session_id"].is_unique and len(out) == summary.sessions
    assert out[SESSION_LENGTH].sum() == sizes[sizes >= 2].sum()
    assert config.time_features == ("hour", "time_since_prev")  # not the weekday: see configs/yoochoose.yaml
    assert sorted(out.columns) == sorted([
        "session_id", "timestamp-first", "timestamp-last", "item_id-list", "hour-list",
        "time_since_prev-list", SESSION_LENGTH, "day",
    ])


def test_header_only_csv_has_no_rows(no_ray, tmp_path, data_config):
    _run_bad(data_config, tmp_path,
             lambda d: (d / "a.csv").write_text("session_id,item_id,timestamp,category,price\n"), "has no rows")


def test_microseconds_read_as_milliseconds_are_refused(no_ray, tmp_path, raw_events, data_config):
    config = dataclasses.replace(data_config, timestamp_unit="ms")
    _run_bad(config, tmp_path, lambda d: _small(raw_events).assign(
        timestamp=(raw_events["timestamp"].head(300) * 1e6).astype("int64")).to_parquet(d / "a.parquet"),
        "after the year 5000 as unix milliseconds; the values look like microseconds or finer")


def test_dictionary_encoded_ids_are_their_values(tmp_path, raw_events, data_config):
    """pandas' category dtype is written as a dictionary column: checked and prepared as its values."""
    import pyarrow as pa

    from raytr.data.events import decode_dictionaries, validate_input

    frame = _small(raw_events).assign(item_id=lambda f: ("i" + f["item_id"].astype(str)).astype("category"))
    source = tmp_path / "in"
    source.mkdir()
    frame.to_parquet(source / "a.parquet")
    assert validate_input(data_config, source).num_rows == 300
    table = decode_dictionaries(pa.Table.from_pandas(frame))
    assert table.schema.field("item_id").type == pa.string()
    assert table.column("item_id").to_pylist() == list(frame["item_id"].astype(str))


@pytest.mark.ray
def test_a_freq_threshold_no_item_reaches_is_named(tmp_path, raw_events, data_config, ray_cluster):
    config = dataclasses.replace(data_config, freq_threshold=10**6)
    _run_bad(config, tmp_path, lambda d: _small(raw_events).to_parquet(d / "a.parquet"),
             r"data.freq_threshold=1000000: no item of .* occurs that often, so every item would be out of "
             "vocabulary")


# --- input files that differ from each other ----------------------------------------------------


def _prepared(config, source: Path, out: Path) -> tuple[dict, pd.DataFrame]:
    summary = prepare(config, source, out, num_buckets=2)
    return summary.sessions_per_day, pd.read_parquet(out / "sessions").sort_values("session_id").reset_index(drop=True)


@pytest.mark.ray
def test_files_that_store_the_same_events_differently_give_the_same_sessions(tmp_path, raw_events, data_config,
                                                                            ray_cluster):
    """Each raw file is read with its own schema: Ray's parquet reader merged every file's whole
    schema first and failed on a column the config does not name (int in one file, string in
    another), on a zoned timestamp beside a naive one, a datetime beside seconds and a pandas
    category column beside a plain one. An empty parquet file adds nothing; CSV files give the
    same sessions as parquet."""
    frame = raw_events.head(600).copy()
    a, b = frame.iloc[:300], frame.iloc[300:]
    stamps = lambda f: pd.to_datetime(f["timestamp"], unit="s")  # noqa: E731
    variants = {
        "unused column": (a.assign(referrer=1), b.assign(referrer="search")),
        "zoned and naive": (a.assign(timestamp=stamps(a).dt.tz_localize("UTC").dt.tz_convert("Asia/Tokyo")),
                            b.assign(timestamp=stamps(b))),
        "datetime and seconds": (a.assign(timestamp=stamps(a)), b),
        "category and plain": (a.assign(item_id=a["item_id"].astype("category")), b.astype({"item_id": "int32"})),
        "empty file": (frame, frame.head(0).astype(object)),
    }
    baseline = tmp_path / "in-baseline"
    baseline.mkdir()
    a.to_parquet(baseline / "a.parquet")
    b.to_parquet(baseline / "b.parquet")
    want = _prepared(data_config, baseline, tmp_path / "out-baseline")
    for n, (name, (first, second)) in enumerate(variants.items()):
        source = tmp_path / f"in-{n}"
        source.mkdir()
        first.to_parquet(source / "a.parquet")
        second.to_parquet(source / "b.parquet")
        got = _prepared(data_config, source, tmp_path / f"out-{n}")
        assert got[0] == want[0], name
        pd.testing.assert_frame_equal(got[1], want[1], obj=name)
    source = tmp_path / "in-csv"
    source.mkdir()
    a.to_csv(source / "a.csv", index=False)
    b.to_csv(source / "b.csv", index=False)
    got = _prepared(data_config, source, tmp_path / "out-csv")
    assert got[0] == want[0]
    pd.testing.assert_frame_equal(got[1], want[1], check_exact=False, rtol=1e-6)  # prices through text


@pytest.mark.ray
def test_csv_ids_keep_their_spelling_and_equal_timestamps_keep_the_logs_order(tmp_path, data_config, ray_cluster):
    """CSV ids are text: "007" and "7" are two items and "01"/"1" two sessions (inferred as numbers
    they were one); ids written plainly stay numbers. Events of one session at one timestamp, spread
    over files, come out in the log's order: files by name, rows in file order (Ray had merged the
    files' rows in any order)."""
    rows = [("01", "007", 100.0), ("01", "7", 100.0), ("1", "0007", 100.0), ("1", "7", 100.0), ("2", "5", 50.0),
            ("2", "6", 50.0)]
    source = tmp_path / "in-text"
    source.mkdir()
    frame = pd.DataFrame(rows, columns=["session_id", "item_id", "timestamp"]).assign(category=3, price=1.0)
    for i in range(len(frame)):  # one event a file: their order is the files' names
        frame.iloc[[i]].to_csv(source / f"part-{i:02d}.csv", index=False)
    files = validate_input(data_config, source)
    assert files.column_types["session_id"] == pa.string() and files.column_types["item_id"] == pa.string()
    assert files.rows == (1,) * 6
    _, sessions = _prepared(data_config, source, tmp_path / "out-text")
    items = pd.read_parquet(tmp_path / "out-text" / "workflow" / "categories" / "unique.item_id.parquet")["item_id"]
    decoded = {s: [items[i] for i in ids] for s, ids in zip(sessions["session_id"], sessions["item_id-list"])}
    assert decoded == {"01": ["007", "7"], "1": ["0007", "7"], "2": ["5", "6"]}

    plain = tmp_path / "in-plain"
    plain.mkdir()
    frame.assign(session_id=[10, 10, 11, 11, 12, 12], item_id=[9, 7, 8, 7, 5, 6]).iloc[::-1].to_csv(
        plain / "a.csv", index=False)  # one file, reversed: ties in that file's order
    files = validate_input(data_config, plain)
    assert files.column_types["session_id"] == pa.int64() and files.column_types["item_id"] == pa.int64()
    _, sessions = _prepared(data_config, plain, tmp_path / "out-plain")
    items = pd.read_parquet(tmp_path / "out-plain" / "workflow" / "categories" / "unique.item_id.parquet")["item_id"]
    assert {s: [items[i] for i in ids] for s, ids in zip(sessions["session_id"], sessions["item_id-list"])} == {
        10: [7, 9], 11: [7, 8], 12: [6, 5]}


def test_csv_ids_with_a_fraction_are_refused(no_ray, tmp_path, raw_events, data_config):
    _run_bad(data_config, tmp_path, lambda d: _small(raw_events).assign(item_id=lambda f: f["item_id"] + 0.5).to_csv(
        d / "a.csv", index=False), r"a\.csv: column 'item_id' \(item id\) holds numbers with a fraction or exponent "
                                   r"\(e\.g\. '\d+\.5'\)")


def test_csv_column_types_come_from_every_row_and_every_file(no_ray, tmp_path, data_config):
    """Prices that are whole numbers for the first blocks of a CSV (over 1 MiB) and fractions later
    are floats (the streaming reader had typed the column from its first block and refused the
    fractions); a category that is int in one file and float in another is read as float."""
    rows = 3000
    frame = pd.DataFrame({
        "session_id": np.arange(rows) // 3, "item_id": np.arange(rows) % 50 + 1,
        "timestamp": 1_700_000_000 + np.arange(rows), "category": np.arange(rows) % 7,
        "price": np.arange(rows).astype(object), "note": "x" * 600,
    })
    frame.loc[2500:, "price"] = frame.loc[2500:, "price"] + 0.5
    frame.to_csv(tmp_path / "a.csv", index=False)
    assert (tmp_path / "a.csv").stat().st_size > 1 << 20
    frame.head(10).assign(category=1.5).to_csv(tmp_path / "b.csv", index=False)
    files = validate_input(dataclasses.replace(data_config, log_transform=()), tmp_path)
    assert files.num_rows == rows + 10 and files.rows == (rows, 10)
    assert files.column_types["price"] == pa.float64() and files.column_types["category"] == pa.float64()


def test_datetimes_beyond_2262_are_read_and_placeholders_after_5000_refused(no_ray, tmp_path, raw_events,
                                                                           data_config):
    """pandas' nanoseconds end in 2262: a datetime column is converted in its own unit; a year-9999
    placeholder is refused as the year-5000 check refuses numbers."""
    from raytr.data.events import normalize_events as normalize

    late = pd.DataFrame({"session_id": [1, 1], "item_id": [2, 3], "category": [1, 1], "price": [1.0, 1.0],
                         "timestamp": np.array(["2300-01-01T00:00:00", "2300-01-01T00:00:01.5"],
                                               dtype="datetime64[us]")})
    assert normalize(late, data_config)["timestamp"].tolist() == [10_413_792_000.0, 10_413_792_001.5]
    frame = _small(raw_events).assign(timestamp=lambda f: pd.to_datetime(f["timestamp"], unit="s").astype(
        "datetime64[us]"))
    frame.loc[frame.index[5], "timestamp"] = np.datetime64("9999-12-31", "us")
    _run_bad(data_config, tmp_path, lambda d: frame.to_parquet(d / "a.parquet"),
             r"a\.parquet: column 'timestamp' reaches 9999-12-31 00:00:00, after the year 5000; drop those events")


@pytest.mark.ray
def test_an_output_inside_the_input_directory_is_not_read_as_input(tmp_path, raw_events, data_config, ray_cluster):
    """The second run of `prepare --input D --output D/prepared` read the first one's sessions as raw
    events (and refused them as missing columns)."""
    source = tmp_path / "in"
    source.mkdir()
    _small(raw_events).to_parquet(source / "a.parquet")
    first = prepare(data_config, source, source / "prepared", num_buckets=2)
    second = prepare(data_config, source, source / "prepared", num_buckets=2)
    assert second.events == first.events == 300 and second.sessions == first.sessions


def test_unsigned_ids_beyond_int64_beside_signed_ones_and_dates_after_9999_are_named(no_ray, tmp_path, raw_events,
                                                                                    data_config):
    """uint64 and int64 files unify to int64, which cannot hold 2^63 + 5: refused before Ray, naming
    the file (the cast failed inside a Ray task); a date after 9999 has no Python datetime."""
    def write_ids(d: Path) -> None:
        frame = _small(raw_events)
        frame.iloc[:150].astype({"session_id": "uint64"}).assign(
            session_id=lambda f: f["session_id"] + np.uint64(2**63)).to_parquet(d / "a.parquet")
        frame.iloc[150:].to_parquet(d / "b.parquet")

    _run_bad(data_config, tmp_path / "ids", write_ids,
             r"a\.parquet: column 'session_id' holds 92233720\d+, beyond int64, while other input files store it as "
             "signed integers")

    def write_dates(d: Path) -> None:
        table = pa.Table.from_pandas(_small(raw_events).drop(columns=["timestamp"]), preserve_index=False)
        stamps = pa.array(np.full(table.num_rows, 10**13), pa.timestamp("s"))
        pq.write_table(table.append_column("timestamp", stamps), d / "a.parquet")

    _run_bad(data_config, tmp_path / "dates", write_dates,
             r"a\.parquet: column 'timestamp' holds a date after the year 9999; drop those events")


@pytest.mark.ray
def test_an_input_error_in_a_read_task_reaches_the_caller_as_itself(tmp_path, raw_events, data_config, ray_cluster,
                                                                    monkeypatch):
    """A file that no longer reads as validate_input decided (changed in between): the read task's
    InputError names it, and it is raised as itself, not as Ray Data's UDF failure."""
    import ray

    real = prepare_module.validate_input

    def stale(config, path, exclude=None):  # as if a.parquet had held numbers when it was checked
        files = real(config, path, exclude)
        return dataclasses.replace(files, column_types={**files.column_types, "item_id": pa.int64()})

    monkeypatch.setattr(prepare_module, "validate_input", stale)
    before = ray.data.DataContext.get_current().raise_original_map_exception
    _run_bad(data_config, tmp_path, lambda d: _small(raw_events).assign(
        item_id=lambda f: "i" + f["item_id"].astype(str)).to_parquet(d / "a.parquet"),
        r"a\.parquet: column 'item_id' cannot be read as int64")
    assert ray.data.DataContext.get_current().raise_original_map_exception == before


@pytest.mark.ray
def test_integer_categoricals_with_nulls_keep_ids_beyond_2_53(tmp_path, raw_events, data_config, ray_cluster):
    """An int64 category or user id with nulls became float64 on the way to the workflow, so ids
    above 2^53 that differ in their last bits were one category (3 brands -> 1). They keep their
    values, in a file with nulls, one without and one whose user column is null in every row (a
    column of type null, refused before), and the online path encodes them the same."""
    from raytr.online import OnlinePreprocessor

    big = 2**60
    config = dataclasses.replace(data_config, categorical=("category", "brand"), user_col="user")
    frame = _small(raw_events)
    frame["brand"] = pd.array([None if i % 7 == 0 else big + i % 3 for i in range(len(frame))], dtype="Int64")
    frame["user"] = pd.array([None if s % 5 == 0 else big + s % 4 for s in frame["session_id"]], dtype="Int64")
    source = tmp_path / "in"
    source.mkdir()
    parts = [frame.iloc[:100], frame.iloc[100:200].dropna(), frame.iloc[200:].assign(user=None)]
    for name, part in zip("abc", parts):
        part.to_parquet(source / f"{name}.parquet")
    assert pq.read_schema(source / "c.parquet").field("user").type == pa.null()
    _, sessions = _prepared(config, source, tmp_path / "out")
    categories = tmp_path / "out" / "workflow" / "categories"
    brands = pd.read_parquet(categories / "unique.brand.parquet")["brand"]
    assert pd.api.types.is_integer_dtype(brands) and sorted(brands) == [big, big + 1, big + 2]
    users = pd.read_parquet(categories / "unique.user.parquet")["user"]
    assert sorted(users) == [big + k for k in range(4)]

    kept = pd.concat([part.astype({"user": "Int64"}) for part in parts])
    online = OnlinePreprocessor.from_workflow_dir(tmp_path / "out" / "workflow", config)
    for _, row in sessions.iterrows():
        events = kept[kept["session_id"] == row["session_id"]].sort_values("timestamp", kind="stable")
        want = [None if pd.isna(b) else int(b) for b in events["brand"]]
        assert [brands.get(i) for i in row["brand-list"]] == want[-len(row["brand-list"]):]
        first_user = events["user"].iloc[0]
        assert users.get(row["user-first"]) == (None if pd.isna(first_user) else int(first_user))
    sample = kept[kept["session_id"] == sessions["session_id"].iloc[0]]
    batch = online.transform([{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
                               for k, v in r.items()} for r in sample.to_dict("records")])
    row = sessions.iloc[0]
    np.testing.assert_array_equal(batch.categorical["brand-list"][0, :len(row["brand-list"])].numpy(),
                                  row["brand-list"])
