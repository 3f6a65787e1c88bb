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
