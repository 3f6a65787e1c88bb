"""Entry point for `ray job submit -- python jobs/evaluate.py RUN_DIR... [--output DIR] [...]`;
`kka submit evaluate -- RUN_DIR... [--output DIR]` submits it.

Evaluation only: `kka eval` (kka_ray/tables) on finished run directories (paths on the
cluster), writing the paper's tables. Joins the cluster the job runs on; exits non-zero with a
one-line `kka: error:` on bad input.
"""

import sys

from kka_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
