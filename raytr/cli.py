"""The `raytr` command: synth, prepare, train, evaluate, incremental, serve, demo.

Each subcommand parses its arguments into the config dataclasses, logs the resolved config, calls
one library function and exits non-zero with a one-line message on a user error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any


log = logging.getLogger("raytr")

# Noise from the frozen Merlin 23.08 stack on current pandas/dask; silenced in Ray workers too.
QUIET_WARNINGS = "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning"


def _quiet() -> None:
    os.environ.setdefault("PYTHONWARNINGS", QUIET_WARNINGS)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--set section.key=value` pairs (value parsed as YAML) -> {section: {key: value}}."""
    from raytr.config import load_yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. training.num_train_epochs=3")
        out.setdefault(section, {})[name] = load_yaml(value, f"--set {item!r}")
    return out


def _load(args: argparse.Namespace, extra: dict[str, dict[str, Any]] | None = None):
    from raytr.config import load_config

    overrides = parse_overrides(getattr(args, "set", None) or [])
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    config = load_config(args.config, overrides)
    log.info("config: %s", json.dumps(config.to_dict(), default=str))
    return config


def cmd_synth(args: argparse.Namespace) -> None:
    from raytr.data.synth import SynthConfig, synthesize

    if args.seed < 0:  # numpy refuses a negative seed with a traceback (any larger one is fine)
        raise ValueError(f"--seed {args.seed}: expected an integer >= 0")
    config = SynthConfig(sessions=args.sessions, items=args.items, days=args.days, seed=args.seed, users=args.users)
    frame = synthesize(config, args.output)
    print(f"wrote {len(frame):,} events of {frame['session_id'].nunique():,} sessions starting over {args.days} days "
          f"to {args.output}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from raytr.data.prepare import prepare

    config = _load(args)
    summary = prepare(config.data, args.input, args.output, num_buckets=args.partitions)
    print(summary.to_text())


def _days(text: str | None, flag: str) -> list[int] | None:
    """"1-5" or "1,2,3" -> [1, 2, 3, 4, 5]; None (the option not given) -> None. `flag` names the
    option in errors."""
    if text is None:
        return None
    if not text.strip():  # `--days ''` (an unset shell variable, say) must not mean every day
        raise ValueError(f"{flag} {text!r}: expected days, e.g. 7, 1-5 or 1,3,6 (leave the option out for the "
                         "default)")
    days: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected numbers and ranges like 1-5 or 1,3,6") from None
        if last < first:
            raise ValueError(f"{flag} {text!r}: the range {part!r} runs backwards; write it as {last}-{first}")
        days += range(first, last + 1)
    repeated = sorted({d for d in days if days.count(d) > 1})
    if repeated:  # their sessions would be read twice
        raise ValueError(f"{flag} {text!r}: day(s) {repeated} named more than once")
    return days


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (argparse names the option in its error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails it too
        raise argparse.ArgumentTypeError(f"{text}: expected a number in [0, 1]")
    return value


def _training_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    training: dict[str, Any] = {"output_dir": args.output}
    if getattr(args, "epochs", None) is not None:
        training["num_train_epochs"] = args.epochs
    return {"training": training}


def cmd_train(args: argparse.Namespace) -> None:
    from raytr.training.trainer import train_prepared

    train_days, eval_days = _days(args.train_days, "--train-days"), _days(args.eval_days, "--eval-days")
    config = _load(args, _training_overrides(args))
    result = train_prepared(config, args.data, train_days, eval_days)
    metrics = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("eval_")}
    print(json.dumps({"model_dir": result.model_dir, "checkpoint": result.checkpoint, "metrics": metrics}, indent=2))


def _model_dir(path: str) -> str:
    from raytr import storage

    nested = storage.join(path, "model")
    return nested if storage.is_file(storage.join(nested, "config.json")) else path


def cmd_evaluate(args: argparse.Namespace) -> None:
    from raytr import storage
    from raytr.data.layout import day_paths
    from raytr.data.loaders import DataLoader, check_session_files
    from raytr.evaluation import check_same_workflow, evaluate_next_item
    from raytr.features import FIRST_ITEM_ID
    from raytr.models import SessionModel
    from raytr.training.trainer import resolve_paths

    days = _days(args.days, "--days")  # before the model is read
    model_dir = _model_dir(args.model)
    model = SessionModel.load(model_dir)
    check_same_workflow(storage.parent(model_dir), args.data)  # the bundle: model/ and workflow/
    catalog = model.spec.item_cardinality - FIRST_ITEM_ID  # the ids top_k can recommend
    out_of_range = [k for k in args.top_k if not 1 <= k <= catalog]
    if out_of_range:
        raise ValueError(f"--top-k {' '.join(map(str, out_of_range))}: expected cut-offs from 1 to the model's "
                         f"catalog size, {catalog} items (beyond it every session is a hit)")
    paths = day_paths(args.data, days) if days else resolve_paths(args.data)
    check_session_files(model.spec, paths)
    loader = DataLoader(model.spec, paths, args.batch_size, shuffle=False, engine="pyarrow")
    metrics = evaluate_next_item(model, loader, args.top_k, args.exclude_seen)
    if metrics.count == 0:
        raise ValueError(f"{args.data}: no session with >= 2 events to evaluate")
    print(json.dumps({k: round(v, 6) for k, v in metrics.compute().items()}))


def cmd_export(args: argparse.Namespace) -> None:
    from raytr import storage
    from raytr.models import SessionModel
    from raytr.models.export import check_export_path, export_scorer

    model_dir = _model_dir(args.model)
    output = args.output or storage.join(model_dir, "scorer.pt2")
    check_export_path(output)  # before the weights are loaded
    path = export_scorer(SessionModel.load(model_dir), output)
    print(f"exported the next-item scorer to {path} (load with raytr.models.export.ExportedScorer.load)")


def cmd_incremental(args: argparse.Namespace) -> None:
    from raytr.training.incremental import run_incremental

    config = _load(args, _training_overrides(args))
    result = run_incremental(config, args.data, args.output, args.start_day, args.end_day, args.mode,
                             baselines=not args.no_baselines, knn_recency_decay=args.knn_decay,
                             knn_self_similarity=args.knn_self_similarity)
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\naverage over days:")
    print(result.averages.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\ntable, JSON and plot in {result.output_dir}")


def cmd_serve(args: argparse.Namespace) -> None:
    import time

    from serve.app import app_options, start_local, stop_local

    config = _load(args).serve  # the defaults without --config
    model = args.model or config.model_dir
    url = start_local(model, host=args.host or config.host, port=args.port if args.port is not None else config.port, **app_options(config))
    print(f"serving {model} at {url} (docs at {url}/docs); Ctrl-C stops")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: what kill, systemd and docker stop send ends the same way

    previous = signal.signal(signal.SIGTERM, stop)  # the default would exit at once, leaving Ray's processes
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_local()


def cmd_demo(args: argparse.Namespace) -> None:
    from raytr.demo import run_demo

    report = run_demo(args.output, sessions=args.sessions, epochs=args.epochs, serve=not args.no_serve)
    print(report.to_text())


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config (configs/synthetic.yaml, configs/yoochoose.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.num_train_epochs=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytr", description="Session-based recommendation on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate raw interaction logs (parquet, partitioned by day)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--sessions", type=int, default=20_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--users", type=int, default=0, help="number of users (0: no user_id column)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="raw events -> session sequences, fitted workflow and schema")
    _add_config(p)
    p.add_argument("--input", required=True, help="raw events: a parquet/CSV/TSV file or a directory of them")
    p.add_argument("--output", required=True,
                   help="output directory: a new one, or an earlier prepare output, which is replaced")
    p.add_argument("--partitions", type=int, default=None, help="session buckets (default: 2 x cluster CPUs)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a session model on prepared data (Ray Train)")
    _add_config(p)
    p.add_argument("--data", required=True, help="a `raytr prepare` output directory")
    p.add_argument("--output", required=True, help="output directory: model bundle, checkpoints, metrics")
    p.add_argument("--epochs", type=int, default=None, help="overrides training.num_train_epochs")
    p.add_argument("--train-days", default=None, help="days to train on, e.g. 1-5 (default: all but the last)")
    p.add_argument("--eval-days", default=None, help="days to evaluate on, e.g. 6 (default: the last day)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="next-item metrics of a trained model, as one JSON object")
    p.add_argument("--model", required=True, help="a `raytr train` output (or its model/ directory)")
    p.add_argument("--data", required=True, help="a `raytr prepare` output, or parquet session files")
    p.add_argument("--days", default=None, help="days of a prepared directory, e.g. 7 or 6-7 (default: all)")
    p.add_argument("--top-k", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--exclude-seen", action="store_true", help="never count items already in the session")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="the model's next-item scorer as a torch.export program (.pt2)")
    p.add_argument("--model", required=True, help="a `raytr train` output (or its model/ directory)")
    p.add_argument("--output", default=None, help="the .pt2 file (default: <model dir>/scorer.pt2)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("incremental", help="train on day t, evaluate on day t+1, over a range of days")
    _add_config(p)
    p.add_argument("--data", required=True, help="a `raytr prepare` output directory")
    p.add_argument("--output", required=True, help="output directory: table, JSON, plot")
    p.add_argument("--start-day", type=int, default=None)
    p.add_argument("--end-day", type=int, default=None, help="last evaluated day (default: the last day)")
    p.add_argument("--mode", choices=["finetune", "retrain", "expanding"], default="finetune",
                   help="finetune: one model continues on each day; retrain: a new model per window on day t; "
                        "expanding: a new model per window on the days up to t (the baselines' data)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per day window")
    p.add_argument("--no-baselines", action="store_true", help="skip popularity and item-kNN")
    p.add_argument("--knn-decay", type=_fraction, default=1.0,
                   help="item-kNN recency decay in [0, 1] (bench/quality.py chooses it on validation)")
    p.add_argument("--knn-self-similarity", type=_fraction, default=0.0,
                   help="item-kNN similarity of an item with itself in [0, 1]: > 0 lets it recommend the "
                        "session's own items (bench/quality.py chooses it on validation)")
    p.set_defaults(func=cmd_incremental)

    p = sub.add_parser("serve", help="serve a trained model over REST (Ray Serve + FastAPI)")
    _add_config(p, required=False)
    p.add_argument("--model", default=None,
                   help="a `raytr train` output directory (the model bundle; default: the config's serve.model_dir)")
    p.add_argument("--host", default=None, help="default: serve.host (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: serve.port (8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="synth -> prepare -> train -> evaluate -> serve, end to end")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--sessions", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raytr.errors import user_error_message

    try:
        args.func(args)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"raytr {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
