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


def _records(n: int) -> list[dict]:
    """n hard and n easy kept rows, one prompt each: n same-prompt pairs."""
    rows = []
    for i in range(n):
        rows.append({"prompt_id": i, "prompt": f"prompt {i}", "text": f"a photo of a hard thing {i}.", "distance": 0.1, "is_hard": True})
        rows.append({"prompt_id": i, "prompt": f"prompt {i}", "text": f"a photo of a far thing {i}.", "distance": 9.0, "is_hard": False})
    return rows


def test_too_few_pairs_skip_dpo_and_an_update_that_collapses_the_describer_is_rolled_back(tmp_path, monkeypatch):
    """The loop's decisions around DPO, with the DPO job and the describer-shift measurement stood in
    for (both run for real in test_preference.py and test_integration.py): fewer pairs than
    preference.min_pairs skip the update; an update after which the describer keeps less than
    preference.rollback_below of its former share is undone, and the previous adapter serves on."""
    import kka_ray.preference.dpo as dpo

    cfg = load_config(overrides=["run.iterations=3", "preference.num_workers=2"])
    run = KKARun.create(cfg, str(tmp_path / "run"))
    monkeypatch.setattr(run, "_preference_records", lambda k: (_records(3), None))
    assert run.preference(1) == {"n_pairs": 3, "skipped": True, "reason": "fewer pairs than preference.min_pairs"}

    calls = []
    monkeypatch.setattr(dpo, "run_dpo_ray_train", lambda *a, **kw: calls.append(kw["prev_adapter"]) or {"train_loss": 0.01})
    monkeypatch.setattr(run, "_preference_records", lambda k: (_records(6), None))
    monkeypatch.setattr(run, "_shift_set", lambda version: version)
    kept_share = {0: 0.8, 1: 0.03, 2: 0.75}
    monkeypatch.setattr(run, "_describer_shift", lambda k, before, after: {
        "before": {"kept_share": kept_share[before]}, "after": {"kept_share": kept_share[after]}})
    collapsed = run.preference(1)
    assert collapsed["n_pairs"] == 6 and collapsed["rolled_back"] is True
    assert (run.state.adapter_version, run.state.adapter_path) == (0, None)
    healthy = run.preference(2)  # trains on from the adapter still served (none), measured against v0
    assert calls == [None, None] and "rolled_back" not in healthy
    assert run.state.adapter_version == 2 and run.state.adapter_path.endswith("iter_2")
