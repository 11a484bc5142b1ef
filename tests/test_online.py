"""raytr.online: the compiled workflow gives what the NVTabular executor gives, request by request.

Two workflows are fitted here in-process (no Ray, ~2 s each) on synthetic events:
    ints     integer item ids, a categorical with nulls in the fit data (a float vocabulary),
             log-transformed price, time features, freq_threshold 0, T = 20
    strings  string item ids, an integer categorical without nulls, no log transform,
             freq_threshold 3 (rare items -> OOV), timestamps in milliseconds, T = 5
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raytr.config import DataConfig, load_config
from raytr.data.events import normalize_events, sort_events
from raytr.data.synth import SynthConfig, generate_events
from raytr.data.workflow import fit_workflow, list_name, load_workflow, save_workflow, transform_frame
from raytr.features import NULL_ID, OOV_ID
from raytr.online import OnlineInputError, OnlinePreprocessor, Vocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fitted:
    config: DataConfig
    events: pd.DataFrame  # the raw fit events
    workflow_dir: Path
    online: OnlinePreprocessor

    def reference(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The NVTabular path, as `raytr prepare` runs it."""
        workflow = load_workflow(self.workflow_dir)
        return transform_frame(workflow, sort_events(normalize_events(frame, self.config), self.config))


def _fit(tmp: Path, config: DataConfig, events: pd.DataFrame) -> Fitted:
    sorted_file = tmp / "sorted.parquet"
    sort_events(normalize_events(events, config), config).to_parquet(sorted_file, index=False)
    workflow = fit_workflow(config, [str(sorted_file)], tmp / "fit")
    save_workflow(workflow, tmp / "workflow")
    return Fitted(config, events, tmp / "workflow", OnlinePreprocessor.from_workflow_dir(tmp / "workflow", config))


@pytest.fixture(scope="module")
def fitted_ints(tmp_path_factory) -> Fitted:
    config = load_config(REPO_ROOT / "configs" / "synthetic.yaml").data
    events = generate_events(SynthConfig(sessions=400, items=120, days=2, seed=3))
    events["category"] = events["category"].astype(np.float64)
    events.loc[events.sample(frac=0.05, random_state=0).index, "category"] = np.nan
    return _fit(tmp_path_factory.mktemp("online-ints"), config, events)


@pytest.fixture(scope="module")
def fitted_strings(tmp_path_factory) -> Fitted:
    base = load_config(REPO_ROOT / "configs" / "synthetic.yaml").data
    config = replace(base, log_transform=(), freq_threshold=3, max_sequence_length=5, timestamp_unit="ms")
    events = generate_events(SynthConfig(sessions=400, items=150, days=2, seed=4))
    events["item_id"] = "sku-" + events["item_id"].astype(str)
    events["timestamp"] = events["timestamp"] * 1000.0
    return _fit(tmp_path_factory.mktemp("online-strings"), config, events)


@pytest.fixture(params=["ints", "strings"])
def fitted(request) -> Fitted:
    return request.getfixturevalue(f"fitted_{request.param}")


# ------------------------------------------------------------------------------------ random requests
def random_request(fitted: Fitted, rng: np.random.Generator, sessions: int, first_id: int) -> pd.DataFrame:
    """Raw events of `sessions` sessions, shuffled across sessions: unseen and rare items, null
    categories (where the vocabulary has nulls), sessions of 1 to 3T events, duplicate timestamps."""
    c, raw = fitted.config, fitted.events
    T = c.max_sequence_length
    items = raw[c.item_col].unique()
    cats = raw["category"].dropna().unique()
    string_ids = raw[c.item_col].dtype == object
    null_categories = raw["category"].isna().any()
    scale = 1000.0 if c.timestamp_unit == "ms" else 1.0
    rows = []
    for s in range(sessions):
        length = int(rng.choice([1, 2, 3, 5, T - 1, T, T + 1, 2 * T + 3, 3 * T]))
        times = 1_714_521_600 + rng.uniform(0, 3 * 86_400) + np.cumsum(rng.exponential(90.0, length))
        dup = rng.random(length) < 0.25
        dup[0] = False
        for i in np.flatnonzero(dup):
            times[i] = times[i - 1]  # equal timestamps: kept in input order
        for i in range(length):
            item = rng.choice(items)
            roll = rng.random()
            if roll < 0.08:
                item = f"unseen-{rng.integers(1e6)}" if string_ids else int(900_000_000 + rng.integers(1e6))
            category = float(rng.choice(cats)) if null_categories else int(rng.choice(cats))
            if rng.random() < 0.05:
                category = 77_777.0 if null_categories else 77_777  # unseen category
            if null_categories and rng.random() < 0.08:
                category = np.nan
            rows.append({
                c.session_col: first_id + s,
                c.item_col: item,
                "category": category,
                "price": float(rng.choice([0.0, rng.lognormal(3.0, 1.0)])),
                c.timestamp_col: float(np.round(times[i], 3)) * scale,
            })
    frame = pd.DataFrame(rows)
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)  # unsorted input


