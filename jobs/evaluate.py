"""Entry point for `ray job submit --working-dir . -- python jobs/evaluate.py ...`.

Same arguments as `raytr evaluate` (run with --help). It scores in the job's driver process
(no Ray workers); paths may be local, on storage mounted on all nodes, or
fsspec URLs such as s3://bucket/prefix (see the README, "Paths").
"""

import sys

from raytr.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
