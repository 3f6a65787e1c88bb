"""Fashion-MNIST loader (Xiao et al. 2017): the idx / idx.gz files into an :class:`ImageSet`.

Search order: the configured path, the Debian package's directory
(``apt-get install dataset-fashion-mnist`` puts the files in /usr/share/datasets/fashion-mnist),
a previous download in the cache (``$KKA_CACHE`` or ~/.cache/kka_ray, under datasets/), and
last, when ``download=True``, the canonical Zalando S3 URL (short timeout). The idx magic
numbers and sizes are checked, so a truncated or foreign file gives an error naming it.
Fashion-MNIST has no captions: the one-class protocol fills template captions (Eq. 2 input).
"""

from __future__ import annotations

import logging
import os
import urllib.request
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from kka_ray.data.imagesets import ImageSet

logger = logging.getLogger(__name__)

CLASS_NAMES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
# Synonyms per class (the loader's class names, in label order): the drawer learns them all
# (generation/train_drawer.py) and the normal-likeness guard treats them as naming the class.
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "t-shirt/top": ("t-shirt", "t-shirt/top", "top", "tee", "tee shirt", "short-sleeved top", "tank top"),
    "trouser": ("trouser", "pair of trousers", "pair of pants", "pair of jeans", "pair of slacks", "pair of leggings"),
    "pullover": ("pullover", "sweater", "jumper", "sweatshirt", "knit sweater", "cardigan"),
    "dress": ("dress", "summer dress", "gown", "sundress", "frock", "party dress"),
    "coat": ("coat", "jacket", "overcoat", "winter coat", "parka", "anorak"),
    "sandal": ("sandal", "pair of sandals", "flip-flop", "strappy sandal", "open shoe", "heeled sandal"),
    "shirt": ("shirt", "button-up shirt", "blouse", "collared shirt", "dress shirt", "flannel shirt"),
    "sneaker": ("sneaker", "pair of sneakers", "running shoe", "trainer", "sports shoe", "shoe"),
    "bag": ("bag", "handbag", "purse", "tote bag", "shoulder bag", "clutch"),
    "ankle boot": ("ankle boot", "boot", "pair of boots", "leather boot", "winter boot", "heeled boot"),
}
# Where the Debian package `dataset-fashion-mnist` installs the four idx.gz files.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
# The canonical location from github.com/zalandoresearch/fashion-mnist (README "Get the Data").
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Short: a machine without network should fail over to the error message, not hang.
DOWNLOAD_TIMEOUT_S = 10.0
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 60000, "test": 10000}
_MAGIC_IMAGES, _MAGIC_LABELS = 2051, 2049  # idx: 0x0000 0803 (uint8, 3 dims) / 0x0000 0801 (uint8, 1 dim)
FIX_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
    "or download the four *-ubyte.gz files from " + DOWNLOAD_URL + " and set data.path=<that folder>"
)


def default_cache_dir() -> Path:
    """Where downloads go: ``$KKA_CACHE/datasets/fashion-mnist`` or ~/.cache/kka_ray/datasets/fashion-mnist."""
    root = os.environ.get("KKA_CACHE") or "~/.cache/kka_ray"
    return Path(root).expanduser() / "datasets" / "fashion-mnist"


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = directory / name
        if p.is_file():
            return p
    return None


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            # One zlib call (gzip framing via wbits) is faster than gzip.decompress and releases the GIL.
            return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip file ({err}); delete it and fetch it again ({FIX_HINT})") from None
    return raw


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read one idx file (optionally gzipped) of unsigned bytes; checks magic number and size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be an idx file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: idx magic number is {magic:#010x}, expected {expected_magic:#010x} "
            f"({'images' if expected_magic == _MAGIC_IMAGES else 'labels'} file); the file is corrupt or not this file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: idx header says {dims} ({expected} bytes) but the file holds {len(data)} bytes (truncated?)")
    # frombuffer on bytes is read-only and zero-copy; one copy makes it a normal writable array.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_from(directory: Path, split: str) -> ImageSet | None:
    img_stem, lbl_stem = FILES[split]
    img_path, lbl_path = _find_file(directory, img_stem), _find_file(directory, lbl_stem)
    if img_path is None or lbl_path is None:
        return None
    images = read_idx(img_path, _MAGIC_IMAGES)
    labels = read_idx(lbl_path, _MAGIC_LABELS).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape} images but {lbl_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{lbl_path}: label {labels.max()} is outside Fashion-MNIST's 10 classes")
    if images.shape[0] != SIZES[split]:
        logger.warning("Fashion-MNIST %s split in %s has %d images (the full set has %d)", split, directory, images.shape[0], SIZES[split])
    logger.debug("loaded Fashion-MNIST %s from %s: %s", split, directory, images.shape)
    return ImageSet(images, labels, list(CLASS_NAMES))


def download_fashion_mnist(target: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch the four idx.gz files from the canonical URL into ``target`` (atomic per file)."""
    target.mkdir(parents=True, exist_ok=True)
    for stem in (s for pair in FILES.values() for s in pair):
        dest = target / (stem + ".gz")
        if dest.is_file():
            continue
        tmp = dest.with_suffix(".gz.part")
        logger.info("downloading %s%s.gz", DOWNLOAD_URL, stem)
        with urllib.request.urlopen(DOWNLOAD_URL + stem + ".gz", timeout=timeout) as resp:  # noqa: S310 (fixed https/http URL)
            tmp.write_bytes(resp.read())
        tmp.replace(dest)


def load_fashion_mnist(
    path: str | os.PathLike | None = None,
    split: Literal["train", "test"] = "train",
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ImageSet:
    """Load a Fashion-MNIST split as grey ``(N, 28, 28)`` uint8 images with the 10 class names.

    Looks in ``path`` (when given), the Debian package's directory, the download cache, and
    finally downloads into the cache when ``download`` is true. Raises FileNotFoundError that
    lists every place searched, and ValueError for a corrupt file.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    places: list[Path] = []
    if path is not None:
        p = Path(path).expanduser()
        places += [p, p / "fashion-mnist", p / "fashion_mnist"]
    places += [*SYSTEM_DIRS, cache]
    tried: list[str] = []
    for directory in places:
        if directory in (Path(t) for t in tried):
            continue
        tried.append(str(directory))
        if directory.is_dir():
            found = _load_from(directory, split)
            if found is not None:
                if path is not None and directory not in places[:3]:
                    logger.warning("Fashion-MNIST not found under data.path=%s; using %s", path, directory)
                return found
    if download:
        try:
            download_fashion_mnist(cache)
            found = _load_from(cache, split)
            if found is not None:
                return found
        except OSError as err:  # URLError, timeouts and disk errors are all OSErrors
            tried.append(f"{DOWNLOAD_URL} (download failed: {err})")
    else:
        tried.append(f"{DOWNLOAD_URL} (not tried: download disabled)")
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({', '.join(FILES[split])}, optionally .gz) not found. Looked in: "
        + "; ".join(tried)
        + f". Fix: {FIX_HINT}."
    )
