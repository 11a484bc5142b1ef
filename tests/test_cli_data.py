"""The data half of the `raytr` command: synth and prepare, help, and one-line user errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raytr.cli import main, parse_overrides
from raytr.data.synth import SynthConfig, generate_events

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = str(REPO_ROOT / "configs" / "synthetic.yaml")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def raytr_command() -> list[str]:
    """The installed `raytr` script next to this interpreter, else `python -m raytr.cli`."""
    script = shutil.which("raytr", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "raytr.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*raytr_command(), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command, options", [("synth", ["--output", "--sessions", "--seed", "--users"]),
                                              ("prepare", ["--config", "--input", "--output", "--set"])])
def test_help_exits_zero(command, options):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout


def test_prepare_bad_column_is_one_line_error(tmp_path, raw_dir):
    out = tmp_path / "out"
    result = run_cli("prepare", "--config", SYNTHETIC, "--set", "data.item_col=product_id",
                     "--input", str(raw_dir), "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    # besides timestamped log lines (the resolved config), stderr is exactly one line: the error
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("raytr prepare: error:")
    assert "'product_id'" in lines[0] and "missing" in lines[0]
    assert not out.exists()


def test_synth_in_process(tmp_path, capsys):
    out = tmp_path / "raw"
    code = main(["synth", "--output", str(out), "--sessions", "120", "--items", "40", "--days", "2", "--seed", "5"])
    assert code == 0
    assert "of 120 sessions starting over 2 days" in capsys.readouterr().out
    written = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("day=*/*.parquet"))])
    expected = generate_events(SynthConfig(sessions=120, items=40, days=2, seed=5))
    assert len(written) == len(expected)
    assert sorted(written["session_id"].unique()) == sorted(expected["session_id"].unique())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--set", "data.max_sequence_length=1"], "data.max_sequence_length=1"),
        (["--set", "data.max_seq=30"], "max_seq"),
        (["--set", "model.body=lstm"], "model.body='lstm'"),
        (["--set", "max_sequence_length=30"], "expected section.key=value"),
        # YAML syntax in a --set value: the argument and the position, not PyYAML's '<unicode string>'
        (["--set", "data.categorical=[a, b"], "--set 'data.categorical=[a, b': invalid YAML at line 1"),
        (["--set", "model.hf_config={a: 1, a: 2}"], "key 'a' is given twice"),
    ],
)
def test_prepare_config_errors_exit_2(tmp_path, raw_dir, capsys, overrides, message):
    code = main(["prepare", "--config", SYNTHETIC, *overrides, "--input", str(raw_dir),
                 "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "raytr prepare: error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_prepare_missing_config_file(tmp_path, raw_dir, capsys):
    code = main(["prepare", "--config", str(tmp_path / "none.yaml"), "--input", str(raw_dir),
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "none.yaml" in capsys.readouterr().err


def test_prepare_config_file_with_bad_yaml_exits_2_naming_file_and_line(tmp_path, raw_dir, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  session_col: session_id\n  categorical: [category\nmodel: {}\n")
    code = main(["prepare", "--config", str(config), "--input", str(raw_dir), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"raytr prepare: error: config file {str(config)!r}: invalid YAML at line 4" in err
    assert "unicode string" not in err and not (tmp_path / "out").exists()


def test_os_path_errors_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    code = main(["synth", "--output", str(blocker / "sub"), "--sessions", "20", "--items", "10", "--days", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("raytr synth: error: ") and str(blocker) in err and "Not a directory" in err

    import raytr.data.synth as synth

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/srv/raw/day=1")

    monkeypatch.setattr(synth, "synthesize", denied)
    assert main(["synth", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "raytr synth: error: '/srv/raw/day=1': Permission denied\n"

    def bug(*args, **kwargs):  # an OS error naming no path is no user error: it keeps its traceback
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(synth, "synthesize", bug)
    with pytest.raises(PermissionError, match="operation not permitted"):
        main(["synth", "--output", str(tmp_path / "out")])


def test_a_user_error_raised_in_a_ray_task_is_its_own_one_line(tmp_path, raw_dir, capsys, monkeypatch):
    """Ray hands the driver a task's error wrapped, its message the remote traceback: the line
    printed is the task's own error's."""
    from ray.exceptions import RayTaskError

    import raytr.data.prepare as prepare_module
    from raytr.data.events import InputError

    def in_a_task(*args, **kwargs):
        cause = InputError("day=1/part-0.parquet: column 'timestamp' has 2 null values")
        raise RayTaskError("_sort_bucket", "Traceback (most recent call last): ...", cause).as_instanceof_cause()

    monkeypatch.setattr(prepare_module, "prepare", in_a_task)
    assert main(["prepare", "--config", SYNTHETIC, "--input", str(raw_dir), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("raytr prepare: error: day=1/part-0.parquet: column 'timestamp' has 2 "
                                       "null values\n")

    def a_bug_in_a_task(*args, **kwargs):  # not a user error: still a traceback
        raise RayTaskError("_sort_bucket", "Traceback ...", KeyError("bucket")).as_instanceof_cause()

    monkeypatch.setattr(prepare_module, "prepare", a_bug_in_a_task)
    with pytest.raises(KeyError):
        main(["prepare", "--config", SYNTHETIC, "--input", str(raw_dir), "--output", str(tmp_path / "out")])


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prepare", "--config", SYNTHETIC])
    assert info.value.code == 2
    assert "--input" in capsys.readouterr().err


def test_day_ranges():
    from raytr.cli import _days

    assert _days("1-3,5", "--days") == [1, 2, 3, 5] and _days("6", "--days") == [6] and _days(None, "--days") is None
    with pytest.raises(ValueError, match=r"^--eval-days '7-6': the range '7-6' runs backwards; write it as 6-7"):
        _days("7-6", "--eval-days")
    with pytest.raises(ValueError, match=r"^--days '1-x': expected numbers and ranges"):
        _days("1-x", "--days")
    with pytest.raises(ValueError, match=r"^--train-days '1-3,2': day\(s\) \[2\] named more than once"):
        _days("1-3,2", "--train-days")


@pytest.mark.parametrize("flag,value", [("--knn-decay", "2"), ("--knn-self-similarity", "-1"),
                                        ("--knn-decay", "nan"), ("--knn-decay", "x")])
def test_incremental_knn_settings_outside_0_1_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["incremental", "--config", SYNTHETIC, "--data", str(tmp_path / "prepared"), "--output",
              str(tmp_path / "out"), flag, value])
    assert info.value.code == 2
    assert f"raytr incremental: error: argument {flag}: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [(["train", "--config", SYNTHETIC, "--train-days", ""], "--train-days"),
                                        (["train", "--config", SYNTHETIC, "--eval-days", " "], "--eval-days"),
                                        (["evaluate", "--model", "no-model", "--days", ""], "--days")])
def test_an_empty_days_option_is_refused_naming_it_before_any_work(tmp_path, capsys, argv, flag):
    """An empty value (an unset shell variable) would otherwise mean the default days, or all of them."""
    code = main([*argv, "--data", str(tmp_path / "prepared"), *(["--output", str(tmp_path / "out")]
                                                                if argv[0] == "train" else [])])
    assert code == 2
    assert re.search(rf"raytr {argv[0]}: error: {flag} '\s*': expected days, e.g. 7, 1-5", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # nothing written, and the model (absent) not read


def test_a_negative_synth_seed_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["synth", "--output", str(tmp_path / "raw"), "--seed", "-1"]) == 2
    assert "raytr synth: error: --seed -1: expected an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_parse_overrides_reads_yaml_values():
    got = parse_overrides(["data.max_sequence_length=7", "data.categorical=[a, b]", "training.fp16=true",
                           "serve.host=0.0.0.0", "data.user_col=null", "model.dropout=0.25"])
    assert got == {
        "data": {"max_sequence_length": 7, "categorical": ["a", "b"], "user_col": None},
        "training": {"fp16": True},
        "serve": {"host": "0.0.0.0"},
        "model": {"dropout": 0.25},
    }
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["data.max_sequence_length"])


@pytest.mark.ray
def test_prepare_in_process_replaces_output(tmp_path, capsys, ray_cluster):
    """The CLI path end to end on a tiny input (in process: it joins the test session's cluster)."""
    raw = tmp_path / "raw"
    assert main(["synth", "--output", str(raw), "--sessions", "150", "--items", "30", "--days", "2"]) == 0
    out = tmp_path / "prepared"  # an earlier prepare output (it has the marker), with a day the new one lacks
    (out / "sessions" / "day=9").mkdir(parents=True)
    (out / "sessions" / "day=9" / "stale.parquet").write_text("from an older run")
    (out / "prepare.json").write_text("{}")
    capsys.readouterr()

    code = main(["prepare", "--config", SYNTHETIC, "--set", "data.max_sequence_length=8",
                 "--input", str(raw), "--output", str(out), "--partitions", "2"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "prepared" in printed and "sessions per day: day 1:" in printed
    assert not (out / "sessions" / "day=9").exists()
    info = json.loads((out / "prepare.json").read_text())
    assert info["data"]["max_sequence_length"] == 8
    sessions = pd.read_parquet(out / "sessions")
    assert sessions["item_id-list"].map(len).max() <= 8
    assert info["summary"]["sessions"] == len(sessions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_serve_stops_on_sigterm_as_on_ctrl_c(monkeypatch, capsys):
    """kill, systemd and docker stop send SIGTERM: its default action would end the process without
    stopping Serve and Ray (their processes stayed behind)."""
    import os
    import signal
    import time

    import serve.app

    stopped = []
    monkeypatch.setattr(serve.app, "start_local", lambda model, **options: "http://127.0.0.1:1")
    monkeypatch.setattr(serve.app, "stop_local", lambda: stopped.append(True))
    monkeypatch.setattr(time, "sleep", lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["serve", "--model", "runs/some-bundle"]) == 0
    assert stopped == [True] and signal.getsignal(signal.SIGTERM) is before
    assert "serving runs/some-bundle at http://127.0.0.1:1" in capsys.readouterr().out
