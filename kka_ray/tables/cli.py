"""``kka eval RUN_DIR... [--detectors ...] [--seeds 3] [--iterations all|last] [--output DIR]``.

A RUN_DIR is a kka run directory, or a directory whose subdirectories are runs (for example one
run per Fashion-MNIST class). Fitted results are cached inside each run (``eval/results``), so
running it again only fits what is missing; ``--no-fit`` tabulates the cached results alone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kka_ray.config import ConfigError
from kka_ray.detectors.registry import DETECTORS
from kka_ray.tables.runner import DEFAULT_SEEDS
from kka_ray.rundir import is_run_dir

logger = logging.getLogger(__name__)

DEFAULT_DETECTORS = list(DETECTORS)


def add_parser(sub) -> argparse.ArgumentParser:
    return _arguments(sub.add_parser("eval", help="train and score detectors on finished runs; write the paper's tables",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def eval_parser() -> argparse.ArgumentParser:
    """``kka eval`` parsed on its own, so run directories, options and overrides may be intermixed."""
    return _arguments(argparse.ArgumentParser(prog="kka eval", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))


def _arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories of run directories")
    p.add_argument("--detectors", default=",".join(DEFAULT_DETECTORS),
                   help=f"comma-separated, from {sorted(DETECTORS)} (default: all five)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="detector seeds per run and variant (default 3)")
    p.add_argument("--iterations", choices=["all", "last"], default="all",
                   help="all: every completed iteration (the KKA(0..k) ablation); last: only the final one")
    p.add_argument("--output", "-o", help="where the tables go (default: <first RUN_DIR>/eval_tables)")
    p.add_argument("--no-fit", action="store_true", help="tabulate cached results only; fit nothing")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto instead of each run's run.device; cuda also "
                                     "gives every detector's Ray Train workers a GPU (use_gpu)")
    p.add_argument("overrides", nargs="*", metavar="detector.KEY=VALUE",
                   help="detector settings instead of each run's own, e.g. detector.simplenet.epochs=4 "
                        "(results are cached per settings, not per device), or where evaluation runs: "
                        "run.device=..., ray.address=auto, 'detector.simplenet.resources_per_worker={CPU: 4, GPU: 0.5}'")
    return p


def find_runs(paths: list[str]) -> list[Path]:
    from kka_ray.storage import is_uri

    uris = [p for p in paths if is_uri(p)]
    if uris:
        raise ConfigError(f"kka eval reads run directories on this machine, not storage URIs ({uris[0]}): "
                          "copy the run directories here first")
    runs: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            runs.append(p)
        elif p.is_dir() and any(is_run_dir(c) for c in p.iterdir() if c.is_dir()):
            runs += sorted(c for c in p.iterdir() if is_run_dir(c))
        else:
            raise FileNotFoundError(f"{p} is neither a kka run directory (no config.yaml) nor a directory of runs")
    return runs


def run_eval(args: argparse.Namespace) -> int:
    from kka_ray.tables.runner import cached_rows, evaluate_run
    from kka_ray.tables.paper import MAIN_COLUMNS, to_markdown, main_table, write_tables

    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ConfigError(f"unknown detector(s) {unknown} in --detectors: choose from {sorted(DETECTORS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    items = [*args.runs, *args.overrides]  # argparse gives every positional to RUN_DIR
    overrides = [i for i in items if "=" in i]
    if args.device:
        from kka_ray.tables.runner import device_overrides

        overrides = [*device_overrides(args.device), *overrides]
    runs = find_runs([i for i in items if "=" not in i])
    rows = []
    if args.no_fit:
        for run in runs:
            rows += cached_rows(run, detectors, overrides)
    else:
        from kka_ray.tables.runner import run_config
        from kka_ray.cluster import init_ray

        started = init_ray(run_config(runs[0], overrides))
        try:
            for run in runs:
                rows += evaluate_run(run, detectors, seeds=args.seeds, iterations=args.iterations,
                                     overrides=overrides)
        finally:
            if started:
                import ray

                ray.shutdown()
    if not rows:
        raise FileNotFoundError(f"no evaluation results in {[str(r) for r in runs]}: run `kka eval` without --no-fit")
    out = Path(args.output) if args.output else runs[0].parent / "eval_tables" if len(runs) > 1 else runs[0] / "eval_tables"
    paths = write_tables(rows, out)
    print(to_markdown(main_table(rows), MAIN_COLUMNS), end="")
    print(f"\ntables: {paths['table_md']}  {paths['table_csv']}\nablation: {paths['ablation_md']}\nplot: {paths['plot']}")
    return 0
