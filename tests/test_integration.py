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
    # DPO as a two-worker Ray Train job (data parallel; the one-task path runs in the other loop tests)
    cfg = load_config(overrides=tiny_overrides(tiny_cache) + ["run.mode=add", "preference.num_workers=2"])
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
        assert set(r["stage_seconds"]) == {"generate", "guard", "evaluate", "audit", "update", "detect", "preference"}
        # the audit: the judge's figures of the kept set, beside its own false-normal rate
        assert r["normal_leak"] is None or 0.0 <= r["normal_leak"] <= 1.0
        assert 0 <= r["coverage"] <= 9 and 0.0 <= r["judge_false_normal_rate"] <= 1.0
        assert sum((r["judged_kept"] or {}).values()) == r["n_kept"]
        assert r["n_kept"] + sum(r["guard_drops"].values()) == r["n_drawn"]
        assert r["resource_seconds"]["cpu"] >= sum(r["stage_seconds"].values())  # every stage holds >= 1 CPU
        assert r["cpu_seconds_per_anomaly"] == pytest.approx(r["resource_seconds"]["cpu"] / r["n_kept"])
        # money at the default prices: CPUs only here, generate holds the describer's and the drawer's,
        # preference its two Ray Train workers' (one CPU each)
        cfg = load_config(out / "config.yaml")
        assert (cfg.describer.resources.num_cpus, cfg.drawer.resources.num_cpus, r["resource_seconds"]["gpu"]) == (1, 1, 0)
        assert (cfg.preference.num_workers, cfg.preference.resources.num_cpus) == (2, 1)
        by_hand = cfg.cost.cpu_per_hour / 3600 * (sum(r["stage_seconds"].values()) + r["stage_seconds"]["generate"]
                                                  + r["stage_seconds"]["preference"])
        assert r["cost"] == pytest.approx(by_hand) and r["currency"] == "USD"
        assert r["cost_per_anomaly"] == pytest.approx(by_hand / r["n_kept"])
        assert r["cost_per_hard_anomaly"] == (pytest.approx(by_hand / r["n_hard"]) if r["n_hard"] else None)
    # add: the set grows by what each iteration kept
    assert rows[1]["n_anomalies"] == rows[0]["n_kept"] + rows[1]["n_kept"]

    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"ssd", "sad"}
    assert baselines["ssd"]["auroc"] > 0.6  # real features on real data: far above chance

    for k in (1, 2):
        table = pq.read_table(out / "anomalies" / f"iter_{k}.parquet")
        for col in ("id", "iteration", "prompt", "text", "image", "adapter_version", "distance", "is_hard"):
            assert col in table.column_names
        assert table.num_rows == rows[k - 1]["n_drawn"]  # every drawn item, dropped ones with their reason
        reasons = table.column("guard_reason").to_pylist()
        assert sum(r is None for r in reasons) == rows[k - 1]["n_kept"]
        distances = table.column("distance").to_pylist()
        assert all((d == d) == (r is None) for d, r in zip(distances, reasons))  # only kept rows are scored
        audit = json.loads((out / "audit" / f"iter_{k}.json").read_text())
        assert set(audit["items"]) == set(table.column("id").to_pylist())
        assert audit["kept"]["n"] + audit["dropped"]["n"] == table.num_rows
        assert set(table.column("iteration").to_pylist()) == {k}
        ids = table.column("id").to_pylist()
        assert len(set(ids)) == len(ids) and all(i.startswith(f"run/it{k}/") for i in ids)
        assert all(img[:8] == b"\x89PNG\r\n\x1a\n" for img in table.column("image").to_pylist())
        assert (out / "evaluator" / f"iter_{k}" / "model.safetensors").is_file()
        assert (out / "detector" / f"iter_{k}" / "model.safetensors").is_file()
    # DPO after the last iteration is off by default (preference.final_iteration)
    assert (out / "adapters" / "iter_1" / "adapter_model.safetensors").is_file() and not (out / "adapters" / "iter_2").exists()
    # the describer shift of update 1: fixed held-out prompts before (v0) and after (v1), same seeds
    shift = rows[0]["describer_shift"]
    assert set(shift) == {"before", "after", "changed_texts"}
    for side in ("before", "after"):
        assert shift[side]["n_samples"] == 2 * 3 and shift[side]["n_kept"] <= shift[side]["n_drawn"] <= 6
        assert 0.0 <= shift[side]["kept_share"] <= 1.0
    assert (out / "shift" / "v0.parquet").is_file() and (out / "shift" / "v1.parquet").is_file()
    assert rows[1]["describer_shift"] is None and 0.0 <= shift["changed_texts"] <= 1.0
    # iteration 2 was written by the adapter DPO produced in iteration 1
    assert set(pq.read_table(out / "anomalies" / "iter_2.parquet").column("adapter_version").to_pylist()) == {1}
    assert rows[1]["adapter_version"] == 1
    assert rows[0]["dpo_workers"] == 2 and rows[1]["dpo_workers"] is None  # no DPO after the last iteration
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



