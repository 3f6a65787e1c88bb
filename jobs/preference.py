"""Entry point for `ray job submit -- python jobs/preference.py --run-dir DIR --iteration K`;
`kka submit preference --run-dir DIR --iteration K` submits it.

The DPO update only (Eq. 7): preference pairs from iteration K's hard/easy split, TRL DPO with
LoRA, adapter K written into the run directory (a path or a storage URI, downloaded and uploaded
back by kka_ray/storage.py). Needs iterK.evaluate complete; exits non-zero with a one-line
`kka: error:` naming what is missing otherwise.
"""

import sys

from kka_ray.drivers import preference_main

if __name__ == "__main__":
    sys.exit(preference_main(sys.argv[1:]))
