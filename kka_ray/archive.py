"""Pack a finished run directory into one small archive, and unpack it anywhere.

A run directory holds what a run produced (its config, stage records, anomaly store and sets,
the prep stage's prompts) beside bulk that can be rebuilt or is only needed to resume: backbone
features (of the normal images, ``prep/features.safetensors``, tens of MB, and of every
generated image, the anomaly store's ``features`` column), detector and evaluator checkpoints,
Ray Train and Ray Data scratch, the LoRA adapters. ``kka pack`` keeps the first and drops the
second, so a finished run moves off a cluster, into a repository or to a colleague at a few
hundred KB; ``kka unpack`` restores it, and ``kka eval`` then works on it as on the original:
the normal features are recomputed from the run's own split with its saved normaliser on first
use (:meth:`kka_ray.rundir.RunInputs.features`), bit for bit with the same backbone
weights and torch build.

The anomaly store keeps its ``features`` column unless ``--drop-features`` (then a packed
iteration is tens of KB): ``kka unpack`` recomputes them from the stored PNGs as generation
does, equal up to float rounding (generation's thread count and batching differ), so a feature
detector fitted on an unpacked run may differ from the original in the last digits.

Detector evaluations already made (``eval/results/*.json``) travel with the run unless
``--no-eval``; unpacking points their ``run`` field at the new directory.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path, PurePosixPath

from kka_ray.data.store import STORE_COLUMNS
from kka_ray.rundir import RunLayout, RunState, is_run_dir

logger = logging.getLogger(__name__)

# What a packed run keeps: files at the top, and whole sub-directories.
KEPT_FILES = ("config.yaml", "state.json", "metrics.jsonl", "baselines.json", "report.html",
              "prep/normalizer.safetensors", "prep/prompts.json", "prep/representatives.json")
KEPT_DIRS = ("stages", "sets", "anomalies", "audit")
EVAL_DIR = "eval/results"


def _members(run: Path, include_eval: bool) -> list[str]:
    names = [f for f in KEPT_FILES if (run / f).is_file()]
    for d in KEPT_DIRS + ((EVAL_DIR,) if include_eval else ()):
        if (run / d).is_dir():
            names += sorted(p.relative_to(run).as_posix() for p in (run / d).rglob("*") if p.is_file())
    return names


def _is_store(name: str) -> bool:
    return name.startswith("anomalies/") and name.endswith(".parquet")


def _without_features(path: Path) -> bytes:
    """An anomaly store file without its ``features`` column, as Parquet bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "features" in table.column_names:
        table = table.drop_columns(["features"])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _restore_features(run: Path) -> int:
    """Add the ``features`` column back to every anomaly store file of ``run`` that lacks it,
    computed from its PNGs as generation does (:class:`~kka_ray.knowledge.features.FeatureBatchExtractor`
    with the run's backbone). Returns the number of rows given features."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kka_ray.config import load_config
    from kka_ray.devices import resolve_device
    from kka_ray.knowledge.features import FeatureBatchExtractor

    files = [p for p in sorted((run / "anomalies").glob("*.parquet")) if "features" not in pq.read_schema(p).names]
    if not files:
        return 0
    cfg = load_config(RunLayout(run).config)
    k = cfg.knowledge
    extract = FeatureBatchExtractor(k.backbone, k.image_size, cfg.paths.cache_dir(),
                                    device=resolve_device(cfg.run.device), batch_size=k.batch_size)
    n = 0
    for path in files:
        table = pq.read_table(path)
        images = np.empty(table.num_rows, dtype=object)
        images[:] = table.column("image").to_pylist()
        feats = extract({"image": images})["features"] if table.num_rows else np.zeros((0, 0), np.float32)
        if len(feats) != table.num_rows:
            raise ValueError(f"{path}: {table.num_rows - len(feats)} stored images do not decode; the archive is damaged")
        column = pa.array([row.tolist() for row in np.asarray(feats, np.float32)], type=pa.list_(pa.float32()))
        tmp = path.with_name(path.name + ".tmp")
        order = list(table.column_names)
        order.insert(min(STORE_COLUMNS.index("features"), len(order)), "features")  # where the store keeps it
        pq.write_table(table.append_column("features", column).select(order), tmp)
        tmp.replace(path)
        n += table.num_rows
    logger.info("recomputed the backbone features of %d stored anomalies with %s", n, k.backbone)
    return n


def pack_run(run_dir: str | Path, out: str | Path | None = None, include_eval: bool = True,
             drop_features: bool = False) -> Path:
    """Write ``run_dir`` (finished) as a gzip tar ``out`` (default ``<run_dir>.tar.gz``) and return its path.

    The archive is reproducible: entries are sorted and carry no owner or time, so packing the
    same run twice gives the same bytes."""
    run = Path(run_dir)
    if not is_run_dir(run) or not RunLayout(run).state.is_file():
        raise FileNotFoundError(f"{run} has no config.yaml or state.json: it is not a kka run directory")
    if not RunState.load(run).finished:
        raise ValueError(f"{run} has not finished: pack finished runs only (resume it with "
                         f"`kka run --resume {run}` first); a packed run keeps no adapters or checkpoints to resume from")
    out = Path(out) if out is not None else run.with_name(run.name + ".tar.gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    import gzip

    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for name in _members(run, include_eval):
            data = _without_features(run / name) if drop_features and _is_store(name) else (run / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    logger.info("packed %s into %s (%.0f KB)", run, out, out.stat().st_size / 1024)
    return out


def unpack_run(archive: str | Path, dest: str | Path) -> Path:
    """Restore a :func:`pack_run` archive into ``dest`` (which must not hold a run already)."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"no run archive at {archive}")
    if RunLayout(dest).state.exists() or is_run_dir(dest):
        raise FileExistsError(f"{dest} already holds a run: unpack into a new directory")
    with tarfile.open(archive, "r:gz") as tar:
        entries = tar.getmembers()
        bad = [m.name for m in entries if not m.isfile() or PurePosixPath(m.name).is_absolute() or ".." in PurePosixPath(m.name).parts]
        if bad:
            raise ValueError(f"{archive} is not a kka run archive: unexpected entries {bad[:3]}")
        if "config.yaml" not in {m.name for m in entries}:
            raise ValueError(f"{archive} is not a kka run archive: it has no config.yaml")
        dest.mkdir(parents=True, exist_ok=True)
        for m in entries:
            target = dest / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(m).read()
            if m.name.startswith(EVAL_DIR + "/") and m.name.endswith(".json"):
                row = json.loads(data)
                row["run"] = str(dest)
                data = json.dumps(row, indent=1).encode()
            target.write_bytes(data)
    _restore_features(dest)
    logger.info("unpacked %s into %s", archive, dest)
    return dest


def add_parsers(sub) -> None:
    pack = sub.add_parser("pack", help="pack a finished run directory into a small .tar.gz (no bulk, no checkpoints)")
    pack.add_argument("run_dir")
    pack.add_argument("--out", "-o", help="archive path (default: <run_dir>.tar.gz)")
    pack.add_argument("--no-eval", action="store_true", help="leave out the detector evaluations (eval/results)")
    pack.add_argument("--drop-features", action="store_true",
                      help="leave out the anomaly store's backbone features (recomputed on unpack, equal up to float rounding)")
    unpack = sub.add_parser("unpack", help="restore a packed run into a new directory (kka eval works on it)")
    unpack.add_argument("archive")
    unpack.add_argument("dest")
