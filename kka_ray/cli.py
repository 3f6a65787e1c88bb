"""``kka``: the command-line entry point.

    kka run [--config FILE] [--output DIR] [key.sub=value ...]   run KKA (embedded default without --config)
    kka run --resume DIR                                         continue a run from its last completed stage
    kka prepare models [--cache DIR] [--gemma3]                  convert/build the local default models
    kka prepare drawer OUT_DIR [--steps N --device auto ...]     train the default drawer's UNet on Fashion-MNIST
    kka config [--config FILE] [key.sub=value ...]               print the resolved config
    kka report DIR                                               (re)write DIR/report.html
    kka submit KIND [--config FILE] [--address URL] [--follow] [key.sub=value ...]
                                                                 submit a Ray job: run | generate | preference | evaluate
    kka status ID | kka stop ID | kka logs ID [--follow]         a submitted job's status, stop it, its logs
    kka eval RUN_DIR... [--detectors ...] [--seeds 3]            detectors with/without KKA: the paper's tables
"""

from __future__ import annotations

import argparse
import logging
import sys

from kka_ray.config import USER_ERRORS, ConfigError, load_config
from kka_ray.logs import setup_logging

logger = logging.getLogger("kka_ray")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kka", description="Key Knowledge Augmentation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the KKA loop (the embedded default config without --config)")
    run.add_argument("--config", "-c", help="YAML config file (default: the embedded default)")
    run.add_argument("--output", "-o", help="run directory (default: run.output_dir or runs/<timestamp>; "
                     "a name under run.storage_path when that is set)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR (a path or a storage URI) from its "
                     "last completed stage")
    run.add_argument("--check", action="store_true", help="check the config, the dataset (path, format, classes) and "
                     "the output directory, then stop: nothing is started or written")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. run.iterations=2 describer.temperature=0.8")

    prep = sub.add_parser("prepare", help="prepare local models into the model cache")
    prep.add_argument("what", choices=["models", "drawer"],
                      help="models: convert/build the local default models into the cache; drawer: train the "
                           "default drawer (options: kka prepare drawer --help)")
    prep.add_argument("--cache", help="model cache directory (default: paths.model_cache or $KKA_CACHE)")
    prep.add_argument("--gemma3", action="store_true", help="also convert Gemma 3 270M (base; Gemma Terms of Use) from "
                      "its installed GGUF packages, for describer.model=gemma3-270m")

    cfg = sub.add_parser("config", help="print the resolved config as YAML")
    cfg.add_argument("--config", "-c")
    cfg.add_argument("overrides", nargs="*")

    rep = sub.add_parser("report", help="(re)write report.html of a run directory")
    rep.add_argument("run_dir")

    from kka_ray.archive import add_parsers as add_archive_parsers

    add_archive_parsers(sub)

    from kka_ray.cost import add_parser as add_cost_parser

    add_cost_parser(sub)

    from kka_ray.tables.cli import add_parser as add_eval_parser

    add_eval_parser(sub)

    from kka_ray.submit import add_parsers as add_job_parsers

    add_job_parsers(sub)
    return p


def _run(args: argparse.Namespace) -> int:
    from kka_ray.drivers import check_run, create_run, resume_run

    if args.resume and (args.config or args.overrides):
        raise ConfigError("--resume continues a run with its own config.yaml: drop --config and overrides")
    if args.check:
        print(check_run(args.resume, None if args.resume else load_config(args.config, args.overrides), args.output))
        return 0
    if args.resume:
        run, where = resume_run(args.resume)
    else:
        run, where = create_run(load_config(args.config, args.overrides), args.output)
    setup_logging(run.cfg.run.log_level)
    out = where.execute(run)  # run.execute(), uploading to run.storage_path when that is a URI
    print(f"run complete: {out}\n  metrics: {out}/metrics.jsonl\n  report:  {out}/report.html")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from kka_ray.config import KKAConfig
    from kka_ray.prepare import prepare_models

    if args.what == "drawer":  # `kka prepare --cache X drawer`: the shortcut in main needs "drawer" first
        raise ConfigError("`kka prepare drawer` takes its own options after it: "
                          "kka prepare drawer OUT_DIR [--cache-dir DIR ...]")
    setup_logging("INFO")
    cache = args.cache or str(KKAConfig().paths.cache_dir())
    for name, path in prepare_models(cache).items():
        print(f"{name}: {path}")
    if args.gemma3:
        from kka_ray.generation.gemma3 import prepare_gemma3

        print(f"gemma3-270m: {prepare_gemma3(cache)}")
    return 0


def _archive(args: argparse.Namespace) -> int:
    import tarfile

    from kka_ray.archive import pack_run, unpack_run

    setup_logging("INFO")
    try:
        if args.command == "pack":
            print(pack_run(args.run_dir, args.out, include_eval=not args.no_eval, drop_features=args.drop_features))
        else:
            print(unpack_run(args.archive, args.dest))
    except (ValueError, OSError, tarfile.TarError) as err:  # not finished; missing, occupied or not a run archive
        raise ConfigError(str(err)) from None
    return 0


def _simple(args: argparse.Namespace) -> int:
    """config, report, cost, status/stop/logs, eval."""
    if args.command == "config":
        print(load_config(args.config, args.overrides).to_yaml(), end="")
        return 0
    if args.command == "report":
        from kka_ray.report import write_report

        print(write_report(args.run_dir))
        return 0
    if args.command == "cost":
        from kka_ray.cost import cost_main

        return cost_main(args)
    if args.command == "eval":
        from kka_ray.tables.cli import run_eval

        setup_logging("INFO")
        return run_eval(args)
    from kka_ray.submit import cli_command  # status, stop, logs

    return cli_command(args)


_COMMANDS = {"run": _run, "prepare": _prepare, "pack": _archive, "unpack": _archive}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["prepare", "drawer"]:
        from kka_ray.generation.train_drawer import main as train_drawer_main

        return train_drawer_main(argv[2:])
    if argv[:1] == ["submit"]:  # parsed on its own: options and overrides may be intermixed
        from kka_ray.submit import submit_main

        return submit_main(argv[1:])
    if argv[:1] == ["eval"]:  # parsed on its own: run directories, options and overrides may be intermixed
        from kka_ray.tables.cli import eval_parser

        args = eval_parser().parse_intermixed_args(argv[1:])
        args.command = "eval"
    else:
        args = _parser().parse_args(argv)
    try:
        return _COMMANDS.get(args.command, _simple)(args)
    except USER_ERRORS as err:
        print(f"kka: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
