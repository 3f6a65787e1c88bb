"""One-class anomaly-detection splits and the KKA paper's dataset protocols (arXiv 2502.14880).

One or more classes are normal; the detector trains on their training images only (``D_n``,
with captions for Eq. 2). A fraction of those is held out, disjoint from training, for
thresholds and validation (Eq. 6's tau, checkpoint choice): the test split is never used for
either. The test set is every test image, targets 0 for normal classes and 1 for the rest.

Protocols (``data.preset``) from the paper, each from a user-supplied ``data.path``:
``cifar100_superclass`` (one of 20 superclasses normal: 5 fine classes), ``cifar100_fine``
(one of 100 fine classes), ``oxford102`` (one flower class, Reed et al. captions),
``ucm_caption`` (two land-use classes). Without a preset, ``data.dataset`` picks
Fashion-MNIST, CIFAR-10, CIFAR-100 (superclasses, as in the one-class literature) or a
user folder. Datasets without captions get template captions.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from kka_ray.data.captions import DEFAULT_TEMPLATES, fill_missing_captions, template_captions
from kka_ray.data.folder import ImageCatalog
from kka_ray.data.imagesets import ImageSet

if TYPE_CHECKING:
    from kka_ray.config import DataSection

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = {
    "fashion_mnist": "photos of fashion products: clothing, shoes and bags",
    "cifar10": "photos of animals and vehicles",
    "cifar100": "photos of everyday objects, animals, plants and scenes",
    "cifar100_superclass": "photos of everyday objects, animals, plants and scenes",
    "cifar100_fine": "photos of everyday objects, animals, plants and scenes",
    "oxford102": "photos of flowers",
    "ucm_caption": "aerial images of land use",
    "folder": "images",
}
DEFAULT_NORMAL_CLASSES: dict[str, list[int | str]] = {"ucm_caption": [0, 1]}  # the paper: two classes normal


@dataclass
class OneClassSplit:
    """A one-class protocol: normal training data, held-out normals, and a labelled test set.

    ``indices`` maps ``train``/``holdout`` to positions in the source training set and
    ``test`` to positions in the source test set (provenance; also what tests check).
    """

    train: ImageSet
    holdout: ImageSet
    test: ImageSet
    test_targets: np.ndarray  # int64, 0 normal, 1 anomaly, aligned with test
    normal_class_names: list[str]
    domain: str
    name: str
    indices: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> str:
        n_anom = int(self.test_targets.sum())
        return (f"{self.name}: {len(self.train)} normal train, {len(self.holdout)} held-out normals, "
                f"{len(self.test)} test ({len(self.test) - n_anom} normal, {n_anom} anomalous)")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def slug(name: str) -> str:
    """A class name as a path-safe token (``t-shirt/top`` -> ``t-shirt-top``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


def resolve_classes(classes: Sequence[int | str], class_names: Sequence[str]) -> list[int]:
    """Class indices for names or indices; names match exactly, then ignoring case and punctuation."""
    if isinstance(classes, (str, int)):
        classes = [classes]
    if not classes:
        raise ValueError("normal_classes is empty: name at least one class")
    exact = {n: i for i, n in enumerate(class_names)}
    loose: dict[str, int] = {}
    for i, n in enumerate(class_names):
        loose.setdefault(_norm(n), i)
    out: list[int] = []
    for c in classes:
        if isinstance(c, str) and c.strip().isdigit() and c not in exact:
            c = int(c)  # "3" from a command line means index 3 unless a class is literally named "3"
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= int(c) < len(class_names):
                raise ValueError(f"normal class index {c} is out of range: this dataset has {len(class_names)} classes (0..{len(class_names) - 1})")
            idx = int(c)
        elif isinstance(c, str) and (c in exact or _norm(c) in loose):
            idx = exact[c] if c in exact else loose[_norm(c)]
        else:
            raise ValueError(f"unknown class {c!r}; valid names: {', '.join(repr(n) for n in class_names)} (or an index 0..{len(class_names) - 1})")
        if idx not in out:
            out.append(idx)
    if len(out) == len(class_names):
        raise ValueError("every class is normal: leave at least one class out so the test set has anomalies")
    return out


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``n`` items drawn without replacement, classes in proportion (largest remainder)."""
    labels = np.asarray(labels)
    n = int(min(max(n, 0), labels.size))
    if n == labels.size:
        return np.arange(labels.size)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    remainder = n - int(take.sum())
    order = np.lexsort((rng.random(classes.size), -(quota - take)))  # largest fraction first, ties at random
    take[order[:remainder]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take) if k]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def plan_one_class_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    normal: Sequence[int],
    holdout_fraction: float,
    seed: int,
    max_normal_train: int | None = None,
    max_test: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Index plan ``(train_idx, holdout_idx, test_idx, test_targets)`` of a one-class split.

    ``max_normal_train`` caps the normal pool before the holdout is carved from it;
    ``max_test`` subsamples the test set by target, then by class, keeping both targets.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    rng = np.random.default_rng(seed)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    normal = np.asarray(list(normal), dtype=np.int64)
    names = ", ".join(repr(class_names[i]) if class_names else str(i) for i in normal)
    pool = np.flatnonzero(np.isin(train_labels, normal))
    if pool.size < 2:
        raise ValueError(f"normal class(es) {names} have {pool.size} training image(s); need at least 2 (train + holdout)")
    if max_normal_train is not None and pool.size > max_normal_train:
        pool = pool[stratified_sample(train_labels[pool], max_normal_train, rng)]
    n_hold = int(np.clip(round(holdout_fraction * pool.size), 1, pool.size - 1))
    holdout = pool[stratified_sample(train_labels[pool], n_hold, rng)]
    train = np.setdiff1d(pool, holdout)
    targets = (~np.isin(test_labels, normal)).astype(np.int64)
    n_norm, n_anom = int((targets == 0).sum()), int(targets.sum())
    if n_norm == 0 or n_anom == 0:
        raise ValueError(f"the test set has {n_norm} normal and {n_anom} anomalous images for normal class(es) {names}; both must be present")
    test = np.arange(test_labels.size)
    if max_test is not None and max_test < test.size:
        k_norm = int(np.clip(round(max_test * n_norm / test.size), 1, min(n_norm, max_test - 1)))
        k_anom = min(max_test - k_norm, n_anom)
        k_norm = min(max_test - k_anom, n_norm)
        norm_pos, anom_pos = np.flatnonzero(targets == 0), np.flatnonzero(targets == 1)
        test = np.sort(np.concatenate([
            norm_pos[stratified_sample(test_labels[norm_pos], k_norm, rng)],
            anom_pos[stratified_sample(test_labels[anom_pos], k_anom, rng)],
        ]))  # fmt: skip
    return np.sort(train), np.sort(holdout), test, targets[test]


def _take(source: ImageSet | ImageCatalog, idx: np.ndarray) -> tuple[ImageSet, np.ndarray]:
    if isinstance(source, ImageCatalog):
        return source.load(idx)
    return source.subset(idx), np.arange(idx.size)


def make_one_class_split(
    train: ImageSet | ImageCatalog,
    test: ImageSet | ImageCatalog,
    normal_classes: Sequence[int | str],
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_normal_train: int | None = None,
    max_test: int | None = None,
    *,
    caption_templates: Sequence[str] = DEFAULT_TEMPLATES,
    domain: str = "images",
    dataset_name: str = "dataset",
) -> OneClassSplit:
    """Build a one-class split: normal classes (indices or names) vs all other classes.

    ``train``/``test`` may be decoded ImageSets or ImageCatalogs (then only the chosen images
    are decoded; unreadable ones are dropped and counted). Normal training and held-out images
    get template captions where they have none.
    """
    if list(train.class_names) != list(test.class_names):
        raise ValueError("train and test sets have different class_names; load both splits of one dataset")
    class_names = list(train.class_names)
    normal = resolve_classes(normal_classes, class_names)
    train_idx, hold_idx, test_idx, targets = plan_one_class_split(
        train.labels, test.labels, normal, holdout_fraction, seed, max_normal_train, max_test, class_names
    )
    train_set, kept_tr = _take(train, train_idx)
    hold_set, kept_ho = _take(train, hold_idx)
    test_set, kept_te = _take(test, test_idx)
    if len(train_set) == 0 or len(hold_set) == 0:
        raise ValueError("no readable normal training or held-out images remain; check the image files")
    targets = targets[kept_te]
    if targets.size and (targets.min() == targets.max()):
        raise ValueError("after dropping unreadable images the test set has only one target class")
    train_set.captions = fill_missing_captions(train_set.captions, train_set.labels, class_names, caption_templates, seed)
    hold_set.captions = fill_missing_captions(hold_set.captions, hold_set.labels, class_names, caption_templates, seed + 1)
    normal_names = [class_names[i] for i in normal]
    split = OneClassSplit(
        train=train_set, holdout=hold_set, test=test_set, test_targets=targets.astype(np.int64),
        normal_class_names=normal_names, domain=domain,
        name=f"{dataset_name}/{'+'.join(slug(n) for n in normal_names)}",
        indices={"train": train_idx[kept_tr], "holdout": hold_idx[kept_ho], "test": test_idx[kept_te]},
    )  # fmt: skip
    logger.info("%s", split.summary())
    return split


# ---------------------------------------------------------------------------------------
# config -> split


def _need_path(cfg: "DataSection", what: str) -> str:
    if not cfg.path:
        raise ValueError(f"data.path must point at the {what} folder (the engine downloads nothing but Fashion-MNIST)")
    return cfg.path


def _cifar100_sets(path: str, label: str, templates: Sequence[str], seed: int) -> tuple[ImageSet, ImageSet]:
    """CIFAR-100 train/test labelled by ``label``; training captions always name the fine class."""
    from kka_ray.data.cifar import read_cifar100

    sets = []
    for split in ("train", "test"):
        images, fine, coarse, fine_names, coarse_names = read_cifar100(path, split)
        labels, names = (fine, fine_names) if label == "fine" else (coarse, coarse_names)
        captions = template_captions(fine, fine_names, templates, seed) if split == "train" else None
        sets.append(ImageSet(images, labels, names, captions))
    return sets[0], sets[1]


def _folder_sets(cfg: "DataSection", seed: int) -> tuple[ImageCatalog, ImageCatalog]:
    """Train/test of a user folder: its "split" fields ("test" vs the rest), else a stratified random split."""
    from kka_ray.data.folder import read_image_folder

    root = _need_path(cfg, "image")
    catalog = read_image_folder(root, cfg.captions_file, cfg.image_size)
    splits = catalog.splits or [None] * len(catalog)
    if "test" in splits:
        is_test = np.array([s == "test" for s in splits])
        return catalog.subset(np.flatnonzero(~is_test)), catalog.subset(np.flatnonzero(is_test))
    rng = np.random.default_rng(seed)
    test_idx = stratified_sample(catalog.labels, max(1, round(cfg.test_fraction * len(catalog))), rng)
    train_idx = np.setdiff1d(np.arange(len(catalog)), test_idx)
    logger.info("%s has no 'split' fields: %d images held out as test (data.test_fraction=%s)", root, test_idx.size, cfg.test_fraction)
    return catalog.subset(train_idx), catalog.subset(test_idx)


def dataset_key(cfg: "DataSection") -> str:
    """The dataset a ``data`` section names: ``data.preset`` when set, else ``data.dataset``."""
    return cfg.preset or cfg.dataset


def load_dataset_sets(cfg: "DataSection", seed: int) -> "tuple[ImageSet | ImageCatalog, ImageSet | ImageCatalog]":
    """The whole labelled train and test sets of the dataset the ``data`` section names
    (every class; ImageCatalogs decode lazily)."""
    key = dataset_key(cfg)
    templates = list(cfg.caption_templates)
    train: ImageSet | ImageCatalog
    test: ImageSet | ImageCatalog
    if key == "fashion_mnist":
        from kka_ray.data.fashion_mnist import load_fashion_mnist

        # Both splits at once: the time is gzip inflation, which releases the GIL.
        with ThreadPoolExecutor(max_workers=2) as pool:
            train, test = pool.map(lambda s: load_fashion_mnist(cfg.path, s, download=cfg.download), ("train", "test"))
    elif key == "cifar10":
        from kka_ray.data.cifar import load_cifar

        path = _need_path(cfg, "CIFAR-10 (cifar-10-batches-py)")
        train, test = load_cifar(path, 10, "train"), load_cifar(path, 10, "test")
    elif key in ("cifar100", "cifar100_superclass", "cifar100_fine"):
        path = _need_path(cfg, "CIFAR-100 (cifar-100-python)")
        train, test = _cifar100_sets(path, "fine" if key == "cifar100_fine" else "coarse", templates, seed)
    elif key == "oxford102":
        from kka_ray.data.oxford102 import read_oxford102

        path = _need_path(cfg, "Oxford-102 flowers")
        train, test = read_oxford102(path, "train", cfg.image_size), read_oxford102(path, "test", cfg.image_size)
    elif key == "ucm_caption":
        from kka_ray.data.ucm_caption import read_ucm_caption

        path = _need_path(cfg, "UCM-Caption")
        train, test = read_ucm_caption(path, "train", cfg.image_size), read_ucm_caption(path, "test", cfg.image_size)
    elif key == "folder":
        train, test = _folder_sets(cfg, seed)
    else:
        raise ValueError(f"unknown dataset {key!r}; choose data.dataset in {sorted(DEFAULT_DOMAINS)} or a data.preset")
    return train, test


def build_split(cfg: "DataSection", seed: int) -> OneClassSplit:
    """The one-class split the engine runs on, from the ``data`` config section.

    ``data.preset`` (when set) decides the dataset; otherwise ``data.dataset`` does.
    """
    key = dataset_key(cfg)
    train, test = load_dataset_sets(cfg, seed)
    normal = cfg.normal_classes if cfg.normal_classes is not None else DEFAULT_NORMAL_CLASSES.get(key, [0])
    return make_one_class_split(
        train, test, normal, cfg.holdout_fraction, seed, cfg.max_normal_train, cfg.max_test,
        caption_templates=list(cfg.caption_templates), domain=cfg.domain or DEFAULT_DOMAINS[key], dataset_name=key,
    )  # fmt: skip