def test_a_packed_run_unpacks_elsewhere_and_evaluates_as_the_original(finished_run, tmp_path, capsys):
    """``kka pack`` drops the bulk (normal features, checkpoints); after ``kka unpack`` the features
    are recomputed bit for bit and a detector scores exactly as on the original run. The
    Fashion-MNIST benchmark's per-fit records restore onto the unpacked run by anomaly-set digest."""
    import sys
    import tarfile
    from pathlib import Path

    import numpy as np

    from kka_ray.archive import pack_run, unpack_run
    from kka_ray.cli import main
    from kka_ray.rundir import RunInputs
    from kka_ray.tables.runner import evaluate_run

    packed = pack_run(finished_run, tmp_path / "run.tar.gz", include_eval=False)
    assert pack_run(finished_run, tmp_path / "again.tar.gz", include_eval=False).read_bytes() == packed.read_bytes()
    with tarfile.open(packed) as tar:
        names = set(tar.getnames())
    assert {"config.yaml", "state.json", "sets/iter_2.json", "prep/normalizer.safetensors"} <= names
    assert not any(n.startswith(("prep/features", "detector/", "evaluator/", "ray_train/", "eval/")) for n in names)
    assert packed.stat().st_size < sum(p.stat().st_size for p in finished_run.rglob("*") if p.is_file()) / 10

    moved = unpack_run(packed, tmp_path / "moved")
    original, restored = RunInputs(finished_run), RunInputs(moved)
    assert restored.completed_iterations() == original.completed_iterations() == [1, 2]
    assert restored.set_digest(2) == original.set_digest(2) != original.set_digest(1)
    assert restored.n_generated(2) == original.n_generated(2)
    assert not (moved / "prep" / "features.safetensors").exists()
    for part in ("train", "holdout", "test"):
        np.testing.assert_array_equal(restored.features()[part], original.features()[part])
    assert (moved / "prep" / "features.safetensors").is_file()  # saved for the next reader
    for k in (1, 2):
        assert pq.read_table(moved / "anomalies" / f"iter_{k}.parquet").equals(pq.read_table(finished_run / "anomalies" / f"iter_{k}.parquet"))

    # --drop-features: the store travels without its backbone features, recomputed from its PNGs on unpack
    slim = pack_run(finished_run, tmp_path / "slim.tar.gz", include_eval=False, drop_features=True)
    assert slim.stat().st_size < packed.stat().st_size
    with tarfile.open(slim) as tar:
        assert "features" not in pq.read_schema(tar.extractfile("anomalies/iter_1.parquet")).names
    slimmed = unpack_run(slim, tmp_path / "slimmed")
    for k in (1, 2):
        a, b = (pq.read_table(d / "anomalies" / f"iter_{k}.parquet") for d in (finished_run, slimmed))
        assert a.column_names == b.column_names and a.drop_columns(["features"]).equals(b.drop_columns(["features"]))
        np.testing.assert_allclose(np.array(b.column("features").to_pylist()), np.array(a.column("features").to_pylist()),
                                   rtol=1e-3, atol=1e-4)  # generation batched and threaded differently

    # SSD fitted anew on the unpacked run scores as the cached fit of the original
    before = {(r["variant"], r["iteration"]): r for r in evaluate_run(finished_run, ["ssd"], seeds=1)}
    after = {(r["variant"], r["iteration"]): r for r in evaluate_run(moved, ["ssd"], seeds=1)}
    assert set(after) == set(before) and len(after) == 3
    # without the no-anomaly rows (another run of the split has them) SSD keeps its KKA rows and
    # CMDA, which takes no anomalies, has nothing to fit
    assert [r["variant"] for r in evaluate_run(moved, ["ssd"], seeds=1, include_none=False)] == ["kka_add"] * 2
    assert evaluate_run(moved, ["cmda"], seeds=1, include_none=False) == []
    for key, row in after.items():
        assert row["auroc"] == pytest.approx(before[key]["auroc"], abs=1e-9)
        assert row["set_digest"] == before[key]["set_digest"]

    # with its evaluations, the archive carries the cached rows, pointed at the new directory
    full = unpack_run(pack_run(finished_run, tmp_path / "full.tar.gz"), tmp_path / "full")
    rows = [json.loads(p.read_text()) for p in (full / "eval" / "results").glob("*.json")]
    assert rows and all(r["run"] == str(full) for r in rows)

    # refusals name the problem
    assert main(["unpack", str(packed), str(moved)]) == 2
    (tmp_path / "junk.tar.gz").write_text("not an archive")
    assert main(["unpack", str(tmp_path / "junk.tar.gz"), str(tmp_path / "junk")]) == 2
    unfinished = unpack_run(packed, tmp_path / "unfinished")
    state = json.loads((unfinished / "state.json").read_text())
    (unfinished / "state.json").write_text(json.dumps({**state, "finished": False}))
    with pytest.raises(ValueError, match="has not finished"):
        pack_run(unfinished)

    # the benchmark's per-fit records: saved from one run, restored onto its unpacked copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import fmnist_table
    finally:
        sys.path.pop(0)
    fits = tmp_path / "fits.jsonl"
    ssd_rows = evaluate_run(moved, ["ssd"], seeds=1)
    assert fmnist_table.save_fits(fits, ssd_rows) == 3
    assert fmnist_table.save_fits(fits, ssd_rows) == 3  # merged by key, not appended
    where = fmnist_table.fitted_on(ssd_rows)["ssd"]  # device, count and seconds per fit
    assert where.startswith(f"{ssd_rows[0]['device']} (3 fits, ") and " s per fit, " in where
    records = fmnist_table.load_fits(fits)
    copy = unpack_run(packed, tmp_path / "copy" / moved.name)  # the records name runs by directory name
    assert fmnist_table.restore_fits(copy, records) == (3, 0)
    again = {(r["variant"], r["iteration"]): r["auroc"] for r in evaluate_run(copy, ["ssd"], seeds=1)}
    assert again == {k: r["auroc"] for k, r in after.items()}
    assert not (copy / "prep" / "features.safetensors").exists()  # nothing was fitted: no features were needed
    other = tmp_path / "other" / moved.name
    unpack_run(packed, other)
    tampered = [{**r, "set_digest": "0" * 12} if r["iteration"] == 2 else r for r in records]
    assert fmnist_table.restore_fits(other, tampered) == (2, 1)

    # `kka cost`: both runs side by side, repriced from a file, figures by hand from the stage records
    prices = tmp_path / "prices.yaml"
    prices.write_text("cost: {cpu_per_hour: 3.6, currency: EUR}\n")
    assert main(["cost", str(finished_run), str(copy), "--prices", str(prices), "--json"]) == 0
    costed = json.loads(capsys.readouterr().out)
    assert [c["run"] for c in costed] == [finished_run.name, copy.name] and costed[0]["currency"] == "EUR"
    for c, run in zip(costed, (finished_run, copy)):
        secs = {f.stem: json.loads(f.read_text())["wall_seconds"] for f in (run / "stages").glob("*.json")}
        # generate holds two CPUs (describer + drawer), preference two (its Ray Train workers)
        cpu_s = sum(secs.values()) + sum(v for k, v in secs.items() if k.endswith((".generate", ".preference")))
        assert c["money"] == pytest.approx(cpu_s * 3.6 / 3600) and c["cpu_seconds"] == pytest.approx(cpu_s)
        assert c["money_per_hard_anomaly"] == (pytest.approx(c["money"] / c["hard"]) if c["hard"] else None)
        assert sum(d["money"] for d in c["stages"].values()) == pytest.approx(c["money"])
    assert main(["cost", str(finished_run), str(copy)]) == 0
    table = capsys.readouterr().out
    assert f"| {finished_run.name} | 2 |" in table and f"| {copy.name} | 2 |" in table and "| preference |" in table

    # a run without the loop detector's own no-anomaly baseline gets it from the loop's baselines stage
    loop_det = load_config(moved / "config.yaml").detector.name
    recorded = json.loads((moved / "baselines.json").read_text())
    (moved / "baselines.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != loop_det}))
    fmnist_table.loop_baseline(moved)
    backfilled = json.loads((moved / "baselines.json").read_text())
    assert set(backfilled) == set(recorded) | {loop_det} and 0 <= backfilled[loop_det]["auroc"] <= 1
    if loop_det in recorded:  # the same inputs, seed and settings as the run's own baselines stage
        assert backfilled[loop_det]["auroc"] == pytest.approx(recorded[loop_det]["auroc"], abs=0.02)

    # the KKA(k) ablation: KKA(0) from the run's baselines, KKA(k) and the split from its metrics
    metrics = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ablation = fmnist_table.kka_ablation([(moved, "add")])
    (row,) = ablation["rows"]
    det = row["detector"]
    base = json.loads((moved / "baselines.json").read_text())
    assert row["auroc"] == [base[det]["auroc"] if det in base else None, *[m["auroc"] for m in metrics]]
    assert row["hard_fraction"] == [m["hard_fraction"] for m in metrics]
    # the default split is iteration 1's evaluator's in every iteration: its share is the split's,
    # and in iteration 1 it is also the current evaluator
    assert row["split_reference"] == "first" and row["hard_fraction_ref"] == row["hard_fraction"]
    assert row["hard_fraction_current"][0] == row["hard_fraction"][0]
    table = fmnist_table.ablation_markdown(ablation)
    assert table.count("\n") == 3 and f"KKA({len(metrics)})" in table and "| **mean add** |" in table
    assert ablation["mean"]["add"]["hard_fraction"] == [pytest.approx(m["hard_fraction"]) for m in metrics]
    shifts = [m["describer_shift"] for m in metrics if m.get("describer_shift")]
    assert row["shift_hard_share"] == [[s["before"]["hard_share"], s["after"]["hard_share"]] for s in shifts]
    assert ablation["goals"]["add"]["dpo_updates"] == len(shifts)
