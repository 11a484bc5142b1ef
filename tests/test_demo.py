"""`make demo` (`raytr demo`), the README's first command, end to end on a small generated dataset:
synth -> prepare -> train on Ray Train -> evaluate next to the baselines (serving has its own tests)."""

from __future__ import annotations

import pytest

from raytr.bundle import Bundle
from raytr.demo import run_demo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_runs_the_journey_and_leaves_a_servable_bundle(ray_cluster, tmp_path):
    report = run_demo(tmp_path / "demo", sessions=1_500, epochs=1, serve=False)
    titles = [title for title, _ in report.sections]
    assert titles[:3] == ["synth", "prepare", "train"] and titles[3].startswith("evaluate (train days 1-")
    table = dict(report.sections)[titles[3]]
    for row in ("gpt2 (clm)", "popularity", "item_knn"):
        assert row in table, table
    bundle = Bundle.load(str(tmp_path / "demo" / "model"))  # what `raytr serve --model` loads
    assert bundle.data.item_col == "item_id" and "eval_ndcg@10" in bundle.train_result["metrics"]
    assert "== train" in report.to_text()
