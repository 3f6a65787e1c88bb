"""Oxford-102 Flowers (Nilsback & Zisserman 2008) with the Reed et al. (2016) captions.

The KKA paper (arXiv 2502.14880) uses it with one flower class normal and the other 101
anomalous, the 10 captions per image serving as the descriptions of Eq. 2. Layout read
from the user's folder::

    jpg/image_00001.jpg ...          the 8,189 images
    imagelabels.mat                  'labels': class 1..102 per image
    setid.mat                        'trnid', 'valid', 'tstid': 1-based image ids
    text_c10/class_00001/image_00001.txt   10 captions, one per line (Reed et al.)

``text_c10`` may also sit in ``cvpr2016_flowers/`` (the archive's own folder). The
training pool is ``trnid`` + ``valid`` (the one-class protocol carves its own held-out
normals from it: 20 images per class); ``tstid`` is the test split. The paper reports 51
training images for its class but does not publish its split, so the official one is used. Images without a caption file are counted
and later get template captions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np

from kka_ray.data.folder import ImageCatalog

logger = logging.getLogger(__name__)

# Class names in label order 1..102 (the list that accompanies the dataset in common use).
CLASS_NAMES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
]  # fmt: skip
DOMAIN = "photos of flowers"
FIX_HINT = (
    "download 102flowers.tgz, imagelabels.mat and setid.mat from "
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ and the Reed et al. captions (cvpr2016_flowers, "
    "text_c10/) into one folder, and set data.path to it"
)


def _loadmat_vector(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as err:  # noqa: BLE001 (scipy raises several types for bad files)
        raise ValueError(f"{path}: not a readable .mat file ({err}). Fix: {FIX_HINT}.") from None
    if key not in mat:
        raise ValueError(f"{path}: no {key!r} variable (has {sorted(k for k in mat if not k.startswith('__'))})")
    return np.asarray(mat[key]).reshape(-1).astype(np.int64)


def _find_text_dir(root: Path) -> Path | None:
    for c in (root / "text_c10", root / "cvpr2016_flowers" / "text_c10"):
        if c.is_dir():
            return c
    return None


def read_oxford102(
    root: str | os.PathLike, split: Literal["train", "test"] = "train", image_size: int | None = 128
) -> ImageCatalog:
    """Index the Oxford-102 ``split`` (not decoded); captions from ``text_c10`` when present."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    needed = [root / "imagelabels.mat", root / "setid.mat", root / "jpg"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Oxford-102 layout incomplete under {root}: missing {', '.join(missing)}. Fix: {FIX_HINT}.")
    labels = _loadmat_vector(root / "imagelabels.mat", "labels")
    if labels.size == 0 or labels.min() < 1 or labels.max() > len(CLASS_NAMES):
        raise ValueError(f"{root / 'imagelabels.mat'}: labels must be 1..{len(CLASS_NAMES)}")
    keys = ("trnid", "valid") if split == "train" else ("tstid",)
    ids = np.concatenate([_loadmat_vector(root / "setid.mat", k) for k in keys])
    bad = (ids < 1) | (ids > labels.size)
    if bad.any():
        raise ValueError(f"{root / 'setid.mat'}: {int(bad.sum())} image ids outside 1..{labels.size} (imagelabels.mat)")
    text_dir = _find_text_dir(root)
    if text_dir is None:
        logger.warning("Oxford-102: no text_c10 captions under %s; images get template captions", root)
    paths, kept_labels, captions = [], [], []
    n_missing = n_no_caption = 0
    for image_id in np.sort(ids).tolist():
        path = root / "jpg" / f"image_{image_id:05d}.jpg"
        if not path.is_file():
            n_missing += 1
            continue
        label = int(labels[image_id - 1]) - 1
        lines: list[str] = []
        if text_dir is not None:
            txt = text_dir / f"class_{label + 1:05d}" / f"image_{image_id:05d}.txt"
            try:
                lines = [ln.strip() for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            except OSError:
                lines = []
            n_no_caption += not lines
        paths.append(path)
        kept_labels.append(label)
        captions.append(lines)
    if n_missing or (text_dir is not None and n_no_caption):
        logger.warning("Oxford-102 %s: %d listed image(s) missing from jpg/, %d image(s) without a caption file",
                       split, n_missing, n_no_caption)
    return ImageCatalog(
        paths=paths,
        labels=np.array(kept_labels, dtype=np.int64),
        class_names=list(CLASS_NAMES),
        captions=captions if any(captions) else None,
        image_size=image_size,
        skipped={"missing": n_missing, "no_caption": n_no_caption},
    )
