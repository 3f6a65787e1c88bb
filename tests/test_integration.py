"""End to end: two iterations of the whole KKA loop on a local Ray cluster with tiny real models
(a random-weight Llama with SmolLM2's tokenizer, a tiny pixel diffusion pipeline in diffusers
format, the real EfficientNet-Lite0) and real Fashion-MNIST images."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides
from kka_ray.config import load_config
from kka_ray.loop import KKARun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tiny_cache, tmp_path_factory):
    cfg = load_config(overrides=tiny_overrides(tiny_cache) + ["run.mode=add"])
    return KKARun.create(cfg, str(tmp_path_factory.mktemp("kka") / "run")).execute()


def test_two_iterations_fill_the_run_directory(finished_run):
    out, mode = finished_run, "add"

    assert (out / "config.yaml").is_file()
    assert load_config(out / "config.yaml").run.iterations == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("mode", "n_generated", "n_kept", "n_anomalies", "hard_fraction", "auroc", "stage_seconds"):
            assert key in r, key
        assert r["mode"] == mode
        assert 0.0 <= r["hard_fraction"] <= 1.0
        assert 0.0 <= r["auroc"] <= 1.0
        assert r["n_generated"] == 4 * 3  # prompts x samples per prompt
        assert r["n_kept"] <= r["n_generated"]
        assert set(r["stage_seconds"]) == {"generate", "evaluate", "update", "detect", "preference"}
        assert r["resource_seconds"]["cpu"] >= sum(r["stage_seconds"].values())  # every stage holds >= 1 CPU
        assert r["cpu_seconds_per_anomaly"] == pytest.approx(r["resource_seconds"]["cpu"] / r["n_kept"])
    # add: the set grows by what each iteration kept
    assert rows[1]["n_anomalies"] == rows[0]["n_kept"] + rows[1]["n_kept"]

    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"ssd", "sad"}
    assert baselines["ssd"]["auroc"] > 0.6  # real features on real data: far above chance

    for k in (1, 2):
        table = pq.read_table(out / "anomalies" / f"iter_{k}.parquet")
        for col in ("id", "iteration", "prompt", "text", "image", "adapter_version", "distance", "is_hard"):
            assert col in table.column_names
        assert table.num_rows == rows[k - 1]["n_kept"]
        assert set(table.column("iteration").to_pylist()) == {k}
        ids = table.column("id").to_pylist()
        assert len(set(ids)) == len(ids) and all(i.startswith(f"run/it{k}/") for i in ids)
        assert all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in table.column("image").to_pylist())
        assert (out / "evaluator" / f"iter_{k}" / "model.safetensors").is_file()
        assert (out / "detector" / f"iter_{k}" / "model.safetensors").is_file()
        assert (out / "adapters" / f"iter_{k}" / "adapter_model.safetensors").is_file()
    # iteration 2 was written by the adapter DPO produced in iteration 1
    assert set(pq.read_table(out / "anomalies" / "iter_2.parquet").column("adapter_version").to_pylist()) == {1}
    assert rows[1]["adapter_version"] == 1
    html = (out / "report.html").read_text()
    assert "Iteration 1" in html and "Iteration 2" in html and "<svg" in html
    assert json.loads((out / "state.json").read_text())["finished"] is True


def test_kka_eval_writes_the_tables_from_a_finished_run(finished_run, tmp_path, capsys):
    from kka_ray.cli import main

    # SSD is cheap: two seeds over every iteration (the KKA(0..2) ablation)
    assert main(["eval", str(finished_run), "--detectors", "ssd", "--seeds", "2", "--output", str(tmp_path / "ssd")]) == 0
    ablation = (tmp_path / "ssd" / "ablation.csv").read_text().splitlines()
    assert ablation[0].startswith("split,detector,mode,iteration,auroc_mean,auroc_std")
    assert [line.split(",")[3] for line in ablation[1:]] == ["0", "1", "2"]
    assert all(line.split(",")[-1] == "2" for line in ablation[1:])  # two seeds each
    # every other detector once, on the final anomaly set
    assert main(["eval", str(finished_run), "--detectors", "sad,simplenet,recontrast,cmda", "--seeds", "1",
                 "--iterations", "last", "--output", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "all" / "table.csv").read_text().splitlines()
    header = table[0].split(",")
    for col in ("detector", "variant", "auroc_mean", "auroc_std", "n_generated", "seeds"):
        assert col in header
    got = {(r.split(",")[1], r.split(",")[2]) for r in table[1:]}
    assert got == {("sad", "none"), ("sad", "kka_add"), ("simplenet", "none"), ("simplenet", "kka_add"),
                   ("recontrast", "none"), ("recontrast", "kka_add"), ("cmda", "none")}
    assert printed.startswith("| split | detector | variant | auroc_mean |")
    rows = [json.loads(l) for l in (tmp_path / "all" / "rows.jsonl").read_text().splitlines()]
    kka = [r for r in rows if r["variant"] == "kka_add"]
    assert all(r["iteration"] == 2 and r["n_anomalies_train"] + r["n_anomalies_val"] == r["n_anomaly_set"] for r in kka)
    assert all(0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["auroc_last"] <= 1.0 for r in rows)
    assert (tmp_path / "all" / "auroc_per_iteration.png").read_bytes()[:4] == b"\x89PNG"
    # cached: a second call fits nothing and reads the same numbers
    cached = sorted((finished_run / "eval" / "results").glob("*.json"))
    assert len(cached) == 6 + 7
    assert all(r["device"] == "cpu" for r in rows)
    # options, run directories and overrides intermixed; run.device names no setting, so the
    # results cached on this CPU answer for it
    assert main(["eval", "--detectors", "sad", str(finished_run), "--no-fit", "--output", str(tmp_path / "again"),
                 "run.device=cpu"]) == 0
    assert "sad,none" in (tmp_path / "again" / "table.csv").read_text()
    # the evaluation job's entry point (what `kka submit evaluate` runs on a cluster) reads the cache
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    done = subprocess.run([sys.executable, str(job), str(finished_run), "--detectors", "ssd", "--seeds", "2",
                           "--no-fit", "--output", str(tmp_path / "job")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "job" / "table.csv").read_text() == (tmp_path / "ssd" / "table.csv").read_text()
    bad = subprocess.run([sys.executable, str(job), str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "kka: error:" in bad.stderr and "nowhere" in bad.stderr

