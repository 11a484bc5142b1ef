"""The GPU benchmarks in one command (an H100 machine): training step, loaders, then REPORT.md.

    python bench/run_gpu.py
    python bench/run_gpu.py --configs 5k,50k      # a subset of bench/train.py's GPU configs

Runs `train.py --device cuda --configs <configs> --precision fp16,bf16`, `loader.py --device cuda`,
`profile_gpu.py` and `report.py`, each as its own process; see bench/README.md for running them one
by one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_benchmarks  # noqa: E402



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="all", help="train.py --configs (default: the four GPU configs)")
    p.add_argument("--precision", default="fp16,bf16")
    args = p.parse_args(argv)
    steps = [
        ["train.py", "--device", "cuda", "--configs", args.configs, "--precision", args.precision],
        ["loader.py", "--device", "cuda"],
        ["profile_gpu.py", "--configs", "50k", "--precision", "fp16", "--merge"],
        ["report.py"],
    ]
    return run_benchmarks([(step[0].removesuffix(".py"), step) for step in steps])


if __name__ == "__main__":
    sys.exit(main())
