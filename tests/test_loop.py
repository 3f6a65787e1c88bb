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


def test_too_few_threshold_pairs_fall_back_to_relative_pairs_when_the_kept_set_ranks_more(tmp_path, monkeypatch):
    """A far class: two anomalies pass as normal, so the threshold gives two pairs (fewer than
    preference.min_pairs). With the relative fallback the closest third of the kept rows meets the
    farthest third and DPO runs on those; with the fallback off the update is skipped. The DPO job
    and the shift measurement are stood in for (they run for real in test_preference.py)."""
    import kka_ray.preference.dpo as dpo

    kept = [{"id": i, "prompt_id": i % 4, "prompt": f"prompt {i % 4}", "text": f"a photo of thing number {i}.",
             "distance": float(i), "is_hard": i < 2, "guard_reason": None} for i in range(24)]
    records = [r for r in kept if r["is_hard"]] + [r for r in kept if r["distance"] > 20]
    seen = []
    monkeypatch.setattr(dpo, "run_dpo_ray_train", lambda base, pairs, *a, **kw: seen.append(pairs) or {"train_loss": 0.3})
    for fallback in (False, True):
        cfg = load_config(overrides=["run.iterations=3", "preference.shift_prompts=0", "preference.num_workers=2",
                                     f"preference.relative_fallback={str(fallback).lower()}"])
        run = KKARun.create(cfg, str(tmp_path / f"run{fallback}"))
        monkeypatch.setattr(run, "_preference_records", lambda k: (records, kept))
        result = run.preference(1)
        if not fallback:
            assert result == {"n_pairs": 2, "skipped": True, "reason": "fewer pairs than preference.min_pairs"}
            assert not seen
            continue
        assert result["relative_pairs"] is True and result["n_pairs"] == 8 and not result.get("skipped")
        # chosen: the closest third (distance < 8), rejected: the farthest third (distance >= 16)
        assert len(seen) == 1 and all(p.chosen_distance < 8 and p.rejected_distance >= 16 for p in seen[0])
