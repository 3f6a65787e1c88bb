"""Entry point for `ray job submit -- python jobs/kka_run.py [--config FILE] [key=value ...]`.

Runs the whole KKA loop on the cluster the job was submitted to: Ray sets RAY_ADDRESS for the
job's driver, and the engine joins that cluster instead of starting one. Exits non-zero with the
error on stderr when the config or data is wrong.
"""

import sys

from kka_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
