"""Ray jobs for KKA: ``kka submit|status|stop|logs`` and the drivers the job scripts run.

Submitting side (a wrapper of ``ray.job_submission.JobSubmissionClient``):

    kka submit KIND [--config FILE] [--address URL] [--follow] [--runtime-env FILE]
                    [--submission-id ID] [--output NAME] [--resume DIR] [--run-dir DIR --iteration K]
                    [key.sub=value ...] [-- job args]

KIND picks the entry point in ``jobs/`` (:data:`JOB_SCRIPTS`); the entrypoint is
``<job.python> jobs/<script> ARGS``. The runtime env uploads the repository (the parent of the
``kka_ray`` package, which holds ``jobs/``) as ``working_dir`` without run directories,
virtual environments and git data. The config FILE travels as text in the job's environment
variable ``KKA_CONFIG_YAML`` (the job writes it to a private file and reads it like
``--config``); overrides travel as entrypoint arguments. The config is validated here first, so
a wrong field fails before anything is uploaded. No other environment variable of the submitter
is sent: only ``job.env_vars`` and the names in ``job.forward_env``, and names that look like
credentials are refused (:func:`check_env_names`) because runtime envs are readable by anyone
who can read the dashboard.

Job side: the scripts in ``jobs/`` run the drivers of kka_ray/drivers.py. Every job joins the
cluster it runs on (Ray sets ``RAY_ADDRESS`` for a job's driver, and kka_ray.cluster.init_ray joins
it) and writes its run directory to ``run.storage_path`` (kka_ray/storage.py). A failure exits
non-zero with one ``kka: error:`` line on stderr, so the job ends FAILED with the reason in its
logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO


import kka_ray
from kka_ray.config import ConfigError, KKAConfig, load_config, load_yaml_mapping
from kka_ray.drivers import CONFIG_ENV

logger = logging.getLogger(__name__)

JOB_SCRIPTS = {
    "run": "jobs/kka_run.py",  # the whole KKA loop (kka run)
    "generate": "jobs/generate.py",  # prep + generation of iteration 1 only
    "preference": "jobs/preference.py",  # the DPO update of one evaluated iteration
    "evaluate": "jobs/evaluate.py",  # kka eval on finished runs
}
# Ray's default job server (dashboard) address on the head node.
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Environment variables larger than this are refused by exec() on Linux (MAX_ARG_STRLEN).
MAX_CONFIG_BYTES = 100_000
# Never uploaded (gitignore syntax; Ray also honours the repository's .gitignore).
DEFAULT_EXCLUDES = [
    ".git/", ".venv/", ".venv-*/", "venv/", "runs/", "benchmarks/results/", "__pycache__/", "*.egg-info/",
    ".pytest_cache/", "build/", "dist/",
]
# Parts of environment variable names that mark credentials: such variables are never sent.
_SECRET_PARTS = {"KEY", "KEYS", "TOKEN", "TOKENS", "AUTH", "SESSION", "COOKIE", "CERT", "PRIVATE", "PASS", "PWD"}
_SECRET_SUBSTRINGS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "APIKEY", "ACCESS_KEY")
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobServerError(RuntimeError):
    """The Ray job server could not be reached, refused us, or does not know the job."""


# ---------------------------------------------------------------------------------------
# building a submission


def repo_root() -> Path:
    """The directory uploaded as the job's working_dir: the parent of the kka_ray package."""
    root = Path(kka_ray.__file__).resolve().parent.parent
    missing = [s for s in JOB_SCRIPTS.values() if not (root / s).is_file()]
    if missing:
        raise ConfigError(
            f"kka submit uploads the source tree holding kka_ray/ and jobs/, but {root} lacks {missing}: "
            "run it from a clone of the repository installed with `pip install -e .`"
        )
    return root


def resolve_address(cli_address: str | None, cfg: KKAConfig, environ: Mapping[str, str] = os.environ) -> str:
    """--address, then job.address, then $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, then Ray's default."""
    for candidate in (cli_address, cfg.job.address, *(environ.get(k) for k in _ADDRESS_ENV)):
        if candidate:
            return candidate
    return DEFAULT_ADDRESS


def looks_secret(name: str) -> bool:
    """True for environment variable names that usually hold credentials (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...)."""
    upper = name.upper()
    return bool(set(upper.split("_")) & _SECRET_PARTS) or any(s in upper for s in _SECRET_SUBSTRINGS)


