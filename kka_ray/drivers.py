"""What the entry points run: ``kka run`` (cli.py) and the Ray job scripts in ``jobs/``.

A new run goes to its location (:func:`create_run`: a plain directory, or
``<run.storage_path>/<name>`` in a Ray job, kka_ray/storage.py), checked before Ray starts
(kka_ray/preflight.py); an existing one is resumed, downloaded first from a URI
(:func:`resume_run`). ``jobs/generate.py`` runs :func:`generate_main` (prep + generation of
iteration 1) and ``jobs/preference.py`` :func:`preference_main` (the DPO update of one evaluated
iteration); ``jobs/kka_run.py`` is ``kka run`` and ``jobs/evaluate.py`` is ``kka eval``. A user
mistake is one ``kka: error:`` line and exit status 2. Nothing in the engine's core imports this
module.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from kka_ray.config import USER_ERRORS, ConfigError, KKAConfig, load_config
from kka_ray.logs import setup_logging
from kka_ray.storage import DEFAULT_JOB_STORAGE, RunLocation, filesystem, is_uri, run_target, staging_dir
from kka_ray.rundir import RunLayout, is_run_dir, require_run_dir

if TYPE_CHECKING:
    from kka_ray.loop import KKARun

logger = logging.getLogger(__name__)

# ``kka submit`` sends the config file's text to the job in this environment variable.
CONFIG_ENV = "KKA_CONFIG_YAML"


def new_run_location(cfg: KKAConfig, output: str | None = None) -> RunLocation:
    """Where a new run goes (see the module docstring); nothing is created yet."""
    from kka_ray.loop import new_run_dir

    target = run_target(cfg, output)
    if target is None:
        return RunLocation(new_run_dir(cfg, output))
    if cfg.run.storage_path is None:
        logger.warning("run.storage_path is not set: this Ray job writes its run directory under %s on the node "
                       "running the job driver", DEFAULT_JOB_STORAGE)
    if is_uri(target):
        filesystem(target)  # a bad URI fails now, not after the first stage
        return RunLocation(staging_dir(target), remote=target)
    return RunLocation(target)


def create_run(cfg: KKAConfig, output: str | None = None) -> tuple["KKARun", RunLocation]:
    """A new run at its location (`kka run`, jobs/kka_run.py, jobs/generate.py)."""
    from kka_ray.loop import KKARun
    from kka_ray.preflight import check_new_run

    where = new_run_location(cfg, output)
    check_new_run(cfg, where.local if where.remote is None else None)  # before Ray and before any directory
    if where.remote is None:
        return KKARun.create(cfg, str(where.local)), where
    if where.exists():
        raise FileExistsError(f"{where.remote} already holds a run: resume it (--resume {where.remote}) or pick another name")
    shutil.rmtree(where.local, ignore_errors=True)  # a stale staging copy of an earlier attempt
    run = KKARun.create(cfg, str(where.local))
    where.push()
    return run, where


def check_run(resume: str | None, cfg: KKAConfig | None, output: str | None = None) -> str:
    """What ``kka run --check`` checks without Ray or writing anything: a new run's config,
    dataset and output directory, or a local run to resume and its dataset. Returns a summary
    line; a mistake raises one of ``USER_ERRORS``."""
    from kka_ray.config import load_config
    from kka_ray.preflight import check_new_run, check_resume

    if resume is not None:
        if is_uri(resume):
            raise ConfigError("--check reads a local run directory; resume the URI itself to check it")
        check_resume(load_config(RunLayout(require_run_dir(resume)).config))
        return f"ok: {resume} can be resumed"
    assert cfg is not None
    where = new_run_location(cfg, output)  # creates nothing; a bad URI fails here
    check_new_run(cfg, where.local if where.remote is None else None)
    return f"ok: a new run at {where.remote or where.local}"


def resume_run(run_dir: str | os.PathLike) -> tuple["KKARun", RunLocation]:
    """An existing run, downloaded first when ``run_dir`` is a URI (`kka run --resume`, jobs)."""
    from kka_ray.loop import KKARun
    from kka_ray.preflight import check_resume

    if is_uri(run_dir):
        where = RunLocation(staging_dir(str(run_dir)), remote=str(run_dir).rstrip("/"))
        where.pull()
        if not is_run_dir(where.local):
            raise FileNotFoundError(f"{run_dir} has no config.yaml: it is not a kka run directory")
        run = KKARun.resume(where.local)
    else:
        run, where = KKARun.resume(run_dir), RunLocation(run_dir)
    if not run.state.finished:
        check_resume(run.cfg)
    return run, where


def job_config_args(argv: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """``argv`` with ``--config FILE`` added when kka submit sent the config text in KKA_CONFIG_YAML."""
    text = environ.get(CONFIG_ENV)
    if text is None or "--config" in argv or "-c" in argv or any(a.startswith("--config=") for a in argv):
        return list(argv)
    path = Path(tempfile.mkdtemp(prefix="kka-job-")) / "submitted-config.yaml"
    path.write_text(text)
    atexit.register(shutil.rmtree, path.parent, True)  # the run directory keeps the resolved config
    return ["--config", str(path), *argv]


def _job_errors(fn):
    """One ``kka: error:`` line on stderr and exit 2 for wrong input (config, paths, stage order)."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return fn(list(sys.argv[1:] if argv is None else argv))
        except USER_ERRORS as err:
            print(f"kka: error: {err}", file=sys.stderr)
            return 2

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