def _session_matrix(values: dict[str, np.ndarray], columns: list[str]) -> np.ndarray:
    return np.stack([np.asarray(values[c], dtype=np.float64) for c in columns], axis=1)  # [L, F]


def assert_same_session(ours: np.ndarray, ref: np.ndarray, n_int: int) -> None:
    """Rows [L, F] (ints first) equal in order: tied timestamps keep the log order on both paths
    (the workflow's Groupby sorts by timestamp, then `event_order`)."""
    np.testing.assert_array_equal(ours[:, :n_int], ref[:, :n_int])
    np.testing.assert_allclose(ours[:, n_int:], ref[:, n_int:], rtol=1e-5, atol=1e-5)


def test_matches_the_nvtabular_executor_on_random_sessions(fitted: Fitted):
    c, online = fitted.config, fitted.online
    T = c.max_sequence_length
    cat_cols = [n for n in online.spec.categorical]
    cont_cols = list(online.spec.continuous)
    rng = np.random.default_rng(0)
    compared = ties = cut_sessions = 0
    for r in range(12):
        frame = random_request(fitted, rng, sessions=12, first_id=10_000 * (r + 1))
        ref = fitted.reference(frame)
        encoded = online.encode(frame)
        ours_pos = {sid: i for i, sid in enumerate(encoded.session_ids)}
        assert set(ref[c.session_col]) <= set(ours_pos)
        kept_ref = set(ref[c.session_col])
        for sid in set(ours_pos) - kept_ref:  # the executor filtered them, we keep them
            assert encoded.lengths[ours_pos[sid]] < c.min_session_length
        for _, row in ref.iterrows():
            i = ours_pos[row[c.session_col]]
            assert encoded.lengths[i] == row["session_length"]
            L = min(int(row["session_length"]), T)
            assert int(encoded.batch.lengths[i]) == L
            ts = np.sort(frame.loc[frame[c.session_col] == row[c.session_col], c.timestamp_col].to_numpy())[-L:]
            columns = [list_name(c.item_col), *cat_cols, *cont_cols]
            ours = {list_name(c.item_col): encoded.batch.item_ids[i, :L].numpy()}
            ours.update({n: encoded.batch.categorical[n][i, :L].numpy() for n in cat_cols})
            ours.update({n: encoded.batch.continuous[n][i, :L].numpy() for n in cont_cols})
            assert all(len(row[n]) == L for n in columns)
            assert not encoded.batch.item_ids[i, L:].any(), "right padding must be 0"
            assert_same_session(_session_matrix(ours, columns), _session_matrix(dict(row), columns),
                                n_int=1 + len(cat_cols))
            compared += 1
            ties += len(np.unique(ts)) < len(ts)
            cut_sessions += row["session_length"] > T
    assert compared > 100 and ties > 10 and cut_sessions > 10, (compared, ties, cut_sessions)


def test_one_event_sessions_get_a_row_in_first_appearance_order(fitted_ints: Fitted):
    c, raw = fitted_ints.config, fitted_ints.events
    item = raw[c.item_col].iloc[0]
    events = [
        {c.session_col: "b", c.item_col: item, "category": None, "price": 1.0, c.timestamp_col: 50.0},
        {c.session_col: "a", c.item_col: item, "category": None, "price": 1.0, c.timestamp_col: 10.0},
        {c.session_col: "b", c.item_col: item, "category": None, "price": 2.0, c.timestamp_col: 40.0},
    ]
    encoded = fitted_ints.online.encode(events)
    assert encoded.session_ids == ["b", "a"]
    assert encoded.lengths.tolist() == [2, 1]
    assert encoded.batch.lengths.tolist() == [2, 1]
    assert encoded.batch.item_ids.shape == (2, c.max_sequence_length)


