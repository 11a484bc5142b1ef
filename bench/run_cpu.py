"""`make bench`: every CPU benchmark in sequence, then bench/REPORT.md.

    python bench/run_cpu.py                 # train, loader, prepare, quality, profiles, report
    python bench/run_cpu.py --only train,report
    python bench/run_cpu.py --quick         # a smoke run: few steps/epochs, results under *-quick names

Each benchmark runs as its own process (`python bench/<name>.py ...`) and writes
bench/results/<name>.json; a failing one is reported and the others still run. The order puts
the timing-sensitive throughput benchmarks first and the training-step figure before the loader
(whose ratio to training consumption reads train-cpu.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_benchmarks  # noqa: E402

STEPS = ("train", "loader", "prepare", "quality", "profiles", "report")


def commands(quick: bool) -> dict[str, list[str]]:
    if quick:
        return {
            "train": ["train.py", "--configs", "cpu-5k", "--precision", "fp32", "--warmup", "2", "--steps", "3",
                      "--impls", "bare,raytr-model,raytr-local", "--output", "train-quick"],
            "loader": ["loader.py", "--sessions", "20000", "--repeats", "1", "--output", "loader-quick"],
            "prepare": ["prepare.py", "--sessions", "20000", "--output", "prepare-quick"],
            "quality": ["quality.py", "--datasets", "ml-100k", "--epochs", "ml-100k=1", "--output", "quality-quick"],
            "profiles": [],
            "report": [],
        }
    return {
        "train": ["train.py", "--repeats", "2"],
        "loader": ["loader.py", "--repeats", "3"],
        "prepare": ["prepare.py"],
        "quality": ["quality.py"],
        "profiles": ["profiles.py"],
        "report": ["report.py"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(STEPS), help=f"comma list of {list(STEPS)}")
    p.add_argument("--quick", action="store_true", help="smoke run with tiny sizes (results under *-quick names)")
    args = p.parse_args(argv)
    chosen = args.only.split(",")
    bad = [s for s in chosen if s not in STEPS]
    if bad:
        print(f"unknown step(s) {bad}; known: {list(STEPS)}", file=sys.stderr)
        return 2
    cmds = commands(args.quick)
    return run_benchmarks([(step, cmds[step]) for step in STEPS if step in chosen and cmds[step]])


if __name__ == "__main__":
    sys.exit(main())
