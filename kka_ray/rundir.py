"""A run directory: where every artefact lives (:class:`RunLayout`), which stages are complete
(:class:`RunState`, ``state.json``), the one check that a path is a run (:func:`is_run_dir`,
:func:`require_run_dir`), and what a detector reads from it (:class:`RunInputs`).

Layout (all under the run directory; kka_ray/loop.py writes them, stage by stage)::

    config.yaml  state.json  metrics.jsonl  baselines.json  report.html
    prep/        features.safetensors normalizer.safetensors representatives.json prompts.json
    stages/      <stage>.json, one record per completed stage (prep, baselines, iter<k>.<stage>)
    generated/   iter_<k>/*.parquet, the stream's output (read by the guard)
    anomalies/   the anomaly store: every generated item with its guard verdict (data/store.py)
    evaluator/   iter_<k>/ the confusion evaluator and split.json (hard and easy ids)
    audit/       iter_<k>.json   sets/ iter_<k>.json (the anomaly set after iteration k)
    detector/    baseline_<name>/, iter_<k>/   adapters/ iter_<k>/ (LoRA)
    shift/       v<version>.parquet, the describer shift's samples   ray_train/   eval/

:class:`RunInputs`: normal rows come from the run's one-class split (``config.yaml`` rebuilds
it): pooled, normalised backbone features from ``prep/features.safetensors`` for feature
detectors, uint8 images for image detectors. Anomaly rows are the members of the anomaly set
after iteration k read from the Parquet store: their backbone features (normalised like the
normals) or their PNG images decoded to the normal images' size and mode. Undecodable images
are skipped and counted (``decode_errors``). :func:`split_members` holds out a fixed share of an
anomaly set, by a hash of each id, for checkpoint selection: the same anomaly is on the same
side in every iteration and seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from kka_ray.config import KKAConfig, load_config
from kka_ray.data.store import AnomalyStore, Member, load_anomaly_set, write_json_atomic

if TYPE_CHECKING:
    from kka_ray.data.protocols import OneClassSplit

logger = logging.getLogger(__name__)

Part = Literal["train", "holdout", "test"]

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"


def _per_iteration(folder: str, suffix: str = "") -> Callable[["RunLayout", int], Path]:
    return lambda self, k: self.root / folder / f"iter_{k}{suffix}"


class RunLayout:
    """The path of every artefact of the run directory ``root`` (nothing is created here)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    config = property(lambda self: self.root / CONFIG_FILE)
    state = property(lambda self: self.root / STATE_FILE)
    metrics = property(lambda self: self.root / "metrics.jsonl")
    report = property(lambda self: self.root / "report.html")
    baselines = property(lambda self: self.root / "baselines.json")
    store = property(lambda self: self.root / "anomalies")
    ray_train = property(lambda self: self.root / "ray_train")
    prep = property(lambda self: self.root / "prep")
    features = property(lambda self: self.root / "prep" / "features.safetensors")
    normalizer = property(lambda self: self.root / "prep" / "normalizer.safetensors")
    representatives = property(lambda self: self.root / "prep" / "representatives.json")
    prompts = property(lambda self: self.root / "prep" / "prompts.json")
    stages = property(lambda self: self.root / "stages")
    eval = property(lambda self: self.root / "eval")

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    # per iteration k: <folder>/iter_<k><suffix>
    generated = _per_iteration("generated")  # the stream's Parquet output
    evaluator = _per_iteration("evaluator")  # the confusion evaluator and its split
    audit = _per_iteration("audit", ".json")
    anomaly_set = _per_iteration("sets", ".json")  # the anomaly set after iteration k
    adapter = _per_iteration("adapters")  # the describer's LoRA adapter written after iteration k

    def split(self, k: int) -> Path:
        """The hard and easy ids of iteration ``k``'s new anomalies."""
        return self.evaluator(k) / "split.json"

    def detector(self, tag: str) -> Path:
        """A detector's checkpoint directory: ``baseline_<name>`` or ``iter_<k>``."""
        return self.root / "detector" / tag

    def shift(self, version: int) -> Path:
        return self.root / "shift" / f"v{version}.parquet"

    def shift_generated(self, version: int) -> Path:
        return self.root / "shift" / f"v{version}_generated"


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a kka run directory (it holds the run's ``config.yaml``)."""
    return RunLayout(path).config.is_file()


def require_run_dir(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or the one error a command gives for a path that is not a run."""
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: it is not a kka run directory")
    return Path(path)


@dataclasses.dataclass
class RunState:
    """Which stages of a run are complete, and what they left for later ones (``state.json``,
    written atomically after every stage)."""

    path: Path
    completed: list[str] = dataclasses.field(default_factory=list)
    adapter_version: int = 0  # the describer's LoRA adapter (0: the base model)
    adapter_path: str | None = None
    finished: bool = False
    rep_size: int | None = None  # the anomaly set's size in rep mode, fixed by its first update

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "RunState":
        path = RunLayout(run_dir).state
        data = json.loads(path.read_text()) if path.is_file() else {}
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(path, **{k: v for k, v in data.items() if k in known})

    def done(self, stage: str) -> bool:
        return stage in self.completed

    def mark(self, stage: str, **fields: Any) -> None:
        """Record ``stage`` as complete (and ``fields``), then write the state."""
        unknown = [name for name in fields if not hasattr(self, name) or name == "path"]
        if unknown:
            raise AttributeError(f"RunState has no field {unknown[0]!r}")
        if stage not in self.completed:
            self.completed.append(stage)
        for name, value in fields.items():
            setattr(self, name, value)
        write_json_atomic(self.to_dict(), self.path)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}


def split_members(members: list[Member], fraction: float) -> tuple[list[Member], list[Member]]:
    """(training, validation) members; an id goes to validation when its hash falls below ``fraction``."""
    if fraction <= 0 or len(members) < 2:
        return list(members), []

    def u(m: Member) -> float:
        return int(hashlib.sha1(m.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    val = [m for m in members if u(m) < fraction]
    train = [m for m in members if u(m) >= fraction]
    if not train:  # never hold out the whole set
        train, val = val[:1], val[1:]
    return train, val


class RunInputs:
    """Normal and anomaly rows of one run directory, as features or images."""

    def __init__(self, run_dir: str | Path, cfg: KKAConfig | None = None) -> None:
        self.dir = Path(run_dir) if cfg is not None else require_run_dir(run_dir)
        self.layout = RunLayout(self.dir)
        self.cfg = cfg if cfg is not None else load_config(self.layout.config)
        self._split: "OneClassSplit | None" = None
        self._features: dict[str, np.ndarray] | None = None
        self._normalizer = None
        self.store = AnomalyStore(self.layout.store)
        self.decode_errors = 0

    # ------------------------------------------------------------------ run facts
    @property
    def split(self) -> "OneClassSplit":
        if self._split is None:
            from kka_ray.data.protocols import build_split

            self._split = build_split(self.cfg.data, seed=self.cfg.run.seed)
        return self._split

    def completed_iterations(self) -> list[int]:
        """Iterations whose anomaly set exists (``sets/iter_<k>.json``), ascending."""
        done = set(RunState.load(self.dir).completed)
        return [k for k in range(1, self.cfg.run.iterations + 1)
                if self.layout.anomaly_set(k).is_file() and f"iter{k}.update" in done]

    def members(self, k: int) -> list[Member]:
        if k <= 0:
            return []
        path = self.layout.anomaly_set(k)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: iteration {k} of this run has not finished its update stage")
        return load_anomaly_set(path)

    def set_digest(self, k: int) -> str:
        """A short hash of the anomaly set after iteration ``k`` (its members' ids and image bytes;
        ``""`` for k = 0): results with the same digest were fitted on the same anomalies."""
        members = self.members(k)
        if not members:
            return ""
        rows = self.store.rows([m.id for m in members], columns=["id", "image"])
        h = hashlib.sha1()
        for i, image in sorted(zip(rows.column("id").to_pylist(), rows.column("image").to_pylist())):
            h.update(i.encode())
            h.update(hashlib.sha1(bytes(image)).digest())
        return h.hexdigest()[:12]

    def n_generated(self, k: int) -> int:
        """Anomalies generated (kept after drawing) in iterations 1..k."""
        total = 0
        for i in range(1, k + 1):
            path = self.layout.stage_record(f"iter{i}.generate")
            if path.is_file():
                total += int(json.loads(path.read_text()).get("n_kept", 0))
        return total

    # ------------------------------------------------------------------ normal rows
    def features(self) -> dict[str, np.ndarray]:
        if self._features is None:
            from safetensors.numpy import load_file

            path = self.layout.features
            if path.is_file():
                self._features = load_file(str(path))
            elif self.layout.normalizer.is_file():
                self._features = self._recompute_features(path)
            else:
                raise FileNotFoundError(f"{path} does not exist: the run's prep stage has not finished")
        return self._features

    def _recompute_features(self, path: Path) -> dict[str, np.ndarray]:
        """The normal features a packed run left out (kka_ray/archive.py): the run's backbone on
        its own split, normalised with its saved normaliser, as the prep stage computed them."""
        from safetensors.numpy import save_file

        from kka_ray.knowledge.features import extractor_for

        logger.info("%s has no prep features (a packed run): recomputing them with %s", self.dir, self.cfg.knowledge.backbone)
        extractor, normalizer = extractor_for(self.cfg), self.normalizer()
        feats = {name: normalizer.transform(extractor(getattr(self.split, name).images)).astype(np.float32)
                 for name in ("train", "holdout", "test")}
        save_file({k: np.ascontiguousarray(v) for k, v in feats.items()}, str(path))
        return feats

    def remember_prep(self, features: dict[str, np.ndarray], normalizer) -> None:
        """Keep what the prep stage just computed instead of reading it back from disk."""
        self._features, self._normalizer = features, normalizer

    def normalizer(self):
        if self._normalizer is None:
            from safetensors.numpy import load_file

            from kka_ray.knowledge.features import FeatureNormalizer

            self._normalizer = FeatureNormalizer.from_state_dict(load_file(str(self.layout.normalizer)))
        return self._normalizer

    def normal(self, kind: str, part: Part) -> np.ndarray:
        if kind == "features":
            return self.features()[part]
        return getattr(self.split, part).images

    @property
    def test_targets(self) -> np.ndarray:
        return self.split.test_targets

    # ------------------------------------------------------------------ anomaly rows
    def anomalies(self, members: list[Member], kind: str) -> np.ndarray:
        """Rows of ``members`` (in order) as normalised features or uint8 images."""
        if kind == "features":
            dim = self.features()["train"].shape[1]
            if not members:
                return np.zeros((0, dim), np.float32)
            rows = self.store.rows([m.id for m in members], columns=["features"])
            raw = np.stack([np.asarray(v, np.float32) for v in rows.column("features").to_pylist()])
            return self.normalizer().transform(raw).astype(np.float32)
        ref = self.split.train.images
        if not members:
            return np.zeros((0, *ref.shape[1:]), np.uint8)
        rows = self.store.rows([m.id for m in members], columns=["image"])
        images = []
        for data in rows.column("image").to_pylist():
            try:
                images.append(decode_like(data, ref.shape[1:]))
            except Exception as err:  # a corrupt PNG is skipped and counted, never fatal
                self.decode_errors += 1
                logger.warning("skipping an anomaly image that does not decode (%s); %d so far", err, self.decode_errors)
        return np.stack(images) if images else np.zeros((0, *ref.shape[1:]), np.uint8)


def decode_like(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """PNG bytes -> uint8 array of ``shape`` ((H, W) grey or (H, W, 3) RGB), resized if needed."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as img:
        img = img.convert("L" if len(shape) == 2 else "RGB")
        if img.size != (shape[1], shape[0]):
            img = img.resize((shape[1], shape[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
