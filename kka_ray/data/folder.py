"""A user's own normal images: an image folder plus a captions JSONL, decoded to an ImageSet.

``captions.jsonl`` holds one JSON object per line::

    {"file": "rel/path.png", "label": "name", "captions": ["...", ...], "split": "train"}

``captions`` (the descriptions ``t`` that KKA's Eq. 2 collects) and ``split`` are optional.
Malformed lines, missing files and unreadable images are skipped and counted, and one
warning gives the counts. Without a captions file, the class-subfolder layout
(``root/<class>/<image>``) is read instead, with no captions.

:class:`ImageCatalog` (paths + labels + captions, not yet decoded) is shared with the
Oxford-102 and UCM-Caption loaders, so a protocol decodes only the images it uses.
Images become RGB at one common size: with ``image_size`` an int, the shorter side is resized
to it and the centre cropped square; with ``None``, every image is resized to the first
readable image's size.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kka_ray.data.imagesets import ImageSet

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Decoding is PIL (releases the GIL); a few threads hide file I/O without oversubscribing.
DECODE_THREADS = min(4, os.cpu_count() or 1)


def decode_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read one image as RGB uint8 ``(H, W, 3)``.

    ``size`` int: resize the shorter side to ``size`` and centre-crop a square.
    ``size`` (W, H): resize to exactly that. ``None``: native size.
    """
    from PIL import Image

    with Image.open(path) as img:
        if isinstance(size, int) and img.format == "JPEG":
            img.draft("RGB", (size, size))  # JPEG DCT scaling: decode at >= size, several times faster
        img = img.convert("RGB")
        if isinstance(size, int):
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        elif size is not None and tuple(size) != img.size:
            img = img.resize(tuple(size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


@dataclass
class ImageCatalog:
    """Image files with labels and captions, decoded on demand by :meth:`load`."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    captions: list[list[str]] | None = None
    image_size: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, filled while reading
    splits: list[str | None] | None = None  # the JSONL's optional "split" per image

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"ImageCatalog: {len(self.paths)} paths but {len(self.labels)} labels")
        if self.captions is not None and len(self.captions) != len(self.paths):
            raise ValueError(f"ImageCatalog: {len(self.captions)} caption lists for {len(self.paths)} paths")
        if self.splits is not None and len(self.splits) != len(self.paths):
            raise ValueError(f"ImageCatalog: {len(self.splits)} split names for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, idx: np.ndarray | list[int] | None = None) -> tuple[ImageSet, np.ndarray]:
        """Decode the images at ``idx`` (all by default).

        Returns the ImageSet and the positions within ``idx`` that decoded; unreadable images
        are skipped, counted in ``skipped['unreadable']`` and reported in one warning.
        """
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        size: int | tuple[int, int] | None = self.image_size
        arrays: list[np.ndarray | None] = [None] * len(idx)
        errors: list[str] = []
        start = 0
        if size is None:  # the first readable image fixes the common size
            while start < len(idx) and size is None:
                try:
                    arrays[start] = decode_image(self.paths[idx[start]])
                    size = (arrays[start].shape[1], arrays[start].shape[0])
                except Exception as err:  # noqa: BLE001 (PIL raises many types for bad files)
                    errors.append(f"{self.paths[idx[start]]}: {err}")
                start += 1

        def _one(i: int) -> tuple[int, np.ndarray | None, str | None]:
            try:
                return i, decode_image(self.paths[idx[i]], size), None
            except Exception as err:  # noqa: BLE001
                return i, None, f"{self.paths[idx[i]]}: {err}"

        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
            for i, arr, err in pool.map(_one, range(start, len(idx))):
                arrays[i] = arr
                if err:
                    errors.append(err)
        kept = np.array([i for i, a in enumerate(arrays) if a is not None], dtype=np.int64)
        if errors:
            self.skipped["unreadable"] = self.skipped.get("unreadable", 0) + len(errors)
            logger.warning("skipped %d unreadable image(s) of %d (first: %s)", len(errors), len(idx), errors[0])
        if size is None or kept.size == 0:
            side = self.image_size or 1
            images = np.zeros((0, side, side, 3), dtype=np.uint8)
        else:
            images = np.stack([arrays[i] for i in kept])
        chosen = idx[kept]
        captions = None if self.captions is None else [list(self.captions[i]) for i in chosen]
        return ImageSet(images, self.labels[chosen], list(self.class_names), captions), kept

    def subset(self, idx: np.ndarray | list[int]) -> "ImageCatalog":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        captions = None if self.captions is None else [self.captions[i] for i in idx]
        splits = None if self.splits is None else [self.splits[i] for i in idx]
        return ImageCatalog([self.paths[i] for i in idx], self.labels[idx], list(self.class_names), captions,
                            self.image_size, dict(self.skipped), splits)


def _parse_record(line: str, root: Path) -> tuple[dict | None, str | None]:
    """One JSONL line -> (record, None) or (None, why it is malformed)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg})"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    file, label = obj.get("file"), obj.get("label")
    if not isinstance(file, str) or not file:
        return None, "no 'file' string"
    rel = os.path.normpath(file)
    if os.path.isabs(rel) or rel.startswith(".."):
        return None, f"'file' {file!r} is not a path inside the image folder"
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        return None, "no 'label' string"
    captions = obj.get("captions", [])
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None, "'captions' is not a list of strings"
    split = obj.get("split")
    if split is not None and not isinstance(split, str):
        return None, "'split' is not a string"
    return {"path": root / rel, "label": label.strip(), "captions": [c.strip() for c in captions if c.strip()],
            "split": split}, None


