"""The run directory module: the layout names every artefact where the loop writes it, the state
round-trips through state.json, and the one run-directory check gives one clear error."""

from __future__ import annotations

import json

import pytest

from kka_ray.rundir import RunLayout, RunState, is_run_dir, require_run_dir


def test_layout_paths_are_the_documented_ones(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.config == tmp_path / "config.yaml" and lay.state == tmp_path / "state.json"
    assert lay.anomaly_set(2) == tmp_path / "sets" / "iter_2.json"
    assert lay.split(3) == tmp_path / "evaluator" / "iter_3" / "split.json"
    assert lay.generated(1) == tmp_path / "generated" / "iter_1"
    assert lay.adapter(1) == tmp_path / "adapters" / "iter_1"
    assert lay.audit(1) == tmp_path / "audit" / "iter_1.json"
    assert lay.stage_record("iter1.generate") == tmp_path / "stages" / "iter1.generate.json"
    assert lay.shift(0) == tmp_path / "shift" / "v0.parquet"
    assert lay.detector("baseline_ssd") == tmp_path / "detector" / "baseline_ssd"


def test_state_round_trips_and_refuses_unknown_fields(tmp_path):
    state = RunState.load(tmp_path)  # a new run: nothing done
    assert (state.completed, state.adapter_version, state.adapter_path, state.finished) == ([], 0, None, False)
    state.mark("prep")
    state.mark("iter1.preference", adapter_path="/x/adapters/iter_1", adapter_version=1)
    state.mark("prep")  # recorded once
    again = RunState.load(tmp_path)
    assert again.completed == ["prep", "iter1.preference"] and again.done("prep") and not again.done("baselines")
    assert (again.adapter_version, again.adapter_path) == (1, "/x/adapters/iter_1")
    assert json.loads((tmp_path / "state.json").read_text())["adapter_version"] == 1
    with pytest.raises(AttributeError, match="no field 'adaptor_version'"):
        again.mark("baselines", adaptor_version=2)
    assert not again.done("baselines") and RunState.load(tmp_path).completed == ["prep", "iter1.preference"]


def test_a_path_is_a_run_directory_when_it_holds_its_config(tmp_path):
    assert not is_run_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.yaml: it is not a kka run directory"):
        require_run_dir(tmp_path)
    (tmp_path / "config.yaml").write_text("run: {iterations: 1}\n")
    assert is_run_dir(tmp_path) and require_run_dir(str(tmp_path)) == tmp_path
