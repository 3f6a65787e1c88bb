"""benchmarks/generation_scaling.py end to end on tiny models, at 1 and 2 replicas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_generation_scaling_benchmark_measures_both_replica_counts(tiny_cache, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import generation_scaling
    finally:
        sys.path.pop(0)
    out = tmp_path / "gs.json"
    overrides = [o for o in tiny_overrides(tiny_cache) if not o.startswith("ray.")]
    assert generation_scaling.main(["--replicas", "1,2", "--prompts", "4", "--results", str(out), *overrides]) == 0
    result = json.loads(out.read_text())
    rows = {r["replicas"]: r for r in result["rows"]}
    assert set(rows) == {1, 2}
    for n, r in rows.items():
        assert r["bare"]["descriptions"] > 0 and r["bare"]["descriptions_per_s"] > 0 and r["bare"]["images_per_s"] > 0
        s = r["stream"]
        assert s["descriptions"] > 0 and s["images"] <= s["descriptions"] and s["anomalies_per_s"] > 0
        assert s["describer_busy_seconds"] > 0 and s["drawer_busy_seconds"] > 0
        assert 0 < r["stream_efficiency"] < 10
    assert rows[1]["scaling_efficiency"] == pytest.approx(1.0)
    assert rows[2]["scaling_efficiency"] == pytest.approx(
        rows[2]["stream"]["anomalies_per_s"] / (2 * rows[1]["stream"]["anomalies_per_s"]))
    assert result["machine"] and set(result["goals_met"]) == {"stream_efficiency", "scaling_efficiency"}
