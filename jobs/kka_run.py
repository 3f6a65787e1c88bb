"""Entry point for `ray job submit -- python jobs/kka_run.py [--config FILE] [--output NAME] [key=value ...]`
(or `python jobs/kka_run.py --resume DIR`); `kka submit run` submits it.

Runs the whole KKA loop (kka_ray/loop.py) on the cluster the job was submitted to: Ray sets
RAY_ADDRESS for the job's driver, and the engine joins that cluster instead of starting one. The
run directory goes to run.storage_path (a path or a URI; kka_ray/storage.py). The config text
that `kka submit` sends in KKA_CONFIG_YAML is read as --config. Exits non-zero with a one-line
`kka: error:` on stderr when the config or data is wrong.
"""

import sys

from kka_ray.cli import main
from kka_ray.drivers import job_config_args

if __name__ == "__main__":
    sys.exit(main(["run", *job_config_args(sys.argv[1:])]))
