"""UCM-Caption (Qu et al. 2016): UC Merced land-use aerial images with 5 captions each.

The KKA paper (arXiv 2502.14880) makes two land-use classes normal and the other 19
anomalous. Read from the user's folder: ``dataset_ucm_modified.json`` (Karpathy style:
``images[].filename``, ``images[].sentences[].raw``, ``images[].split``) and the images
``n.tif`` (n = 1..2100) in ``images/``, ``imgs/`` or the folder itself. Image ``n`` belongs to
class ``sorted(CLASS_NAMES)[(n - 1) // 100]``. The training pool is the Karpathy ``train`` +
``val`` images (the one-class protocol carves its own held-out normals from it); ``test`` is
the test split.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np

from kka_ray.data.folder import ImageCatalog

logger = logging.getLogger(__name__)

# The 21 UC Merced land-use classes, sorted: the order that numbers the UCM-Caption images.
CLASS_NAMES = sorted([
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
])  # fmt: skip
IMAGES_PER_CLASS = 100
JSON_NAME = "dataset_ucm_modified.json"
IMAGE_DIRS = ("images", "imgs", "Images", "UCM_captions/imgs", ".")
DOMAIN = "aerial images of land use"
FIX_HINT = (
    "get UCM-Caption (Qu et al. 2016: dataset_ucm_modified.json and the imgs/ folder of n.tif files) "
    "and set data.path to the folder holding both"
)
_FILENAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)


def find_ucm_json(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    for c in (root if root.is_file() else root / JSON_NAME, root / "UCM_captions" / JSON_NAME):
        if c.is_file():
            return c
    raise FileNotFoundError(f"{JSON_NAME} not found in {root} (or {root / 'UCM_captions'}). Fix: {FIX_HINT}.")


def read_ucm_captions(json_path: str | os.PathLike) -> tuple[list[dict], int]:
    """Parse the captions JSON: records ``{filename, number, label, captions, split}`` and a malformed count."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_path}: not a readable JSON file ({err}). Fix: {FIX_HINT}.") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected an object with an 'images' list (Karpathy format)")
    records, n_bad = [], 0
    n_total = IMAGES_PER_CLASS * len(CLASS_NAMES)
    for item in data["images"]:
        m = _FILENAME.match(str(item.get("filename", ""))) if isinstance(item, dict) else None
        if m is None or not (1 <= int(m.group(1)) <= n_total):
            n_bad += 1
            continue
        number = int(m.group(1))
        sentences = item.get("sentences") or []
        captions = [" ".join(str(s.get("raw", "")).split()) for s in sentences if isinstance(s, dict)]
        records.append({
            "filename": item["filename"], "number": number,
            "label": (number - 1) // IMAGES_PER_CLASS,
            "captions": [c for c in captions if c], "split": item.get("split", "train"),
        })  # fmt: skip
    if n_bad:
        logger.warning("%s: skipped %d entries without a valid 'filename' (n.tif, 1..%d)", json_path, n_bad, n_total)
    return records, n_bad


def _find_image_dir(root: Path, records: list[dict]) -> Path:
    probe = [r["filename"] for r in records[:20]]
    candidates = [root / d for d in IMAGE_DIRS]
    for c in candidates:
        if any((c / f).is_file() for f in probe):
            return c
    raise FileNotFoundError(
        f"UCM-Caption images ({', '.join(probe[:3])}, ...) not found; looked in {', '.join(str(c) for c in candidates)}. "
        f"Fix: {FIX_HINT}."
    )


def read_ucm_caption(
    root: str | os.PathLike, split: Literal["train", "test"] = "train", image_size: int | None = 128
) -> ImageCatalog:
    """Index the UCM-Caption ``split`` (not decoded): ``train`` = Karpathy train + val, ``test`` = test."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    json_path = find_ucm_json(root)
    records, n_bad = read_ucm_captions(json_path)
    image_dir = _find_image_dir(json_path.parent if root.is_file() else root, records)
    wanted = {"train", "val"} if split == "train" else {"test"}
    chosen = sorted((r for r in records if r["split"] in wanted), key=lambda r: r["number"])
    present = [r for r in chosen if (image_dir / r["filename"]).is_file()]
    n_missing = len(chosen) - len(present)
    if n_missing:
        logger.warning("UCM-Caption %s: %d of %d images missing from %s", split, n_missing, len(chosen), image_dir)
    return ImageCatalog(
        paths=[image_dir / r["filename"] for r in present],
        labels=np.array([r["label"] for r in present], dtype=np.int64),
        class_names=list(CLASS_NAMES),
        captions=[r["captions"] for r in present],
        image_size=image_size,
        skipped={"malformed": n_bad, "missing": n_missing},
    )