def read_captions_jsonl(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[list[dict], list[str]]:
    """Parse a captions JSONL; returns the valid records and one message per malformed line."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    records, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec, why = _parse_record(line, root)
            if rec is None:
                bad.append(f"line {lineno}: {why}")
            else:
                records.append(rec)
    if bad:
        logger.debug("%s: malformed lines: %s", path, "; ".join(bad[:20]))
    return records, bad


def _subfolder_records(root: Path) -> list[dict]:
    records = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                records.append({"path": f, "label": cls.name, "captions": [], "split": None})
    return records


def read_image_folder(
    root: str | os.PathLike,
    captions_file: str = "captions.jsonl",
    image_size: int | None = None,
    split: str | None = None,
) -> ImageCatalog:
    """Index an image folder (no decoding). ``split`` keeps only records whose ``"split"`` equals it.

    Class names are the sorted labels of all well-formed records (every split), so the
    train and test catalogs of one folder share them.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.path to a folder holding {captions_file} and the images")
    cap_path = root / captions_file
    counts: dict[str, int] = {"malformed": 0, "missing": 0}
    first_bad = ""
    if cap_path.is_file():
        records, bad = read_captions_jsonl(cap_path, root)
        counts["malformed"], first_bad = len(bad), (bad[0] if bad else "")
    else:
        records = _subfolder_records(root)
        if not records:
            raise FileNotFoundError(
                f"{cap_path} not found and {root} has no class subfolders with images. Fix: write {captions_file} "
                '(one {"file": "rel/path.png", "label": "name", "captions": ["..."]} per line) or use root/<class>/<image> folders'
            )
        logger.info("no %s in %s: read %d images from class subfolders (no captions)", captions_file, root, len(records))
    class_names = sorted({r["label"] for r in records})
    if split is not None:
        records = [r for r in records if r["split"] == split]
    present = [r for r in records if r["path"].is_file()]
    counts["missing"] = len(records) - len(present)
    if counts["malformed"] or counts["missing"]:
        missing_eg = next((str(r["path"]) for r in records if not r["path"].is_file()), "")
        logger.warning(
            "%s: skipped %d malformed line(s)%s and %d missing image(s)%s; kept %d",
            cap_path if cap_path.is_file() else root, counts["malformed"], f" (first: {first_bad})" if first_bad else "",
            counts["missing"], f" (first: {missing_eg})" if missing_eg else "", len(present),
        )
    index = {n: i for i, n in enumerate(class_names)}
    captions = [r["captions"] for r in present]
    return ImageCatalog(
        paths=[r["path"] for r in present],
        labels=np.array([index[r["label"]] for r in present], dtype=np.int64),
        class_names=class_names,
        captions=captions if any(captions) else None,
        image_size=image_size,
        skipped=counts,
        splits=[r["split"] for r in present],
    )


def load_image_folder(
    root: str | os.PathLike,
    captions_file: str = "captions.jsonl",
    image_size: int | None = None,
    split: str | None = None,
) -> ImageSet:
    """Load an image folder + captions JSONL as an RGB ImageSet at one common size.

    Malformed lines, missing and unreadable images are skipped, counted and reported in a
    warning (see :func:`read_image_folder` for the counts as data).
    """
    catalog = read_image_folder(root, captions_file, image_size, split)
    images, _ = catalog.load()
    return images
