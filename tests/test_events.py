"""Raw-event normalisation: timestamp units and types, file discovery and format sniffing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raytr.config import DataConfig
from raytr.data.events import InputError, find_input_files, normalize_events, sort_events

SECONDS = np.array([1_714_521_600.5, 1_714_521_700.25])


def _frame(ts) -> pd.DataFrame:
    return pd.DataFrame({"session_id": [1, 1], "item_id": [10, 11], "timestamp": ts})


def test_seconds_are_kept_as_float64():
    out = normalize_events(_frame(SECONDS), DataConfig())
    assert out["timestamp"].dtype == np.float64
    np.testing.assert_allclose(out["timestamp"], SECONDS)


def test_milliseconds_become_seconds():
    out = normalize_events(_frame((SECONDS * 1000).astype(np.int64)), DataConfig(timestamp_unit="ms"))
    np.testing.assert_allclose(out["timestamp"], SECONDS, atol=1e-3)


@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Berlin"])
def test_datetimes_become_utc_seconds(tz):
    stamps = pd.to_datetime(SECONDS, unit="s", utc=True)
    stamps = stamps.tz_localize(None) if tz is None else stamps.tz_convert(tz)
    out = normalize_events(_frame(stamps), DataConfig())
    np.testing.assert_allclose(out["timestamp"], SECONDS, atol=1e-6)


def test_only_configured_columns_are_kept_and_sorting_is_stable():
    frame = pd.DataFrame({"session_id": [2, 1, 1, 1], "item_id": [5, 7, 8, 9], "timestamp": [1.0, 3.0, 2.0, 2.0],
                          "noise": ["a", "b", "c", "d"]})
    out = sort_events(normalize_events(frame, DataConfig()), DataConfig())
    assert list(out.columns) == ["session_id", "item_id", "timestamp", "event_order"]
    # equal timestamps keep their log order (8 before 9), numbered for the workflow's tie-break
    assert out["item_id"].tolist() == [8, 9, 7, 5]
    assert out["event_order"].tolist() == [0, 1, 2, 3]


def test_tab_separated_csv_is_sniffed(tmp_path):
    (tmp_path / "clicks.csv").write_text("session_id\titem_id\ttimestamp\n1\t2\t3.0\n")
    files, fmt = find_input_files(tmp_path)
    assert fmt == "tsv" and files == [str(tmp_path / "clicks.csv")]


def test_comma_csv_stays_csv(tmp_path):
    (tmp_path / "clicks.csv").write_text("session_id,item_id,timestamp\n1,2,3.0\n")
    assert find_input_files(tmp_path)[1] == "csv"


def test_directory_without_data_files_is_an_input_error(tmp_path):
    (tmp_path / "README.md").write_text("no data here")
    with pytest.raises(InputError, match="no .parquet, .csv or .tsv files"):
        find_input_files(tmp_path)
