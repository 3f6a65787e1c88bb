"""KKA as Ray jobs on a real local Ray head, submitted the way Ray users submit jobs.

Starts `ray start --head --block` (its own --temp-dir, free ports, dashboard on 127.0.0.1, token
authentication with a token file of its own), then:
  (c) `ray job submit -- python jobs/generate.py <broken override>`: the job ends FAILED and its
      logs name the field (`kka status`, `kka logs` and `kka logs --follow` read it back);
      a sleeping job submitted the same way is stopped with `kka stop`;
  (a) `kka submit generate --config FILE --follow` into a file:// storage URI: prep + generation of
      iteration 1, uploaded from the staging copy; the generated Parquet reads back; the job server
      holds none of the submitter's secrets; `kka submit preference` on it fails (not evaluated);
  (b) `kka submit run --resume <that URI> --follow`: the same run downloaded and continued to the
      end of its two iterations (state finished, two metrics rows, report).
The head is stopped through its own `ray start --block` process (SIGTERM), and any process left
that belongs to it is killed by pid: other Ray clusters on the machine are never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from kka_ray.config import apply_overrides
from kka_ray.submit import CONFIG_ENV

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    env: dict[str, str]
    temp: Path

    def kka(self, *args: str, timeout: float = JOB_TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kka_ray.cli", *args], env={**self.env, **env}, cwd=self.temp,
                              capture_output=True, text=True, timeout=timeout)

    def job_info(self, submission_id: str) -> dict:
        """The job as the job server stores it (REST API, with this head's token)."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        req = urllib.request.Request(f"{self.address}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def _ours(proc, temp: str) -> bool:
    """A process that belongs to this head: its command line or working directory is under temp."""
    try:
        return temp in " ".join(proc.cmdline()) or proc.cwd().startswith(temp)
    except Exception:
        return False


def _stop_head(proc: subprocess.Popen, temp: Path) -> None:
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    left = [p for p in tree if p.is_running()]
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    left += [p for p in psutil.process_iter() if p.pid != os.getpid() and _ours(p, str(temp))]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def head():
    temp = Path(tempfile.mkdtemp(prefix="kka-head-", dir="/tmp"))  # short: Ray's unix sockets live here
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0")
    dash = _free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port=0", "--num-cpus=4",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
           f"--metrics-export-port={_free_port()}", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"]
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + HEAD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {(temp / 'head.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (401 without a token): it is up
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"the head did not answer in {HEAD_START_TIMEOUT_S} s")
                time.sleep(1)
        yield Head(address, env, temp)
    finally:
        _stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _completed(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "state.json").read_text())["completed"]


def test_kka_jobs_on_a_real_head(head, tiny_cache, tmp_path):
    from kka_ray.generation.pipeline import read_generated
    from kka_ray.storage import staging_dir
    from kka_ray.submit import repo_root

    # (c) a broken config, submitted with Ray's own CLI: FAILED, the field named in the logs.
    # A fresh head answers HTTP before its job agent registers: retry that state only.
    deadline = time.time() + 180
    while True:
        bad = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--no-wait",
             "--submission-id", "kka-test-broken", "--working-dir", str(repo_root()),
             "--", "python", "jobs/generate.py", "describer.temprature=0.5"],
            env=head.env, cwd=head.temp, capture_output=True, text=True, timeout=300)
        if bad.returncode == 0 or "No available agent" not in bad.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert bad.returncode == 0, bad.stdout + bad.stderr

    # (a) generation only, into a storage URI
    store = tmp_path / "store"
    uri = f"file://{store}"
    config = tmp_path / "tiny.yaml"  # travels to the job as text (KKA_CONFIG_YAML)
    config.write_text(yaml.safe_dump(apply_overrides({}, tiny_overrides(tiny_cache))))
    gen = head.kka("submit", "generate", "--address", head.address, "--config", str(config), "--follow",
                   "--output", "gen", f"run.storage_path={uri}",
                   AWS_SECRET_ACCESS_KEY="fake-secret-value-789", HF_TOKEN="hf_fake_token_012")
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
    sid = gen.stdout.splitlines()[0]
    assert sid.startswith("kka-generate-")
    # what the cluster received: the allowed variables only, none of the submitter's secrets
    stored = head.job_info(sid)
    assert stored["runtime_env"]["env_vars"] == {"TOKENIZERS_PARALLELISM": "false", CONFIG_ENV: config.read_text()}
    for secret in ("AWS_SECRET_ACCESS_KEY", "fake-secret-value-789", "HF_TOKEN", "hf_fake_token_012"):
        assert secret not in json.dumps(stored)
    assert f"results: {uri}/gen" in gen.stderr
    run_dir = store / "gen"
    assert _completed(run_dir) == ["prep", "iter1.generate"]
    table = read_generated(run_dir / "generated" / "iter_1")
    n_kept = json.loads((run_dir / "stages" / "iter1.generate.json").read_text())["n_kept"]
    assert table is not None and table.num_rows == n_kept > 0
    assert f"generation complete: {n_kept} anomalies in {uri}/gen/generated/iter_1/" in gen.stdout
    assert {"id", "prompt", "text", "image", "adapter_version"} <= set(table.column_names)
    assert not staging_dir(f"{uri}/gen").exists()  # uploaded, then the staging copy removed

    status = head.kka("status", "--address", head.address, sid)
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout and f"results: {uri}/gen" in status.stdout
    # a client without token authentication is refused, in one line that says what to set
    no_auth = head.kka("status", "--address", head.address, sid, RAY_AUTH_MODE="disabled")
    assert no_auth.returncode == 2 and "export RAY_AUTH_MODE=token" in no_auth.stderr, no_auth.stderr[-2000:]

    # (c) read back: the broken job has ended FAILED by now
    st = head.kka("status", "--address", head.address, "kka-test-broken")
    assert "kka-test-broken: FAILED" in st.stdout, st.stdout + st.stderr
    logs = head.kka("logs", "--address", head.address, "kka-test-broken")
    assert "kka: error: config field 'describer.temprature': unknown field" in logs.stdout, logs.stdout[-3000:]
    # `kka logs --follow` on an ended job: its logs, then its status, and exit 1 as it did not succeed
    followed = head.kka("logs", "--follow", "--address", head.address, "kka-test-broken")
    assert followed.returncode == 1 and "kka: job kka-test-broken FAILED" in followed.stderr, followed.stderr[-2000:]
    assert "describer.temprature" in followed.stdout

    # `kka stop` on a running job: stop requested, the job ends STOPPED, a second stop finds it ended
    sleeper = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--no-wait",
         "--submission-id", "kka-test-sleeper", "--", "python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)"],
        env=head.env, cwd=head.temp, capture_output=True, text=True, timeout=300)
    assert sleeper.returncode == 0, sleeper.stdout + sleeper.stderr
    stop = head.kka("stop", "--address", head.address, "kka-test-sleeper")
    assert stop.returncode == 0 and "kka-test-sleeper: stop requested" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.time() + 120
    while "STOPPED" not in (st := head.kka("status", "--address", head.address, "kka-test-sleeper")).stdout:
        assert time.time() < deadline, st.stdout + st.stderr
        time.sleep(2)
    again = head.kka("stop", "--address", head.address, "kka-test-sleeper")
    assert again.returncode == 0 and "kka-test-sleeper: was not running" in again.stdout, again.stdout + again.stderr
    stopped = head.kka("logs", "--follow", "--address", head.address, "kka-test-sleeper")
    assert stopped.returncode == 1 and "kka: job kka-test-sleeper STOPPED" in stopped.stderr, stopped.stderr[-2000:]

    # the DPO job on that run: iteration 1 is not evaluated yet, so it fails saying so
    pref = head.kka("submit", "preference", "--address", head.address, "--follow", "--run-dir", f"{uri}/gen",
                    "--iteration", "1")
    assert pref.returncode == 1 and "FAILED" in pref.stderr
    assert "kka: error: iteration 1 of" in pref.stdout and "needs iter1.evaluate" in pref.stdout, pref.stdout[-2000:]

    # (b) the same run, downloaded from the URI and continued through both iterations
    run = head.kka("submit", "run", "--address", head.address, "--follow", "--resume", f"{uri}/gen")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] is True and "iter2.preference" in state["completed"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert (run_dir / "report.html").is_file() and (run_dir / "adapters" / "iter_1").is_dir()
    # iteration 1's generation was not redone
    assert read_generated(run_dir / "generated" / "iter_1").column("id").to_pylist() == table.column("id").to_pylist()
