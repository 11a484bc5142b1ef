"""Entry point for `ray job submit --working-dir . -- python jobs/prepare.py ...`.

Same arguments as `raytr prepare` (run with --help). Joins the cluster in RAY_ADDRESS (set by
`ray job submit`) or starts a local Ray; paths may be local or shared storage visible to all nodes.
"""

import sys

from raytr.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
