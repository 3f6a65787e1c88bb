"""Loop-level switches that decide a stage without running models."""

from __future__ import annotations

import pytest

from kka_ray.config import load_config
from kka_ray.loop import KKARun


def test_final_iteration_false_skips_dpo_after_the_last_iteration_only(tmp_path):
    cfg = load_config(overrides=["run.iterations=2", "preference.final_iteration=false"])
    run = KKARun.create(cfg, str(tmp_path / "run"))
    # the last iteration returns at once (no store, no pairs, no Ray needed)
    assert run.preference(2) == {"n_pairs": 0, "skipped": True, "reason": "preference.final_iteration is false"}
    # an earlier iteration still runs DPO: it reads this iteration's evaluator split, absent here
    with pytest.raises(FileNotFoundError, match="split.json"):
        run.preference(1)
