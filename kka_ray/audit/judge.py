"""The audit's independent judge: a classifier trained on the dataset's real *training* images
(every class) that labels generated anomalies (method.md step 3, "audits what it generated").

Two kinds, both trained by the project and cached in the model cache:

- ``cnn``: :class:`SmallCNN`, three 3x3 conv blocks and an MLP head on 28 px grey images
  (about 92 % Fashion-MNIST test accuracy after 3 epochs, ~2 min on 2 CPU cores); the
  default for grey datasets.
- ``probe``: multinomial logistic regression on the run's backbone features (pooled,
  L2-normalised), fitted on up to ``probe_per_class`` training images per class; the
  default for RGB datasets (CIFAR, Oxford-102, UCM, folders).

The judge is an audit only: nothing in the loop reads its labels. Its test-set confusion
matrix is stored beside the weights, so every audit can report how often the judge itself
calls a real image of another class normal (the floor under ``normal_leak``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kka_ray.config import KKAConfig

logger = logging.getLogger(__name__)

# SmallCNN input side: 28 px as Fashion-MNIST; other grey sizes are resized to it.
CNN_SIDE = 28
CNN_BATCH = 128
CNN_LR, CNN_MAX_LR = 2e-3, 3e-3  # Adam + one-cycle: 92 % on Fashion-MNIST in 3 epochs
PREDICT_BATCH = 512
# A probe's logistic regression: strong enough on 1280-d features, converges in seconds.
PROBE_C = 1.0
PROBE_MAX_ITER = 300
JUDGE_FORMAT = 1
# audit.judge_per_class = None: every training image for the CNN, this many per class for a probe
# (backbone features of 500 images per class take ~6 s per 1000 classes-images on 2 cores).
PROBE_DEFAULT_PER_CLASS = 500
# audit.judge = auto: the kind per dataset (grey 28 px -> the CNN; RGB -> a probe); folders decide
# by their images.
AUTO_KIND = {"fashion_mnist": "cnn", "cifar10": "probe", "cifar100": "probe", "cifar100_superclass": "probe",
             "cifar100_fine": "probe", "oxford102": "probe", "ucm_caption": "probe"}


def _torch_cnn():
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        """Three 3x3 conv blocks + an MLP head."""

        def __init__(self, n_classes: int = 10, channels: int = 1):
            super().__init__()

            def block(cin: int, cout: int) -> nn.Module:
                return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

            self.features = nn.Sequential(block(channels, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 64))
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                      nn.Linear(128, n_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    return SmallCNN


def small_cnn(n_classes: int = 10, channels: int = 1):
    """A fresh :class:`SmallCNN` (torch imported lazily)."""
    return _torch_cnn()(n_classes, channels)


def cnn_input(images_u8: np.ndarray):
    """uint8 (N, H, W) grey -> float tensor (N, 1, 28, 28) in [-1, 1]."""
    import torch
    from torch import nn

    images_u8 = np.asarray(images_u8)
    if images_u8.ndim == 4:  # RGB -> grey (ITU-R 601 luma)
        images_u8 = (images_u8[..., :3] @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).float().div(127.5).sub(1.0).unsqueeze(1)
    if x.shape[-1] != CNN_SIDE or x.shape[-2] != CNN_SIDE:
        x = nn.functional.interpolate(x, size=(CNN_SIDE, CNN_SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x


def train_cnn(images: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int = 3, seed: int = 0):
    """Train :class:`SmallCNN` on uint8 grey images; returns the model in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = small_cnn(n_classes)
    x, y = cnn_input(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    steps = epochs * ((len(y) + CNN_BATCH - 1) // CNN_BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=CNN_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=CNN_MAX_LR, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), CNN_BATCH):
            idx = perm[i : i + CNN_BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        logger.info("judge CNN epoch %d/%d (%.0f s)", epoch + 1, epochs, time.perf_counter() - t0)
    return model.eval()


def cnn_predict(model: Any, images_u8: np.ndarray) -> np.ndarray:
    import torch

    if len(images_u8) == 0:
        return np.zeros(0, np.int64)
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(cnn_input(images_u8[i : i + PREDICT_BATCH])).argmax(1).numpy()
                               for i in range(0, len(images_u8), PREDICT_BATCH)]).astype(np.int64)


@dataclass
class Judge:
    """A trained judge: ``predict(images)`` -> class indices of ``class_names``.

    ``confusion[i, j]`` counts real test images of class ``i`` that the judge labels ``j``.
    """

    kind: str
    class_names: list[str]
    confusion: np.ndarray
    model: Any = None  # SmallCNN (cnn)
    probe: Any = None  # (weights (C, D), bias (C,)) (probe)
    extractor: Any = None  # backbone feature extractor (probe)

    @property
    def test_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    def predict(self, images_u8: np.ndarray) -> np.ndarray:
        images_u8 = np.asarray(images_u8)
        if len(images_u8) == 0:
            return np.zeros(0, np.int64)
        if self.kind == "cnn":
            return cnn_predict(self.model, images_u8)
        from kka_ray.knowledge.features import FeatureNormalizer

        z = FeatureNormalizer.l2_normalize(self.extractor(images_u8))
        w, b = self.probe
        return np.argmax(z @ w.T + b, axis=1).astype(np.int64)

    def false_normal_rate(self, normal: list[int]) -> float:
        """Share of real test images of the *other* classes that the judge calls normal."""
        others = [c for c in range(len(self.class_names)) if c not in normal]
        total = self.confusion[others].sum()
        return float(self.confusion[np.ix_(others, normal)].sum() / total) if total else float("nan")

    def recall(self, normal: list[int]) -> float:
        """Share of real normal test images that the judge calls normal."""
        total = self.confusion[normal].sum()
        return float(self.confusion[np.ix_(normal, normal)].sum() / total) if total else float("nan")


def resolve_kind(kind: str, train_images: Any) -> str:
    if kind != "auto":
        return kind
    images = train_images.images if hasattr(train_images, "images") else None
    return "cnn" if images is not None and images.ndim == 3 else "probe"


def _confusion(pred: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (np.asarray(truth, np.int64), np.asarray(pred, np.int64)), 1)
    return m


def _sample_per_class(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def _decoded(source: Any, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels) of ``source`` at ``idx`` (an ImageSet or a lazily decoded catalog)."""
    if hasattr(source, "load"):
        images, kept = source.load(idx)
        return images.images, images.labels
    return source.images[idx], source.labels[idx]


def judge_cache_key(cfg: "KKAConfig", kind: str) -> str:
    """Which cached judge answers for this config: dataset, its path, the judge's settings
    (and for a probe, the backbone)."""
    from kka_ray.data.protocols import dataset_key

    a = cfg.audit
    parts = {"dataset": dataset_key(cfg.data), "path": str(cfg.data.path), "kind": kind, "epochs": a.judge_epochs,
             "per_class": a.judge_per_class, "seed": a.judge_seed, "format": JUDGE_FORMAT}
    if kind == "probe":
        parts.update(backbone=cfg.knowledge.backbone, image_size=cfg.knowledge.image_size)
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{parts['dataset']}-{kind}-{digest}"


def _load_cached_judge(kind: str, weights: Path, meta_path: Path, extractor: Any) -> Judge:
    meta = json.loads(meta_path.read_text())
    names = list(meta["class_names"])
    judge = Judge(kind, names, np.asarray(meta["confusion"], np.int64), extractor=extractor)
    if kind == "cnn":
        from safetensors.torch import load_file

        judge.model = small_cnn(len(names))
        judge.model.load_state_dict(load_file(str(weights)))
        judge.model.eval()
    else:
        from safetensors.numpy import load_file as load_np

        state = load_np(str(weights))
        judge.probe = (state["weight"], state["bias"])
    return judge


def _fit_probe(z: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A logistic-regression probe on L2-normalised backbone features: (weight, bias) per class."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER).fit(z, y)
    w = np.zeros((n_classes, z.shape[1]), np.float32)
    b = np.full(n_classes, -1e9, np.float32)  # classes absent from training are never predicted
    w[clf.classes_] = clf.coef_.astype(np.float32) if len(clf.classes_) > 2 else np.vstack([-clf.coef_, clf.coef_])
    b[clf.classes_] = clf.intercept_.astype(np.float32) if len(clf.classes_) > 2 else np.array([-clf.intercept_[0], clf.intercept_[0]])
    return w, b


def _save_judge(judge: Judge, weights: Path, meta_path: Path, meta: dict[str, Any]) -> None:
    """Weights (safetensors) then metadata, each written whole."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    if judge.kind == "cnn":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in judge.model.state_dict().items()}, str(tmp))
    else:
        from safetensors.numpy import save_file as save_np

        save_np({"weight": judge.probe[0], "bias": judge.probe[1]}, str(tmp))
    tmp.replace(weights)
    meta_tmp = meta_path.with_suffix(".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    meta_tmp.replace(meta_path)


def load_or_train_judge(cfg: "KKAConfig") -> Judge:
    """The run's judge from ``<model cache>/judges/`` or, the first time, trained and cached there."""
    from kka_ray.data.protocols import dataset_key, load_dataset_sets

    a = cfg.audit
    kind = a.judge if a.judge != "auto" else AUTO_KIND.get(dataset_key(cfg.data))
    train = test = None
    if kind is None:  # a folder dataset: grey or RGB decides
        train, test = load_dataset_sets(cfg.data, seed=cfg.run.seed)
        kind = resolve_kind(a.judge, train)
    root = cfg.paths.cache_dir() / "judges"
    key = judge_cache_key(cfg, kind)
    weights, meta_path = root / f"{key}.safetensors", root / f"{key}.json"
    extractor = None
    if kind == "probe":
        from kka_ray.knowledge.features import extractor_for

        extractor = extractor_for(cfg)
    if weights.is_file() and meta_path.is_file():
        return _load_cached_judge(kind, weights, meta_path, extractor)

    if train is None:
        train, test = load_dataset_sets(cfg.data, seed=cfg.run.seed)
    names = list(train.class_names)
    t0 = time.perf_counter()
    per_class = a.judge_per_class if a.judge_per_class is not None or kind == "cnn" else PROBE_DEFAULT_PER_CLASS
    idx = _sample_per_class(train.labels, per_class, a.judge_seed)
    x_train, y_train = _decoded(train, idx)
    logger.info("training the audit judge (%s) on %d real training images of %d classes", kind, len(y_train), len(names))
    judge = Judge(kind, names, np.zeros((len(names), len(names)), np.int64), extractor=extractor)
    if kind == "cnn":
        judge.model = train_cnn(x_train, y_train, len(names), a.judge_epochs, a.judge_seed)
    elif kind == "probe":
        from kka_ray.knowledge.features import FeatureNormalizer

        judge.probe = _fit_probe(FeatureNormalizer.l2_normalize(extractor(x_train)), y_train, len(names))
    else:
        raise ValueError(f"audit.judge {kind!r} is not one of auto, cnn, probe")
    test_idx = _sample_per_class(test.labels, per_class, a.judge_seed + 1)
    x_test, y_test = _decoded(test, test_idx)
    judge.confusion = _confusion(judge.predict(x_test), y_test, len(names))
    meta = {"kind": kind, "class_names": names, "confusion": judge.confusion.tolist(), "test_accuracy": judge.test_accuracy,
            "n_train": int(len(y_train)), "n_test": int(len(y_test)), "seconds": round(time.perf_counter() - t0, 1)}
    _save_judge(judge, weights, meta_path, meta)
    logger.info("audit judge %s: test accuracy %.4f (%.0f s), cached at %s", key, judge.test_accuracy,
                meta["seconds"], weights)
    return judge
