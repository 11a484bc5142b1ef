"""`raytr demo`: the whole journey on generated data, as a new user's first run.

synth -> prepare (Ray Data + NVTabular) -> train (Ray Train) -> evaluate next to the baselines
-> serve (Ray Serve) and one recommendation over HTTP.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raytr import storage
from raytr.config import load_config
from raytr.data.layout import day_paths
from raytr.data.prepare import prepare
from raytr.data.synth import SynthConfig, synthesize
from raytr.training.incremental import evaluate_baselines
from raytr.training.trainer import train_prepared

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"


@dataclass
class DemoReport:
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, title: str, text: str) -> None:
        self.sections.append((title, text))
        log.info("demo: %s done", title)

    def to_text(self) -> str:
        return "\n\n".join(f"== {title}\n{text}" for title, text in self.sections)


# The test runs 1,500 sessions; far fewer leave days whose sessions hold fewer than 20 items.
MIN_SESSIONS = 1_000


def run_demo(output: str | Path, sessions: int = 20_000, epochs: int = 3, serve: bool = True,
             config_path: str | Path = DEFAULT_CONFIG) -> DemoReport:
    if storage.is_url(output):
        raise ValueError(f"demo output {str(output)!r}: the demo writes a local directory; the jobs take URLs")
    if sessions < MIN_SESSIONS:
        raise ValueError(f"demo --sessions {sessions}: expected >= {MIN_SESSIONS:,} (a week of days to train on and "
                         "evaluate, each with enough items for the top-20 metrics)")
    output = Path(output).resolve()  # Ray workers do not run in this directory
    report = DemoReport()
    raw, prepared, trained = output / "raw", output / "prepared", output / "model"
    config = load_config(config_path, {"training": {"output_dir": str(trained), "num_train_epochs": epochs}})

    log.info("demo 1/5: generating %d sessions into %s", sessions, raw)
    events = synthesize(SynthConfig(sessions=sessions), raw)
    report.add("synth", f"{len(events):,} events, {events['session_id'].nunique():,} sessions, "
                        f"{events['item_id'].nunique():,} items -> {raw}")

    log.info("demo 2/5: preparing sessions (Ray Data + NVTabular) into %s", prepared)
    summary = prepare(config.data, raw, prepared)
    report.add("prepare", summary.to_text())

    log.info("demo 3/5: training %s (%s) on Ray Train", config.model.body, config.model.objective)
    result = train_prepared(config, prepared)
    report.add("train", f"model bundle: {trained}\ncheckpoint: {result.checkpoint}")

    log.info("demo 4/5: evaluating on the last day next to the baselines")
    days = sorted(summary.sessions_per_day)
    train_paths, eval_paths = day_paths(prepared, days[:-1]), day_paths(prepared, days[-1:])
    from raytr.models import SessionModel

    spec = SessionModel.load(trained / "model").spec
    rows = {f"{config.model.body} ({config.model.objective})": {
        k.removeprefix("eval_"): v for k, v in result.metrics.items() if k.startswith("eval_")}}
    rows.update(evaluate_baselines(spec, train_paths, eval_paths, config.training.metrics_top_k, False))
    table = pd.DataFrame(rows).T[["ndcg@10", "recall@10", "ndcg@20", "recall@20", "mrr@20"]]
    report.add(f"evaluate (train days {days[0]}-{days[-2]}, evaluate on day {days[-1]})",
               table.to_string(float_format=lambda v: f"{v:.4f}"))

    if serve:
        log.info("demo 5/5: serving the bundle with Ray Serve and asking for one recommendation")
        report.add("serve", _one_recommendation(trained, events))
    return report


def _one_recommendation(bundle_dir: Path, events: pd.DataFrame) -> str:
    import httpx

    from serve.app import start_local, stop_local

    session_id = events["session_id"].iloc[0]
    session = events[events["session_id"] == session_id].head(5)
    body = {
        "session_id": str(session_id),
        "events": [{"item_id": int(r.item_id), "timestamp": float(r.timestamp),
                    "category": int(r.category), "price": float(r.price)} for r in session.itertuples()],
        "k": 5,
    }
    url = start_local(bundle_dir)
    try:
        answer = httpx.post(f"{url}/recommend", json=body, timeout=60).raise_for_status().json()
    finally:
        stop_local()
    return f"POST {url}/recommend\n{json.dumps(body)}\n->\n{json.dumps(answer, indent=2)}"
