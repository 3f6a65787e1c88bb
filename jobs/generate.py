"""Entry point for `ray job submit -- python jobs/generate.py [--config FILE] [--output NAME] [key=value ...]`;
`kka submit generate` submits it.

Generation only, for scaling generation alone: prep (Eq. 1 scores, Eq. 2 representatives,
prompts) and iteration 1's generation (Eq. 3 descriptions, Eq. 4 images) through the resident
describer and drawer pools, into the run directory's generated/iter_1/*.parquet. `kka run
--resume DIR` continues the same run with baselines and evaluation. Joins the cluster the job
runs on; writes to run.storage_path; exits non-zero with a one-line `kka: error:` on bad input.
"""

import sys

from kka_ray.drivers import generate_main

if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