def test_sessions_are_sorted_by_time_stably_and_cut_to_the_last_t_events(fitted_strings: Fitted):
    c, online = fitted_strings.config, fitted_strings.online
    T = c.max_sequence_length
    known = list(online.item_vocabulary.ids)[: T + 3]
    # Reverse time order; the first two share the latest timestamp, so both survive the cut to the
    # last T events, and must keep their input order.
    times = [float(1_000_000 * (T + 3 - i)) for i in range(T + 3)]
    times[1] = times[0]
    session = [{c.item_col: item, "category": None, "price": 1.0, c.timestamp_col: t} for item, t in zip(known, times)]
    encoded = online.encode_sessions([session])
    expected_order = list(range(T + 2, 1, -1)) + [0, 1]  # by time; the tie in input order
    expected = online.item_vocabulary.encode([known[j] for j in expected_order][-T:])
    assert encoded.batch.item_ids[0].tolist() == expected.tolist()
    assert encoded.lengths.tolist() == [T + 3]


def test_unknown_null_and_rare_values_map_as_categorify_maps_them(fitted_strings: Fitted):
    c, online = fitted_strings.config, fitted_strings.online
    counts = fitted_strings.events[c.item_col].value_counts()
    rare = counts[counts < c.freq_threshold].index[0]
    common = counts.index[0]
    vocab = online.item_vocabulary
    assert vocab.encode([rare, "never-seen", common, None]).tolist() == [OOV_ID, OOV_ID, vocab.ids[common], NULL_ID]
    assert vocab.decode(vocab.encode([common])) == [common]
    assert vocab.decode([0, 1, 2, 10**9]) == [None, None, None, None]
    # An integer vocabulary fitted without nulls: a null maps to 1 here; the NVTabular executor
    # raises on it instead (it casts the column to int64 first).
    category = next(s.vocabulary for p in online.plans if p.name == "category" for s in p.steps
                    if isinstance(getattr(s, "vocabulary", None), Vocabulary))
    assert category.kind == "int"
    known = next(iter(category.ids))
    assert category.encode([None, np.nan, float(known), str(known), "abc", 123_456_789]).tolist() == [
        NULL_ID, NULL_ID, category.ids[known], category.ids[known], OOV_ID, OOV_ID]


def test_bad_values_raise_errors_that_locate_the_field(fitted_ints: Fitted):
    c, online = fitted_ints.config, fitted_ints.online
    item = fitted_ints.events[c.item_col].iloc[0]

    def event(**overrides):
        return {c.item_col: item, "category": None, "price": 1.0, c.timestamp_col: 100.0, **overrides}

    cases = [
        (event(**{c.item_col: None}), c.item_col),
        (event(price=float("inf")), "price"),
        (event(price=-5.0), "price"),  # log(-4): non-finite after the fitted transforms
        (event(price="cheap"), "price"),
        (event(**{c.timestamp_col: float("nan")}), c.timestamp_col),
        (event(**{c.timestamp_col: "yesterday"}), c.timestamp_col),
    ]
    for bad, field_name in cases:
        with pytest.raises(OnlineInputError) as info:
            online.encode_sessions([[event(), bad]])
        assert info.value.loc == (0, 1, field_name), (bad, info.value.loc)
        assert field_name in str(info.value)
    with pytest.raises(OnlineInputError) as info:
        online.encode(pd.DataFrame([event()]))  # no session column
    assert info.value.loc == (c.session_col,)
    with pytest.raises(OnlineInputError):
        online.encode_sessions([[event()], []])


def test_encode_sessions_equals_encode_with_session_ids(fitted_ints: Fitted):
    rng = np.random.default_rng(5)
    frame = random_request(fitted_ints, rng, sessions=6, first_id=1)
    c = fitted_ints.config
    by_id = encode = fitted_ints.online.encode(frame)
    sessions = [frame[frame[c.session_col] == sid].drop(columns=[c.session_col]).to_dict("records")
                for sid in by_id.session_ids]
    by_list = fitted_ints.online.encode_sessions(sessions)
    assert by_list.lengths.tolist() == encode.lengths.tolist()
    assert by_list.batch.item_ids.equal(encode.batch.item_ids)
    assert by_list.batch.categorical.keys() == encode.batch.categorical.keys() and encode.batch.categorical
    for name, values in encode.batch.categorical.items():
        assert by_list.batch.categorical[name].equal(values)
    for name, values in encode.batch.continuous.items():
        assert by_list.batch.continuous[name].equal(values)