@_job_errors
def generate_main(argv: list[str]) -> int:
    """jobs/generate.py: prep (Eq. 1, 2) and generation of iteration 1 (Eq. 3, 4) into a new run
    directory: ``generated/iter_1/*.parquet``, read back with kka_ray.generation.pipeline.read_generated.
    ``kka run --resume`` continues that run with its baselines and evaluation."""
    p = argparse.ArgumentParser(prog="jobs/generate.py", description=generate_main.__doc__)
    p.add_argument("--config", "-c", help="YAML config file (default: the embedded default)")
    p.add_argument("--output", "-o", help="run directory (a name under run.storage_path when that is set)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_args(job_config_args(argv))
    run, where = create_run(load_config(args.config, args.overrides), args.output)
    setup_logging(run.cfg.run.log_level)
    out = where.execute(run, ["prep", "iter1.generate"], cleanup=False)
    n = run.stage_result("iter1.generate").get("n_kept", 0)
    where.cleanup()
    print(f"generation complete: {n} anomalies in {out}/generated/iter_1/")
    return 0


@_job_errors
def preference_main(argv: list[str]) -> int:
    """jobs/preference.py: the DPO update (Eq. 7) of iteration K of an existing run, whose
    iterK.evaluate stage is complete: writes adapters/iter_K and records iterK.preference."""
    p = argparse.ArgumentParser(prog="jobs/preference.py", description=preference_main.__doc__)
    p.add_argument("--run-dir", required=True, help="the run directory (a path or a storage URI)")
    p.add_argument("--iteration", type=int, required=True, help="the evaluated iteration K")
    args = p.parse_args(argv)
    run, where = resume_run(args.run_dir)
    k, done = args.iteration, run.state.completed
    problem = None
    if not 1 <= k <= run.cfg.run.iterations:
        problem = f"--iteration {k} is outside this run's iterations 1..{run.cfg.run.iterations}"
    elif f"iter{k}.evaluate" not in done:
        problem = (f"iteration {k} of {where.uri} is not evaluated yet (completed stages: {done or 'none'}): the DPO "
                   f"update needs iter{k}.evaluate; continue the run first (kka submit run --resume DIR)")
    if problem or f"iter{k}.preference" in done:
        where.cleanup()  # a remote run's staging copy: nothing changed
        if problem:
            raise ConfigError(problem)
        print(f"iteration {k} of {where.uri} already has its DPO update (adapter version {run.state.adapter_version})")
        return 0
    setup_logging(run.cfg.run.log_level)
    out = where.execute(run, [f"iter{k}.preference"], cleanup=False)
    result = run.stage_result(f"iter{k}.preference")
    where.cleanup()
    print(f"preference complete: {result.get('n_pairs', 0)} pairs -> {out}/adapters/iter_{k}")
    return 0
