"""`kka submit` and the job entry points without a cluster: argument handling, the runtime env
(no secrets leave the machine), address resolution, job kinds, storage URIs (a real pyarrow
file:// round trip), and each job script failing fast with the bad field named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kka_ray.cli import main
from kka_ray.config import ConfigError, load_config
from kka_ray.drivers import job_config_args, new_run_location
from kka_ray.storage import RunLocation, is_uri, join, staging_dir
from kka_ray.submit import (
    CONFIG_ENV, DEFAULT_ADDRESS, JOB_SCRIPTS, build_entrypoint, build_runtime_env, job_arguments, looks_secret,
    repo_root, resolve_address, results_location,
)

ROOT = repo_root()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ kinds, arguments, entrypoint
def test_every_job_kind_maps_to_a_script_in_the_uploaded_tree():
    assert set(JOB_SCRIPTS) == {"run", "generate", "preference", "evaluate"}
    for script in JOB_SCRIPTS.values():
        assert (ROOT / script).is_file(), script
    assert (ROOT / "kka_ray" / "__init__.py").is_file()


def test_entrypoint_quotes_overrides_for_the_shell():
    cfg = load_config(None, ["job.python=/opt/py/bin/python"])
    args = job_arguments("generate", ["describer.template=write {description} now", "run.seed=3"], output="exp1")
    assert build_entrypoint(cfg, "generate", args) == (
        "/opt/py/bin/python jobs/generate.py --output exp1 'describer.template=write {description} now' run.seed=3")
    assert job_arguments("preference", run_dir="s3://b/run", iteration=2) == ["--run-dir", "s3://b/run", "--iteration", "2"]
    assert job_arguments("run", resume="/data/run") == ["--resume", "/data/run"]
    assert job_arguments("evaluate", output="tables", extra=["runs/a", "--seeds", "1"]) == [
        "--output", "tables", "runs/a", "--seeds", "1"]


@pytest.mark.parametrize("kind, kwargs, needle", [
    ("preference", {"run_dir": "r"}, "--iteration"),
    ("generate", {"run_dir": "r", "iteration": 1}, "preference kind only"),
    ("run", {"resume": "r", "overrides": ["run.seed=1"]}, "drop the key=value overrides"),
    ("generate", {"resume": "r"}, "run kind only"),
    ("train", {}, "unknown job kind"),
])
def test_job_arguments_refuse_what_the_kind_cannot_take(kind, kwargs, needle):
    overrides = kwargs.pop("overrides", [])
    with pytest.raises(ConfigError, match=needle):
        job_arguments(kind, overrides, **kwargs)


# ------------------------------------------------------------------ runtime env: nothing secret
def test_runtime_env_holds_only_allowed_variables(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-value-123")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_456")
    monkeypatch.setenv("KKA_TEST_FORWARDED", "yes")
    cfg = load_config(None, ["job.forward_env=[KKA_TEST_FORWARDED, KKA_TEST_UNSET]", "job.env_vars={OMP_NUM_THREADS: '2'}"])
    env = build_runtime_env(cfg, ROOT, config_text="run: {iterations: 1}\n")
    dumped = json.dumps(env)
    for secret in ("AWS_SECRET_ACCESS_KEY", "fake-secret-value-123", "HF_TOKEN", "hf_fake_token_456"):
        assert secret not in dumped
    assert env["env_vars"] == {"OMP_NUM_THREADS": "2", "KKA_TEST_FORWARDED": "yes",
                               CONFIG_ENV: "run: {iterations: 1}\n"}
    assert env["working_dir"] == str(ROOT)
    for pattern in ("runs/", ".venv/", ".git/"):
        assert pattern in env["excludes"]
    # the default config sends TOKENIZERS_PARALLELISM and nothing else of this environment
    assert build_runtime_env(load_config(), ROOT)["env_vars"] == {"TOKENIZERS_PARALLELISM": "false"}


def test_credential_like_names_are_refused_everywhere(tmp_path):
    assert not looks_secret("TOKENIZERS_PARALLELISM") and not looks_secret("NCCL_CUMEM_ENABLE")
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "WANDB_API_KEY", "PGPASSWORD",
                 "RAY_AUTH_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert looks_secret(name), name
    with pytest.raises(ConfigError, match="job.forward_env"):
        build_runtime_env(load_config(None, ["job.forward_env=[AWS_SECRET_ACCESS_KEY]"]), ROOT)
    with pytest.raises(ConfigError, match="job.env_vars"):
        build_runtime_env(load_config(None, ["job.env_vars={HF_TOKEN: x}"]), ROOT)
    f = tmp_path / "env.yaml"
    f.write_text(yaml.safe_dump({"env_vars": {"WANDB_API_KEY": "x"}}))
    with pytest.raises(ConfigError, match="--runtime-env"):
        build_runtime_env(load_config(), ROOT, runtime_env_file=f)


def test_runtime_env_file_is_merged_and_the_repository_stays_the_working_dir(tmp_path):
    f = tmp_path / "env.yaml"
    f.write_text(yaml.safe_dump({"working_dir": ".", "excludes": ["data/"], "env_vars": {"NCCL_CUMEM_ENABLE": "0"},
                                 "pip": ["einops"]}))
    env = build_runtime_env(load_config(None, ["job.excludes=[scratch/]"]), ROOT, runtime_env_file=f)
    assert env["working_dir"] == str(ROOT) and env["pip"] == ["einops"]
    assert env["env_vars"] == {"NCCL_CUMEM_ENABLE": "0", "TOKENIZERS_PARALLELISM": "false"}
    assert "data/" in env["excludes"] and "scratch/" in env["excludes"] and "runs/" in env["excludes"]
    # the project's own runtime env file is accepted as it is
    shipped = ROOT / "cluster" / "runtime_env.yaml"
    if shipped.is_file():
        assert build_runtime_env(load_config(), ROOT, runtime_env_file=shipped)["working_dir"] == str(ROOT)


# ------------------------------------------------------------------ address
def test_address_resolution_order():
    cfg = load_config(None, ["job.address=http://head:8265"])
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://ray:8265"}
    assert resolve_address("http://cli:8265", cfg, env) == "http://cli:8265"
    assert resolve_address(None, cfg, env) == "http://head:8265"
    assert resolve_address(None, load_config(), env) == "http://api:8265"
    assert resolve_address(None, load_config(), {"RAY_ADDRESS": "http://ray:8265"}) == "http://ray:8265"
    assert resolve_address(None, load_config(), {}) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"


def test_submit_to_an_address_nobody_listens_on_fails_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # --address must win over it
    port = _free_port()
    assert main(["submit", "generate", "--address", f"http://127.0.0.1:{port}", "run.seed=1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a Ray job server at http://127.0.0.1:{port}" in err and "ray start --head" in err
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"  # restored after the client looked


def test_submit_validates_the_config_before_contacting_anyone(capsys):
    assert main(["submit", "run", "--address", "http://127.0.0.1:1", "describer.temprature=0.5"]) == 2
    assert "config field 'describer.temprature': unknown field" in capsys.readouterr().err
    assert main(["submit", "preference", "--address", "http://127.0.0.1:1", "--run-dir", "x"]) == 2
    assert "--iteration" in capsys.readouterr().err


def test_results_location_tells_where_the_run_lands(capsys):
    cfg = load_config(None, ["run.storage_path=s3://bucket/kka"])
    assert results_location(cfg, "run", "kka-run-1", []) == "s3://bucket/kka/kka-run-1"
    assert results_location(cfg, "generate", "id", ["--output", "exp"]) == "s3://bucket/kka/exp"
    assert results_location(cfg, "preference", "id", ["--run-dir", "s3://b/r", "--iteration", "1"]) == "s3://b/r"
    assert results_location(load_config(), "run", "id", []).startswith(str(Path("~/kka_runs/id").expanduser()))
    assert results_location(load_config(), "run", "id", ["--output", "/data/exp"]) == "/data/exp"
    # the driver would refuse an absolute name under a storage path: so does submission, before any job exists
    with pytest.raises(ConfigError, match="must be a relative name when run.storage_path is set"):
        results_location(cfg, "run", "id", ["--output", "/data/exp"])
    assert main(["submit", "run", "--address", "http://127.0.0.1:1", "--output", "/data/exp",
                 "run.storage_path=s3://bucket/kka"]) == 2
    assert "must be a relative name" in capsys.readouterr().err  # not "unreachable job server"


# ------------------------------------------------------------------ storage
def test_storage_uri_round_trip_with_pyarrow(tmp_path):
    assert is_uri("file:///x") and is_uri("s3://b/p") and not is_uri("/x/y") and not is_uri("runs/a")
    assert join("s3://b/p/", "run1") == "s3://b/p/run1" and join("/data", "r") == "/data/r"
    remote_dir = tmp_path / "remote" / "run1"
    uri = f"file://{remote_dir}"
    local = tmp_path / "work" / "run1"
    (local / "stages").mkdir(parents=True)
    (local / "state.json").write_text('{"completed": ["prep"]}')
    (local / "stages" / "prep.json").write_text("{}")
    (local / "config.yaml").write_text("run: {}\n")
    (local / "generated.tmp").mkdir()  # a stage in flight is not uploaded
    (local / "generated.tmp" / "part.parquet").write_bytes(b"x")
    where = RunLocation(local, remote=uri)
    assert not where.exists()
    assert where.push() == 3
    assert where.exists() and (remote_dir / "stages" / "prep.json").is_file()
    assert not (remote_dir / "generated.tmp").exists()
    assert where.push() == 0  # nothing changed
    (local / "state.json").write_text('{"completed": ["prep", "baselines"]}')
    (local / "stages" / "prep.json").unlink()
    assert where.push() == 1
    assert not (remote_dir / "stages" / "prep.json").exists()
    copy = RunLocation(tmp_path / "elsewhere" / "run1", remote=uri)
    copy.pull()
    assert json.loads((copy.local / "state.json").read_text())["completed"] == ["prep", "baselines"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunLocation(tmp_path / "x", remote=f"file://{tmp_path}/missing").pull()
    # a staging copy that lost its run (deleted under it) never wipes the stored one
    (local / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="lost its config.yaml"):
        where.push()
    assert (remote_dir / "config.yaml").is_file()


class _FailingRun:
    """Stands in for a KKARun that completes the stages ``done`` and then raises ``error``: what
    RunLocation.execute does around a run (upload after each stage, and after a failure) does
    not depend on what the stages are."""

    def __init__(self, directory: Path, done: tuple[str, ...], error: str):
        self.dir, self.done, self.error = directory, done, error
        self.on_stage_done = None

    def execute(self) -> None:
        (self.dir / "config.yaml").write_text("run: {}\n")
        for i, stage in enumerate(self.done):
            (self.dir / "state.json").write_text(json.dumps({"completed": list(self.done[: i + 1])}))
            self.on_stage_done(stage)
        (self.dir / "stages").mkdir()
        (self.dir / "stages" / "baselines.partial.json").write_text("{}")  # written before the failure
        raise RuntimeError(self.error)


def test_a_failed_run_is_uploaded_and_a_failed_upload_keeps_the_staging_copy(tmp_path, caplog):
    remote = tmp_path / "remote" / "run1"
    where = RunLocation(tmp_path / "stage" / "run1", remote=f"file://{remote}")
    where.local.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="stage baselines failed"):
        where.execute(_FailingRun(where.local, ("prep",), "stage baselines failed"))
    # everything up to the failure is kept remotely, and the staging copy is gone
    assert json.loads((remote / "state.json").read_text())["completed"] == ["prep"]
    assert (remote / "stages" / "baselines.partial.json").is_file()
    assert not where.local.exists()

    # the remote cannot take the upload after the failure: the run's own error is raised, the
    # upload error is logged, and the staging copy (the only copy) stays
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the run directory should go")
    where = RunLocation(tmp_path / "stage2" / "run2", remote=f"file://{blocked}/run2")
    where.local.mkdir(parents=True)
    run = _FailingRun(where.local, (), "first stage failed")
    with pytest.raises(RuntimeError, match="first stage failed"):
        where.execute(run)
    assert "could not upload" in caplog.text and (where.local / "config.yaml").is_file()


def test_new_run_location_names_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = load_config(None, [f"run.storage_path={tmp_path}/store"])
    assert new_run_location(cfg, "exp1").local == tmp_path / "store" / "exp1"
    uri_cfg = load_config(None, [f"run.storage_path=file://{tmp_path}/store"])
    where = new_run_location(uri_cfg, "exp2")
    assert where.remote == f"file://{tmp_path}/store/exp2" and where.local == staging_dir(where.remote)
    assert where.local.name == "exp2"  # the run keeps its name in the staging copy
    with pytest.raises(ConfigError, match="run.output_dir"):
        new_run_location(cfg, "/abs/path")
    with pytest.raises(ConfigError, match="run.storage_path"):
        new_run_location(load_config(None, ["run.storage_path=nosuchscheme://x/y"]))
    # outside a job, without storage: unchanged (runs/<timestamp>, or --output)
    assert new_run_location(load_config(), str(tmp_path / "plain")).local == tmp_path / "plain"
    # inside a Ray job: the submission id names the run; without storage it goes to ~/kka_runs
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "kka-run-abc"}}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert new_run_location(cfg).local == tmp_path / "store" / "kka-run-abc"
    assert new_run_location(load_config()).local == tmp_path / "home" / "kka_runs" / "kka-run-abc"


def test_job_config_args_read_the_submitted_config_text(tmp_path):
    argv = job_config_args(["run.seed=2"], {CONFIG_ENV: "run: {iterations: 1}\n"})
    assert argv[0] == "--config" and argv[2:] == ["run.seed=2"]
    assert load_config(argv[1], argv[2:]).run.iterations == 1
    assert job_config_args(["--config", "x.yaml"], {CONFIG_ENV: "run: {}"}) == ["--config", "x.yaml"]
    assert job_config_args(["a=1"], {}) == ["a=1"]


def test_execute_stages_refuses_unknown_stages(tmp_path):
    from kka_ray.loop import KKARun

    run = KKARun.create(load_config(), str(tmp_path / "r"))
    with pytest.raises(ValueError, match="unknown stage 'iter1.train'"):
        run.execute_stages(["prep", "iter1.train"])


# ------------------------------------------------------------------ the job scripts fail fast
def _job(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", ["jobs/kka_run.py", "jobs/generate.py"])
def test_job_scripts_exit_nonzero_naming_the_bad_field(script):
    r = _job(script, "describer.temprature=0.5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "kka: error: config field 'describer.temprature': unknown field " \
                                                "(check its spelling against `kka config`)"
    r = _job(script, env={CONFIG_ENV: "run:\n  iterations: 0\n"})  # the text kka submit sends
    assert r.returncode == 2 and "config field 'run.iterations'" in r.stderr


def test_preference_job_needs_an_evaluated_iteration(tmp_path):
    from kka_ray.loop import KKARun

    r = _job("jobs/preference.py", "--run-dir", str(tmp_path / "nope"), "--iteration", "1")
    assert r.returncode == 2 and "not a kka run directory" in r.stderr
    KKARun.create(load_config(None, ["run.iterations=2"]), str(tmp_path / "run"))
    r = _job("jobs/preference.py", "--run-dir", str(tmp_path / "run"), "--iteration", "1")
    assert r.returncode == 2 and "iteration 1" in r.stderr and "needs iter1.evaluate" in r.stderr
    r = _job("jobs/preference.py", "--run-dir", str(tmp_path / "run"), "--iteration", "3")
    assert r.returncode == 2 and "outside this run's iterations 1..2" in r.stderr


def test_evaluate_job_forwards_to_kka_eval(tmp_path):
    r = _job("jobs/evaluate.py", str(tmp_path / "no-run"))
    assert r.returncode == 2 and "kka: error:" in r.stderr and "no-run" in r.stderr


def test_preference_job_on_a_storage_uri_downloads_and_checks_the_state(tmp_path, capsys):
    from kka_ray.drivers import create_run, preference_main, resume_run
    from kka_ray.rundir import RunState

    cfg = load_config(None, ["run.iterations=1", f"run.storage_path=file://{tmp_path}/store"])
    run, where = create_run(cfg, "r1")  # staged locally, config.yaml uploaded at once
    uri = f"file://{tmp_path}/store/r1"
    assert where.remote == uri and (tmp_path / "store" / "r1" / "config.yaml").is_file()
    assert preference_main(["--run-dir", uri, "--iteration", "1"]) == 2
    assert "not evaluated yet (completed stages: none)" in capsys.readouterr().err
    run, where = resume_run(uri)  # that job removed the shared staging copy: download again
    state = RunState.load(run.dir)
    for stage in ("prep", "baselines", "iter1.generate", "iter1.evaluate", "iter1.update", "iter1.detect",
                  "iter1.preference"):
        state.mark(stage)
    where.push()
    where.cleanup()
    with pytest.raises(FileExistsError, match="already holds a run"):
        create_run(cfg, "r1")
    assert preference_main(["--run-dir", uri, "--iteration", "1"]) == 0
    assert "already has its DPO update" in capsys.readouterr().out
    assert not staging_dir(uri).exists() and not staging_dir(uri).parent.exists()
