"""User mistakes caught before Ray starts, and one driver per run directory (kka_ray/preflight.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kka_ray.cli import main
from kka_ray.config import ConfigError, KKAConfig
from kka_ray.preflight import LOCK_NAME, RunLock, check_dataset


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kka: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("overrides, expect", [
    (["data.dataset=cifar10"], "data.path must point at the CIFAR-10"),
    (["data.normal_classes=[42]"], "data.normal_classes: normal class index 42 is out of range"),
    (["data.normal_classes=[jacket]"], "data.normal_classes: unknown class 'jacket'"),
    (["data.normal_classes=[0,1,2,3,4,5,6,7,8,9]"], "every class is normal"),
    (["data.dataset=folder", "data.path=/no/such/folder"], "/no/such/folder does not exist"),
])
def test_dataset_mistakes_are_one_line_before_ray_and_leave_no_run_directory(capsys, tmp_path, overrides, expect):
    import ray

    out = tmp_path / "run"
    for check in (["--check"], []):  # `kka run --check` and a real `kka run` stop at the same line
        rc, _, err = _run(capsys, *check, "--output", str(out), *overrides)
        assert rc == 2
        assert expect in _one_error_line(err)
        assert not ray.is_initialized()
        assert not out.exists()  # the corrected command is not blocked by a half-made run


def test_output_directory_mistakes(capsys, tmp_path):
    run = tmp_path / "done"
    run.mkdir()
    (run / "state.json").write_text("{}")
    rc, _, err = _run(capsys, "--check", "--output", str(run))
    assert rc == 2 and "already holds a run" in _one_error_line(err) and "--resume" in err
    afile = tmp_path / "file"
    afile.write_text("x")
    rc, _, err = _run(capsys, "--check", "--output", str(afile))
    assert rc == 2 and "is a file" in _one_error_line(err)
    rc, _, err = _run(capsys, "--check", "--output", str(afile / "below"))
    assert rc == 2 and "not a directory" in _one_error_line(err)
    rc, out, _ = _run(capsys, "--check", "--output", str(tmp_path / "new" / "run"))
    assert rc == 0 and out.startswith("ok: a new run at") and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_parent_is_refused(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = _run(capsys, "--check", "--output", str(ro / "run"))
        assert rc == 2 and "not writable" in _one_error_line(err)
    finally:
        ro.chmod(0o700)


def test_resume_checks_the_dataset_of_the_run(capsys, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    cfg = KKAConfig().to_dict()
    cfg["data"].update(dataset="folder", path=str(tmp_path / "moved"))
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "state.json").write_text(json.dumps({"completed": ["prep"], "finished": False}))
    rc, _, err = _run(capsys, "--check", "--resume", str(run))
    assert rc == 2 and "moved does not exist" in _one_error_line(err)
    rc, _, err = _run(capsys, "--resume", str(run))
    assert rc == 2 and "moved does not exist" in _one_error_line(err)
    rc, _, err = _run(capsys, "--check", "--resume", str(tmp_path / "nothing"))
    assert rc == 2 and "not a kka run directory" in _one_error_line(err)


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            if k == "templates":
                continue
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_fuzzed_configs_give_a_line_or_a_valid_start_never_a_traceback(capsys, tmp_path):
    """Mutations of the default config: unknown keys, wrong types, out-of-range values, missing,
    empty and wrong-kind dataset paths. Each outcome is `kka: error: ...` (exit 2) or a valid
    start (`--check` says ok), and nothing is created."""
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("not a dataset")
    keys = _leaves(KKAConfig().to_dict())
    values = ["x!y", "-1", "1000000000000", "[]", "{}", "null", "0", "''", "[1, [2]]", "1.5"]
    rng = random.Random(0)
    cases = [[f"{k}={rng.choice(values)}"] for k in rng.sample(keys, min(70, len(keys)))]
    cases += [["run.bogus=1"], ["nosuchsection.a=1"], ["data"], ["=1"], ["data.normal_classes=[0"],
              ["describer.templates.x.text=no field"]]
    for ds in ("folder", "cifar10", "cifar100", "fashion_mnist"):
        cases += [[f"data.dataset={ds}", f"data.path={p}"] for p in (empty, afile, tmp_path / "missing")]
    outcomes = {0: 0, 2: 0}
    for overrides in cases:
        out_dir = tmp_path / "out"
        rc, out, err = _run(capsys, "--check", "--output", str(out_dir), *overrides)
        assert rc in (0, 2), (overrides, rc, err)
        if rc == 2:
            _one_error_line(err)
        else:
            assert out.startswith("ok: "), (overrides, out)
        assert not out_dir.exists(), overrides
        outcomes[rc] += 1
    assert outcomes[2] >= len(cases) // 3 and outcomes[0] >= 5  # the fuzz reaches both outcomes


def test_a_second_driver_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(FileExistsError, match=f"being run by process {os.getpid()}"):
            RunLock(run).acquire()
    RunLock(run).acquire().release()  # released: free again
    # a driver killed with SIGKILL: the kernel drops its lock, its record stays behind
    code = (f"import os, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            f"from kka_ray.preflight import RunLock; RunLock({str(run)!r}).acquire(); print('held', flush=True); "
            "import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=f"process {proc.pid}"):
            RunLock(run).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # stale record
    lock = RunLock(run).acquire()  # not blocked by it
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_check_dataset_accepts_the_default():
    check_dataset(KKAConfig())  # Fashion-MNIST class 0, from the installed Debian package
    with pytest.raises(ConfigError, match="data.normal_classes"):
        check_dataset(KKAConfig.model_validate({"data": {"normal_classes": [99]}}))
