"""A killed run continues with `kka run --resume` and loses at most the stage in flight.

The run is started as a real `kka run` process, killed with SIGKILL (its whole process group,
Ray included) once iteration 1's generation is recorded, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from kka_ray.cli import main

pytestmark = pytest.mark.slow


def _completed(run_dir):
    path = run_dir / "state.json"
    try:
        return json.loads(path.read_text())["completed"] if path.is_file() else []
    except (json.JSONDecodeError, KeyError):
        return []


def test_resume_after_kill(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "kka_ray.cli", "run", "--output", str(run_dir), *tiny_overrides(tiny_cache)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    try:
        while "iter1.generate" not in _completed(run_dir):
            if proc.poll() is not None:
                pytest.fail(f"kka run exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("iteration 1 generation did not complete in time")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _completed(run_dir)
    assert "iter1.generate" in done_before and "iter2.generate" not in done_before
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*.json")}
    gen_files = sorted(p.name for p in (run_dir / "generated" / "iter_1").glob("*.parquet"))

    assert main(["run", "--resume", str(run_dir)]) == 0

    # completed stages were not run again; their outputs are untouched
    for name, stamp in stamps.items():
        assert (run_dir / "stages" / name).stat().st_mtime_ns == stamp, name
    assert sorted(p.name for p in (run_dir / "generated" / "iter_1").glob("*.parquet")) == gen_files
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True
    assert (run_dir / "report.html").is_file()


def test_resume_refuses_overrides_and_missing_dir(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "not a kka run directory" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path), "run.iterations=5"]) == 2
    assert "drop --config and overrides" in capsys.readouterr().err


# The stage kinds of a run: (kind, the stage after which the driver is killed, a stage that must not
# have completed by then). The update stage takes about a millisecond: the kill lands in it or in
# the detect stage right after it, so for it the check is that detect had not ended.
KILL_POINTS = [("prep", None, "prep"), ("baselines", "prep", "baselines"), ("generate", "baselines", "iter1.generate"),
               ("guard", "iter1.generate", "iter1.guard"), ("evaluate", "iter1.guard", "iter1.evaluate"),
               ("update", "iter1.audit", "iter1.detect"), ("detect", "iter1.update", "iter1.detect"),
               ("preference", "iter1.detect", "iter1.preference"), ("generate", "iter1.preference", "iter2.generate")]


def _anomaly_ids(run_dir, k):
    """Iteration k's anomaly ids without the run-name prefix (``<run>/it<k>/p<prompt>/s<sample>``)."""
    import pyarrow.parquet as pq

    ids = pq.read_table(run_dir / "anomalies" / f"iter_{k}.parquet", columns=["id"]).column("id").to_pylist()
    assert all(i.startswith(f"{run_dir.name}/") for i in ids)
    return [i.split("/", 1)[1] for i in ids]


def test_driver_killed_in_every_stage_kind_resumes_to_the_uninterrupted_result(tiny_cache, tmp_path):
    """One run whose driver is killed (SIGKILL to its process group, Ray included) once inside each
    stage kind in turn: prep, baselines, generate, guard, evaluate, update, detect, preference (and
    iteration 2's generate), each time resumed with `kka run --resume` until the next kill. It
    finishes; the stage records written before a kill and the stores of iterations completed
    before one are byte-identical afterwards; ids are unique; and the anomalies of every iteration
    are those of an uninterrupted run with the same seed."""
    overrides = tiny_overrides(tiny_cache)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert main(["run", "--output", str(ref_dir), *overrides]) == 0

    frozen: dict = {}
    for i, (kind, before, not_done) in enumerate(KILL_POINTS):
        args = ["run", "--output", str(run_dir), *overrides] if i == 0 else ["run", "--resume", str(run_dir)]
        proc = subprocess.Popen([sys.executable, "-m", "kka_ray.cli", *args], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 600
        try:
            while before is not None and before not in _completed(run_dir):
                if proc.poll() is not None:
                    pytest.fail(f"kka run exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
                if time.time() > deadline:
                    pytest.fail(f"{before} did not complete in time")
                time.sleep(0.05)
            if before is None:  # prep: as soon as the run directory exists (prep is the first stage)
                while not (run_dir / "config.yaml").is_file() and time.time() < deadline:
                    time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        done = _completed(run_dir)
        assert not_done not in done, (kind, done)  # killed before it ended
        # stage records are written once; an iteration's store is updated by its own stages until the
        # iteration ends, and from then on must stay as it is
        finished = [p for p in (run_dir / "anomalies").glob("iter_*.parquet") if f"iter{p.stem[5:]}.preference" in done]
        for p in list((run_dir / "stages").glob("*.json")) + finished:
            frozen.setdefault(p.relative_to(run_dir), p.read_bytes())

    assert main(["run", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True
    assert Path("anomalies/iter_1.parquet") in frozen  # iteration 1 ended before the last kill
    for rel, data in frozen.items():  # nothing written before a kill was rewritten
        assert (run_dir / rel).read_bytes() == data, rel
    for k in (1, 2):
        ids = _anomaly_ids(run_dir, k)
        assert len(set(ids)) == len(ids)
        assert sorted(ids) == sorted(_anomaly_ids(ref_dir, k)), k
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["n_kept"], r["n_hard"]) for r in rows] == [(r["iteration"], r["n_kept"], r["n_hard"]) for r in ref_rows]
