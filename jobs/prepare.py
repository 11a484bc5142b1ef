"""Entry point for `ray job submit --working-dir . -- python jobs/prepare.py ...`.

Same arguments as `raytr prepare` (run with --help). Joins the cluster in RAY_ADDRESS (set by
`ray job submit`) or starts a local Ray; paths may be local, on storage mounted on all nodes, or
fsspec URLs such as s3://bucket/prefix (see the README, "Paths").
"""

import sys

from raytr.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