def check_env_names(names: list[str], field: str) -> None:
    """Refuse credential-like names: a runtime env is stored in the cluster and shown by the dashboard."""
    bad = [n for n in names if looks_secret(n)]
    if bad:
        raise ConfigError(
            f"{field}: {bad} look like credentials; kka submit never sends those (a job's runtime env is stored "
            "in the cluster and readable by anyone with dashboard access): give the cluster nodes their own "
            "credentials (instance role, Kubernetes secret, ~/.aws on the nodes) instead"
        )


def load_runtime_env_file(path: str | os.PathLike) -> dict[str, Any]:
    return load_yaml_mapping(path, "--runtime-env", "a mapping: working_dir, excludes, env_vars, ...")


def build_runtime_env(
    cfg: KKAConfig,
    root: str | os.PathLike,
    config_text: str | None = None,
    runtime_env_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """The job's runtime env: the repository as working_dir, the excludes, and only the allowed
    environment variables (``--runtime-env`` file, ``job.env_vars``, ``job.forward_env``)."""
    base = load_runtime_env_file(runtime_env_file) if runtime_env_file else {}
    if base.get("working_dir") not in (None, ".", str(root)):
        logger.warning("--runtime-env working_dir %r is replaced by the repository %s (the jobs live there)",
                       base["working_dir"], root)
    file_vars = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
    check_env_names(list(file_vars), f"--runtime-env {runtime_env_file} env_vars")
    check_env_names(list(cfg.job.env_vars), "config field 'job.env_vars'")
    check_env_names(cfg.job.forward_env, "config field 'job.forward_env'")
    env_vars = {**file_vars, **cfg.job.env_vars}
    for name in cfg.job.forward_env:
        if name in environ:
            env_vars[name] = environ[name]
        else:
            logger.warning("job.forward_env: %s is not set here; not forwarded", name)
    if config_text is not None:
        if len(config_text.encode()) > MAX_CONFIG_BYTES:
            raise ConfigError(f"the config file is over {MAX_CONFIG_BYTES} bytes: too large to send in {CONFIG_ENV}")
        env_vars[CONFIG_ENV] = config_text
    excludes = list(dict.fromkeys([*DEFAULT_EXCLUDES, *(base.get("excludes") or []), *cfg.job.excludes]))
    return {**base, "working_dir": str(root), "excludes": excludes, "env_vars": env_vars}


def job_arguments(
    kind: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    output: str | None = None,
    resume: str | None = None,
    run_dir: str | None = None,
    iteration: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The job script's arguments for KIND (config overrides and job args), checked per kind."""
    if kind not in JOB_SCRIPTS:
        raise ConfigError(f"unknown job kind {kind!r}: choose from {sorted(JOB_SCRIPTS)}")
    continues = kind == "preference" or (kind == "run" and resume)
    if continues and overrides:
        raise ConfigError(f"kka submit {kind} {'--resume' if resume else ''} continues a run with its own "
                          "config.yaml: drop the key=value overrides")
    if (run_dir is not None or iteration is not None) != (kind == "preference") or (
            kind == "preference" and (run_dir is None or iteration is None)):
        raise ConfigError("--run-dir DIR and --iteration K go together, with the preference kind only")
    if resume and kind != "run":
        raise ConfigError("--resume goes with the run kind only")
    if resume and output:
        raise ConfigError("--resume continues the run where it is: drop --output")
    if output and kind == "preference":
        raise ConfigError("the preference kind writes into --run-dir: drop --output")
    args: list[str] = []
    if kind == "preference":
        args += ["--run-dir", str(run_dir), "--iteration", str(iteration)]
    if resume:
        args += ["--resume", str(resume)]
    if output:
        args += ["--output", str(output)]
    return [*args, *overrides, *extra]


def build_entrypoint(cfg: KKAConfig, kind: str, args: list[str]) -> str:
    """``<job.python> jobs/<script> ARGS``, shell-quoted (Ray runs the entrypoint through a shell)."""
    return shlex.join([cfg.job.python, JOB_SCRIPTS[kind], *args])


def new_submission_id(kind: str) -> str:
    return f"kka-{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def results_location(cfg: KKAConfig, kind: str, submission_id: str, args: list[str]) -> str:
    """Where the job's run directory will be, for the user (see kka_ray/storage.py)."""
    from kka_ray.storage import run_target

    def flag(name: str) -> str | None:
        return args[args.index(name) + 1] if name in args else None

    if kind == "preference":
        return str(flag("--run-dir"))
    if kind == "evaluate":
        return flag("--output") or "eval_tables/ beside the first run directory"
    if flag("--resume"):
        return str(flag("--resume"))
    output = flag("--output")
    target = run_target(cfg, output, submission_id)
    if target is None:  # an absolute directory name
        return str(output or cfg.run.output_dir)
    return target if cfg.run.storage_path else target + " on the node running the job driver"


# ---------------------------------------------------------------------------------------
# talking to the job server


@contextmanager
def _only_this_address() -> Iterator[None]:
    """JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its address argument;
    hide them while it resolves, so --address and job.address win as documented."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str) -> Any:
    """A connected ``JobSubmissionClient``; errors say how to fix the address or authentication."""
    from ray.exceptions import AuthenticationError, RayError
    from ray.job_submission import JobSubmissionClient

    try:
        with _only_this_address():
            return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise JobServerError(_auth_message(address, err)) from None
    except (ValueError, RayError) as err:  # an address Ray cannot parse, or a cluster it cannot reach
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise JobServerError(f"{address!r} is not a reachable Ray job server address ({first}): use the "
                             "dashboard's http://HOST:8265 (--address, job.address or RAY_ADDRESS)") from None
    except ConnectionError as err:
        raise JobServerError(
            f"cannot reach a Ray job server at {address} ({str(err).splitlines()[0]}): start a head with "
            "`ray start --head --dashboard-host 127.0.0.1`, or pass --address / job.address / RAY_ADDRESS"
        ) from None


def _auth_message(address: str, err: Exception) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"the Ray job server{' at ' + address if address else ''} refused us ({first}): it requires token "
            "authentication; export "
            "RAY_AUTH_MODE=token with the cluster's token in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token, as for `ray job submit`")


# A head that has just started answers HTTP before its job agent registers ("No available agent
# to submit job"): that state is retried for this long before it is reported.
AGENT_WAIT_S = 120.0


def _call(fn, *args: Any, **kwargs: Any) -> Any:
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return fn(*args, **kwargs)
        except AuthenticationError as err:
            raise JobServerError(_auth_message("", err)) from None
        except RuntimeError as err:  # unknown job id, duplicate submission id, server error
            if "No available agent" in str(err) and time.monotonic() < deadline:
                logger.info("the job server has no job agent yet (a head that just started); retrying")
                time.sleep(2.0)
                continue
            raise JobServerError(str(err).splitlines()[0]) from None


def submit(
    kind: str,
    config: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    runtime_env_file: str | None = None,
    submission_id: str | None = None,
    output: str | None = None,
    resume: str | None = None,
    run_dir: str | None = None,
    iteration: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> dict[str, str]:
    """Submit a KKA job; returns ``submission_id``, ``address``, ``entrypoint`` and ``results``."""
    cfg = load_config(config, list(overrides))  # a wrong field fails here, before any upload
    args = job_arguments(kind, overrides, output=output, resume=resume, run_dir=run_dir, iteration=iteration,
                         extra=extra)
    sends_config = kind in ("run", "generate") and not resume and config is not None
    root = repo_root()
    runtime_env = build_runtime_env(cfg, root, Path(config).read_text() if sends_config else None, runtime_env_file)
    entrypoint = build_entrypoint(cfg, kind, args)
    submission_id = submission_id or new_submission_id(kind)
    results = results_location(cfg, kind, submission_id, args)  # a name the driver would refuse fails here
    resolved = resolve_address(address, cfg)
    client = job_client(resolved)
    job = cfg.job
    sid = _call(
        client.submit_job,
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env=runtime_env,
        metadata={"kka_kind": kind, "kka_results": results},
        entrypoint_num_cpus=job.entrypoint_num_cpus or None,
        entrypoint_num_gpus=job.entrypoint_num_gpus or None,
        entrypoint_memory=job.entrypoint_memory or None,
        entrypoint_resources=job.entrypoint_resources or None,
    )
    return {"submission_id": sid, "address": resolved, "entrypoint": entrypoint,
            "results": results}


def follow(client: Any, submission_id: str, out: TextIO = sys.stdout, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` until it ends; returns the final status name."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as err:  # the log stream closed before the job ended
        logger.warning("log stream of %s ended early (%s); waiting for the job", submission_id, err)
    while not (status := _call(client.get_job_status, submission_id)).is_terminal():
        time.sleep(poll_s)
    return str(status.value)


def exit_code(status: str) -> int:
    """0 for SUCCEEDED, 1 for FAILED or STOPPED."""
    return 0 if status == "SUCCEEDED" else 1


# ---------------------------------------------------------------------------------------
# the kka subcommands


_SUBMIT_DESCRIPTION = (
    "Submit a KKA job to a Ray cluster through its job server and print the submission id. Options and "
    "key.sub=value overrides may come in any order; arguments after `--` go to the job script unchanged "
    "(e.g. the run directories of evaluate).")


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"Ray job server (default: job.address, $RAY_ADDRESS, {DEFAULT_ADDRESS})")
    p.add_argument("--config", "-c", help="YAML config file (a KKA config; its job section configures the submission)")


def _submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=list(JOB_SCRIPTS), help="run: the whole loop; generate: prep + generation of "
                   "iteration 1; preference: the DPO update of an evaluated iteration; evaluate: kka eval")
    _common_arguments(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream the logs until the job ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--runtime-env", help="a runtime env YAML to start from (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--submission-id", help="job id (default: kka-<kind>-<time>-<random>)")
    p.add_argument("--output", "-o", help="run: / generate: the run directory's name under run.storage_path; "
                   "evaluate: the tables directory")
    p.add_argument("--resume", metavar="DIR", help="run: continue the run at DIR (a path on the cluster or a storage URI)")
    p.add_argument("--run-dir", help="preference: the run directory (a path on the cluster or a storage URI)")
    p.add_argument("--iteration", type=int, help="preference: the iteration whose evaluated anomalies train DPO")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")


def add_parsers(sub: Any) -> None:
    """``kka submit``, ``kka status``, ``kka stop``, ``kka logs`` in kka_ray.cli's parser (for --help;
    ``kka submit`` itself is parsed by :func:`submit_main`)."""
    _submit_arguments(sub.add_parser("submit", help="submit a KKA job to a Ray cluster (run, generate, preference, "
                                     "evaluate)", description=_SUBMIT_DESCRIPTION))
    for name, text in (("status", "print a submitted job's status"), ("stop", "stop a submitted job"),
                       ("logs", "print a submitted job's logs")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("submission_id")
        _common_arguments(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit 0 only if it SUCCEEDED")


def submit_main(argv: list[str]) -> int:
    """``kka submit KIND ...``: submit, print the submission id, optionally follow to the end."""
    job_args: list[str] = []
    if "--" in argv:
        argv, job_args = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(prog="kka submit", description=_SUBMIT_DESCRIPTION)
    _submit_arguments(p)
    args = p.parse_intermixed_args(argv)
    try:
        job = submit(args.kind, args.config, args.overrides, address=args.address, runtime_env_file=args.runtime_env,
                     submission_id=args.submission_id, output=args.output, resume=args.resume,
                     run_dir=args.run_dir, iteration=args.iteration, extra=job_args)
        sid, addr = job["submission_id"], job["address"]
        print(sid, flush=True)
        print(f"kka: submitted to {addr}: {job['entrypoint']}\n  results: {job['results']}\n"
              f"  kka status {sid} --address {addr}\n  kka logs {sid} --follow --address {addr}\n"
              f"  kka stop {sid} --address {addr}", file=sys.stderr, flush=True)
        if not args.follow:
            return 0
        status = follow(job_client(addr), sid)
        print(f"kka: job {sid} {status}", file=sys.stderr)
        return exit_code(status)
    except (ConfigError, JobServerError, FileNotFoundError) as err:
        print(f"kka: error: {err}", file=sys.stderr)
        return 2


def cli_command(args: argparse.Namespace) -> int:
    """``kka status|stop|logs ID``; config errors propagate to kka_ray.cli, which prints them."""
    try:
        cfg = load_config(args.config) if args.config else KKAConfig()
        client = job_client(resolve_address(args.address, cfg))
        sid = args.submission_id
        if args.command == "status":
            info = _call(client.get_job_info, sid)
            print(f"{sid}: {info.status.value}")
            if info.message:
                print(f"  {info.message}")
            print(f"  entrypoint: {info.entrypoint}")
            if (info.metadata or {}).get("kka_results"):
                print(f"  results: {info.metadata['kka_results']}")
        elif args.command == "stop":
            stopped = _call(client.stop_job, sid)
            print(f"{sid}: {'stop requested' if stopped else 'was not running'}")
        elif args.command == "logs":
            if args.follow:
                status = follow(client, sid)
                print(f"kka: job {sid} {status}", file=sys.stderr)
                return exit_code(status)
            sys.stdout.write(_call(client.get_job_logs, sid))
    except JobServerError as err:
        print(f"kka: error: {err}", file=sys.stderr)
        return 2
    return 0