@pytest.mark.parametrize("name", ["ints", "strings"])
def test_timestamps_beyond_the_year_5000_in_the_configured_unit_are_refused(request, name):
    """As `raytr prepare` refuses them: a finer unit than data.timestamp_unit (milliseconds as
    seconds, microseconds as milliseconds) would silently change the time features."""
    from raytr.data.events import MAX_UNIX_SECONDS

    fitted: Fitted = request.getfixturevalue(f"fitted_{name}")
    c, online = fitted.config, fitted.online
    scale = 1000.0 if c.timestamp_unit == "ms" else 1.0
    event = {c.item_col: fitted.events[c.item_col].iloc[0], "category": None, "price": 1.0,
             c.timestamp_col: 1_714_550_000.0 * scale}
    online.encode_sessions([[event, {**event, c.timestamp_col: MAX_UNIX_SECONDS * scale}]])  # the bound itself
    for value in (1_714_550_000.0 * scale * 1000, -2 * MAX_UNIX_SECONDS * scale, 1e300):
        with pytest.raises(OnlineInputError) as info:
            online.encode_sessions([[event, {**event, c.timestamp_col: value}]])
        assert info.value.loc == (0, 1, c.timestamp_col) and info.value.value == value, info.value.loc
        unit, finer = ("seconds", "milliseconds") if c.timestamp_unit == "s" else ("milliseconds", "microseconds")
        assert f"timestamps are unix {unit}, and this looks like {finer}" in str(info.value), info.value
    frame = pd.DataFrame([{c.session_col: 1, **event}, {c.session_col: 1, **event, c.timestamp_col: 1e20}])
    with pytest.raises(OnlineInputError, match="beyond the year 5000") as info:
        online.encode(frame)
    assert info.value.loc == (1, c.timestamp_col)


@pytest.mark.parametrize("model_length", [10, 30])
def test_a_model_of_another_length_gets_sessions_cut_and_padded_as_the_loaders_do(fitted_ints: Fitted, model_length):
    """training.max_sequence_length may differ from the workflow's (20): the loaders keep the last
    `model_length` of the workflow's events and right-pad to `model_length` (`pad_rows`); online too."""
    import torch

    from raytr.data.loaders import RaggedColumn, pad_rows

    c, base = fitted_ints.config, fitted_ints.online
    spec = replace(base.spec, max_sequence_length=model_length)
    online = OnlinePreprocessor(c, base.plans, base.max_sequence_length, spec)  # no refusal of the length
    frame = random_request(fitted_ints, np.random.default_rng(7), sessions=12, first_id=1)
    ref = fitted_ints.reference(frame)  # the prepared sessions: up to 20 events each
    encoded = online.encode(frame)
    rows = [encoded.session_ids.index(sid) for sid in ref[c.session_col]]
    assert encoded.batch.item_ids.shape == (len(encoded), model_length)
    assert (ref["session_length"] > model_length).any() or model_length > c.max_sequence_length

    def offline(name: str, dtype: torch.dtype) -> torch.Tensor:
        lists = ref[name].tolist()
        offsets = torch.tensor(np.cumsum([0] + [len(v) for v in lists]), dtype=torch.int64)
        column = RaggedColumn(torch.as_tensor(np.concatenate(lists)), offsets)
        return pad_rows(column, torch.arange(len(lists)), model_length, dtype)

    assert encoded.batch.item_ids[rows].equal(offline(spec.item_id, torch.int64))
    for name in spec.categorical:
        assert encoded.batch.categorical[name][rows].equal(offline(name, torch.int64)), name
    for name in spec.continuous:
        torch.testing.assert_close(encoded.batch.continuous[name][rows], offline(name, torch.float32),
                                   rtol=1e-5, atol=1e-5)


def test_a_damaged_category_file_names_the_file_and_the_fix(fitted_strings: Fitted, tmp_path):
    import shutil

    from raytr.online import WorkflowCompileError

    workflow = tmp_path / "workflow"
    shutil.copytree(fitted_strings.workflow_dir, workflow)
    damaged = workflow / "categories" / "unique.item_id.parquet"
    damaged.write_bytes(damaged.read_bytes()[:10])  # a truncated copy
    with pytest.raises(WorkflowCompileError, match=r"unique\.item_id\.parquet cannot be read .*run `raytr prepare` again"):
        OnlinePreprocessor.from_workflow_dir(workflow, fitted_strings.config)
