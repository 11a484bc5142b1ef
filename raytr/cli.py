"""The `raytr` command: synth, prepare, train, evaluate, incremental, serve, demo.

Each subcommand parses its arguments into the config dataclasses, logs the resolved config, calls
one library function and exits non-zero with a one-line message on a user error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import yaml

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
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. training.num_train_epochs=3")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
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

    config = SynthConfig(sessions=args.sessions, items=args.items, days=args.days, seed=args.seed, users=args.users)
    frame = synthesize(config, args.output)
    print(f"wrote {len(frame):,} events of {frame['session_id'].nunique():,} sessions over {args.days} days to {args.output}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from raytr.data.prepare import prepare

    config = _load(args)
    summary = prepare(config.data, args.input, args.output, num_buckets=args.partitions)
    print(summary.to_text())


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
    p.add_argument("--output", required=True, help="output directory (replaced atomically)")
    p.add_argument("--partitions", type=int, default=None, help="session buckets (default: 2 x cluster CPUs)")
    p.set_defaults(func=cmd_prepare)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Subcommands defined further down the data path register themselves here (train, serve, ...).
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    _quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raytr.errors import USER_ERRORS

    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"raytr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
