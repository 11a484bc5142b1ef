"""What the metrics' tie rule does to the quality figures (-> results/tie-rule.json).

Until 2026-12-07 `raytr.metrics` ranked a target tied with other items by id (smaller first); since
then a tied target ranks after all of them. Categorify numbers items by frequency over all the data
it was fitted on, evaluation days included, so the id rule handed a tie-heavy scorer (popularity,
item-kNN's zero scores) part of the evaluation days' popularity. The quality results in bench/results
were measured under the id rule; this re-scores on test, under both rules:
  - popularity and item-kNN of every dataset, at the choices recorded in results/quality.json,
    fitted as bench/quality.py fits them;
  - two neural models on YOOCHOOSE (xlnet-clm at temperature 8, the GRU at 20, as chosen there),
    trained for a few epochs only: whether their fp32 scores tie at all (a model's figures move
    only through its tied targets).

    python bench/tie_rule.py [--datasets synthetic,yoochoose,ml-100k] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA_DIR, RESULTS_DIR, code_version, machine_info, setup_logging, write_result  # noqa: E402
from bench.quality import (  # noqa: E402
    REPORTED, TOP_K, Hyper, QualityData, _train_checkpoints, baseline_batches, load_data, tuned_hyper,
)

# The neural models checked for ties, with the score temperature quality.json records for them.
NEURAL_CHECKED = (("xlnet-clm", "xlnet", "clm", 8.0), ("gru", "gru", "clm", 20.0))


def ranks_by_id(scores, targets):
    """The rule before 2026-12-07: 1 + #greater + #equal with a smaller id (-inf/NaN targets unranked)."""
    import torch

    from raytr.metrics import UNRANKED

    target_scores = scores.gather(1, targets[:, None])
    ids = torch.arange(scores.shape[1])
    rank = 1 + (scores > target_scores).sum(1) + ((scores == target_scores) & (ids[None, :] < targets[:, None])).sum(1)
    return rank.masked_fill(~(target_scores[:, 0] > float("-inf")), UNRANKED)


def score_both_rules(scorer, data: QualityData) -> dict[str, Any]:
    """Test metrics under the id rule and the pessimistic one, and how many targets tie."""
    import torch

    from raytr.evaluation import next_item_scores
    from raytr.metrics import RankingMetrics, ranks_of_targets

    by_id, pessimistic = RankingMetrics(TOP_K), RankingMetrics(TOP_K)
    tied = 0
    if hasattr(scorer, "eval"):
        scorer.eval()
    with torch.no_grad():
        for batch, history in data.test.batches(data.spec):
            # what bench/quality.py's evaluate ranks (MovieLens's history excluded too)
            scores, targets = next_item_scores(scorer, batch, data.exclude_seen, history if data.exclude_seen else None)
            keep = targets != 0
            scores, targets = scores[keep], targets[keep]
            by_id.update_ranks(ranks_by_id(scores, targets))
            pessimistic.update_ranks(ranks_of_targets(scores, targets))
            target_scores = scores.gather(1, targets[:, None])
            tied += int((((scores == target_scores).sum(1) > 1) & (target_scores[:, 0] > float("-inf"))).sum())
    a, b = by_id.compute(), pessimistic.compute()
    return {"sessions": by_id.count, "tied_targets": tied,
            "by_id": {k: a[k] for k in REPORTED}, "pessimistic": {k: b[k] for k in REPORTED}}


def baselines(data: QualityData, recorded: dict[str, Any]) -> dict[str, Any]:
    from raytr.baselines import Popularity, SessionItemKNN

    refit = data.refit_baseline_paths is not None
    knn = recorded["models"]["item_knn"]["choice"]
    fitted = {"popularity": Popularity(data.spec.item_cardinality),
              "item_knn": SessionItemKNN(data.spec.item_cardinality, **knn)}
    out = {}
    for name, model in fitted.items():
        model.fit(baseline_batches(data, refit=refit))
        out[name] = score_both_rules(model, data) | {"choice": recorded["models"][name]["choice"],
                                                      "recorded_test": {k: recorded["models"][name]["test"][k]
                                                                        for k in REPORTED}}
    return out


def neural(data: QualityData, epochs: int, work: Path) -> dict[str, Any]:
    from raytr.models import SessionModel

    out = {}
    for name, body, objective, temperature in NEURAL_CHECKED:
        hp = tuned_hyper(Hyper(), data.name, name)
        checkpoints, _, seconds = _train_checkpoints(data, body, objective, epochs, work / name, hp, data.train_paths)
        model = SessionModel.load(checkpoints[max(checkpoints)])
        model.set_score_temperature(temperature)
        out[name] = score_both_rules(model, data) | {"epochs": epochs, "score_temperature": temperature,
                                                      "train_seconds": seconds,
                                                      "note": "trained on the validation split's training days only, "
                                                              "for a few epochs: a tie count, not a quality figure"}
        shutil.rmtree(work / name, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="synthetic,yoochoose,ml-100k")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each neural model checked for ties")
    p.add_argument("--output", default="tie-rule")
    args = p.parse_args(argv)
    setup_logging()
    import torch

    torch.set_num_threads(1)
    recorded = {d["dataset"]: d for d in json.loads((RESULTS_DIR / "quality.json").read_text())["datasets"]}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    datasets: dict[str, Any] = {}
    for name in args.datasets.split(","):
        data = load_data(name)
        datasets[name] = {"baselines": baselines(data, recorded[name])}
        if name == "yoochoose" and args.epochs > 0:
            datasets[name]["neural"] = neural(data, args.epochs, DATA_DIR / "tie-rule")
        for model, res in {**datasets[name]["baselines"], **datasets[name].get("neural", {})}.items():
            print(f"{name:10s} {model:11s} tied {res['tied_targets']:5d}/{res['sessions']:5d}  "
                  + "  ".join(f"{k} {res['by_id'][k]:.4f}->{res['pessimistic'][k]:.4f}" for k in REPORTED))
    write_result(args.output, {
        "benchmark": "tie-rule", "machine": machine_info(), "started": started, "code": code_version(),
        "seconds": time.perf_counter() - t0, "command": " ".join(sys.argv), "datasets": datasets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
