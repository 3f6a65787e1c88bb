"""Data layer: loaders on tiny fixtures written in the real file formats, the one-class
protocol's split membership, template captions, and the real data where this machine has it."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from kka_ray.config import DataSection
from kka_ray.data import (
    ImageSet,
    build_split,
    load_cifar,
    load_fashion_mnist,
    load_image_folder,
    make_one_class_split,
    read_image_folder,
    template_captions,
)
from kka_ray.data import fashion_mnist as fm
from kka_ray.data.protocols import stratified_sample

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _unique_images(n: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """n images whose first pixels encode their index, so each is distinct and identifiable."""
    rng = np.random.default_rng(offset)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    ids = np.arange(offset, offset + n)
    flat[:, 0], flat[:, 1] = ids % 256, ids // 256
    return x


# ---------------------------------------------------------------------------------------
# Fashion-MNIST (idx.gz)


def _write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture()
def fmnist_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fmnist"
    d.mkdir()
    for split, n, off in (("train", 60, 0), ("t10k", 40, 1000)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", _unique_images(n, (28, 28), off), 2051)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return d


def test_fashion_mnist_idx_gz_roundtrip(fmnist_dir: Path, tmp_path: Path) -> None:
    train = load_fashion_mnist(fmnist_dir, "train", download=False, cache_dir=tmp_path / "cache")
    test = load_fashion_mnist(fmnist_dir, "test", download=False, cache_dir=tmp_path / "cache")
    assert train.images.shape == (60, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (40, 28, 28)
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [i % 10 for i in range(60)]
    assert np.array_equal(train.images, _unique_images(60, (28, 28), 0))
    assert train.class_names[0] == "t-shirt/top" and train.class_names[9] == "ankle boot"
    assert train.captions is None


def test_fashion_mnist_bad_magic_and_truncation(fmnist_dir: Path, tmp_path: Path) -> None:
    # labels file written with the images' magic number
    _write_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", np.arange(60) % 10, 2051)
    with pytest.raises(ValueError, match="magic number"):
        load_fashion_mnist(fmnist_dir, "train", download=False, cache_dir=tmp_path / "c")
    raw = gzip.decompress((fmnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    (fmnist_dir / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(fmnist_dir, "test", download=False, cache_dir=tmp_path / "c")
    (fmnist_dir / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt gzip"):
        load_fashion_mnist(fmnist_dir, "test", download=False, cache_dir=tmp_path / "c")


def test_fashion_mnist_missing_names_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fm.SYSTEM_DIRS == (DEBIAN_FMNIST,)  # the Debian package's directory is searched
    fake_system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (fake_system,))
    given, cache = tmp_path / "my-data", tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(given, "train", download=False, cache_dir=cache)
    msg = str(info.value)
    for place in (given, fake_system, cache):
        assert str(place) in msg
    assert fm.DOWNLOAD_URL in msg and "apt-get install dataset-fashion-mnist" in msg and "data.path" in msg


# ---------------------------------------------------------------------------------------
# CIFAR (python pickles)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


@pytest.fixture()
def cifar10_dir(tmp_path: Path) -> Path:
    d = tmp_path / "c10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(d / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    for i, n in ((1, 30), (2, 25)):  # batches 3-5 missing, fewer images, no 'filenames'
        imgs = _unique_images(n, (32, 32, 3), 100 * i)
        _dump(d / f"data_batch_{i}", {"data": _cifar_rows(imgs), "labels": [(j + i) % 10 for j in range(n)], "batch_label": "x"})
    imgs = _unique_images(20, (32, 32, 3), 900)
    _dump(d / "test_batch", {"data": _cifar_rows(imgs), "labels": [j % 10 for j in range(20)]})
    return d.parent


@pytest.fixture()
def cifar100_dir(tmp_path: Path) -> Path:
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    fine_names = [f"fine_{i}" for i in range(100)]
    coarse_names = [f"coarse_{i}" for i in range(20)]
    _dump(d / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    for split, n, off in (("train", 200, 0), ("test", 100, 5000)):
        fine = np.arange(n) % 100
        _dump(d / split, {"data": _cifar_rows(_unique_images(n, (32, 32, 3), off)), "fine_labels": fine.tolist(),
                          "coarse_labels": (fine // 5).tolist(), "filenames": [f"{i}.png" for i in range(n)]})
    return d.parent


def test_cifar10_partial_layout(cifar10_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        train = load_cifar(cifar10_dir, 10, "train")
    assert "3 of 5 batch files missing" in caplog.text
    assert train.images.shape == (55, 32, 32, 3)
    assert np.array_equal(train.images[:30], _unique_images(30, (32, 32, 3), 100))  # HWC order restored
    assert train.labels[:3].tolist() == [1, 2, 3] and train.class_names[3] == "cat"
    test = load_cifar(cifar10_dir / "cifar-10-batches-py", 10, "test")  # the folder itself also works
    assert len(test) == 20
    with pytest.raises(ValueError, match="no coarse labels"):
        load_cifar(cifar10_dir, 10, "train", label="coarse")


def test_cifar100_fine_and_coarse(cifar100_dir: Path) -> None:
    fine = load_cifar(cifar100_dir, 100, "train", "fine")
    coarse = load_cifar(cifar100_dir, 100, "train", "coarse")
    assert len(fine.class_names) == 100 and len(coarse.class_names) == 20
    assert np.array_equal(coarse.labels, fine.labels // 5)
    assert np.array_equal(fine.images, coarse.images)


def test_cifar_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would call print("pwned") on a plain pickle.load
            return (print, ("pwned",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _dump(d / "test_batch", {"data": Evil(), "labels": []})
    with pytest.raises(ValueError, match=r"refusing to load global [\w.]*print"):  # Ray, once started, wraps print
        load_cifar(tmp_path, 10, "test")


def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(tmp_path, 100, "train")


# ---------------------------------------------------------------------------------------
# One-class protocol


def _toy_sets() -> tuple[ImageSet, ImageSet]:
    names = ["cat", "dog", "fox_cub", "owl"]
    train = ImageSet(_unique_images(200, (8, 8), 0), np.arange(200) % 4, names)
    test = ImageSet(_unique_images(80, (8, 8), 1000), np.arange(80) % 4, names)
    return train, test


def test_one_class_split_membership() -> None:
    train, test = _toy_sets()
    split = make_one_class_split(train, test, ["dog", 2], holdout_fraction=0.2, seed=3, dataset_name="toy")
    assert split.name == "toy/dog+fox-cub" and split.normal_class_names == ["dog", "fox_cub"]
    assert len(split.train) + len(split.holdout) == 100 and len(split.holdout) == 20
    assert set(split.train.labels.tolist()) == {1, 2} and set(split.holdout.labels.tolist()) == {1, 2}
    assert split.holdout.class_counts() == {"dog": 10, "fox_cub": 10}  # stratified holdout
    tr = {_digest(x) for x in split.train.images}
    ho = {_digest(x) for x in split.holdout.images}
    te = {_digest(x) for x in split.test.images}
    assert len(tr) == 80 and not tr & ho and not (tr | ho) & te
    assert set(split.indices["train"]).isdisjoint(split.indices["holdout"])
    assert len(split.test) == 80
    assert np.array_equal(split.test_targets, (~np.isin(split.test.labels, [1, 2])).astype(np.int64))
    assert split.test_targets.sum() == 40
    # captions filled from the templates with readable names
    assert all(len(c) == 1 for c in split.train.captions)
    assert any("fox cub" in c[0] for c in split.train.captions)
    assert split.test.captions is None


def test_one_class_split_caps_and_determinism() -> None:
    train, test = _toy_sets()
    a = make_one_class_split(train, test, [0], 0.1, seed=7, max_normal_train=20, max_test=10)
    b = make_one_class_split(train, test, [0], 0.1, seed=7, max_normal_train=20, max_test=10)
    assert len(a.train) + len(a.holdout) == 20 and len(a.holdout) == 2
    assert len(a.test) == 10
    # 20 of 80 test images are normal -> round(10 * 0.25) = 2 normal (kept >= 1), 8 anomalies, ~3 per class
    assert a.test_targets.sum() == 8 and (a.test_targets == 0).sum() == 2
    assert sorted(np.bincount(a.test.labels[a.test_targets == 1]).tolist()) == [0, 2, 3, 3]
    assert np.array_equal(a.indices["test"], b.indices["test"]) and np.array_equal(a.indices["train"], b.indices["train"])
    c = make_one_class_split(train, test, [0], 0.1, seed=8, max_normal_train=20, max_test=10)
    assert not np.array_equal(a.indices["train"], c.indices["train"])


def test_stratified_sample_by_hand() -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    picked = stratified_sample(labels, 5, np.random.default_rng(0))
    # quotas 3.0, 1.5, 0.5 -> floor 3, 1, 0; the one remaining goes to a 0.5 remainder (class 1 or 2)
    counts = np.bincount(labels[picked], minlength=3)
    assert counts[0] == 3 and counts[1] + counts[2] == 2 and counts[1] >= 1 and len(set(picked)) == 5


def test_unknown_and_bad_classes() -> None:
    train, test = _toy_sets()
    with pytest.raises(ValueError, match="unknown class 'wolf'.*'cat', 'dog', 'fox_cub', 'owl'"):
        make_one_class_split(train, test, ["wolf"])
    with pytest.raises(ValueError, match="out of range"):
        make_one_class_split(train, test, [4])
    with pytest.raises(ValueError, match="every class is normal"):
        make_one_class_split(train, test, [0, 1, 2, 3])
    split = make_one_class_split(train, test, ["Fox Cub"])  # loose name matching
    assert split.normal_class_names == ["fox_cub"]


def test_template_captions() -> None:
    caps = template_captions([0, 1, 1], ["aquarium_fish", "t-shirt/top"], ["a photo of a {name}."], seed=0)
    assert caps == [["a photo of an aquarium fish."], ["a photo of a t-shirt/top."], ["a photo of a t-shirt/top."]]
    assert template_captions([0], ["otter"], ["A {name} in an image of a {name}."])[0] == ["An otter in an image of an otter."]
    templates = ["a {name}.", "the {name}.", "one {name}."]
    two = template_captions(np.zeros(50, dtype=int), ["x"], templates, seed=1, per_image=2)
    assert all(len(c) == 2 and c[0] != c[1] for c in two)
    assert two == template_captions(np.zeros(50, dtype=int), ["x"], templates, seed=1, per_image=2)
    assert len({c[0] for c in two}) == 3  # every template used across 50 draws
    with pytest.raises(ValueError, match="must contain '\\{name\\}'"):
        template_captions([0], ["x"], ["a photo."])


def test_imageset_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(np.zeros((2, 4, 4), dtype=np.float32), np.zeros(2, dtype=np.int64), ["a"])
    with pytest.raises(ValueError, match="labels must lie"):
        ImageSet(np.zeros((2, 4, 4), dtype=np.uint8), np.array([0, 1]), ["a"])
    s = ImageSet(np.zeros((3, 4, 4, 3), dtype=np.uint8), np.array([0, 1, 0]), ["a", "b"], [["x"], ["y"], ["z"]])
    sub = s.subset(np.array([False, True, True]))
    assert len(sub) == 2 and sub.captions == [["y"], ["z"]] and sub.labels.tolist() == [1, 0]


# ---------------------------------------------------------------------------------------
# Image folder + captions JSONL


def _save_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    lines = []
    for i in range(12):
        label = ["cat", "dog", "owl"][i % 3]
        rel = f"imgs/{label}_{i}.png"
        _save_png(root / rel, (i * 20, 100, 200 - i * 10))
        lines.append(json.dumps({"file": rel, "label": label, "captions": [f"a {label} number {i}"],
                                 "split": "test" if i >= 9 else "train"}))
    lines.append("{this is not json")
    lines.append(json.dumps({"file": "imgs/none.png", "captions": ["no label"]}))
    lines.append(json.dumps({"file": "imgs/missing.png", "label": "cat", "captions": ["gone"]}))
    (root / "imgs" / "broken.png").write_bytes(b"not an image")
    lines.append(json.dumps({"file": "imgs/broken.png", "label": "dog", "captions": ["broken"]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_counts_skips(image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        catalog = read_image_folder(image_folder, image_size=8)
    assert catalog.skipped == {"malformed": 2, "missing": 1}
    assert "2 malformed line(s)" in caplog.text and "1 missing image(s)" in caplog.text
    assert catalog.class_names == ["cat", "dog", "owl"] and len(catalog) == 13
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        images, kept = catalog.load()
    assert catalog.skipped["unreadable"] == 1 and "1 unreadable image" in caplog.text
    assert images.images.shape == (12, 8, 8, 3) and kept.size == 12
    assert images.captions[1] == ["a dog number 1"]
    # None keeps the first image's size (20 x 12 -> H 12, W 20)
    native = load_image_folder(image_folder, image_size=None)
    assert native.images.shape == (12, 12, 20, 3)
    assert tuple(native.images[4, 0, 0]) == (80, 100, 160)  # colour of image 4


def test_build_split_folder(image_folder: Path) -> None:
    cfg = DataSection(dataset="folder", path=str(image_folder), normal_classes=["cat"], image_size=8, holdout_fraction=0.25)
    split = build_split(cfg, seed=0)
    assert split.name == "folder/cat" and split.domain == "images"
    # cats outside the test split: images 0, 3, 6 -> 3 normals, 1 held out; test: images 9, 10, 11
    assert len(split.train) == 2 and len(split.holdout) == 1
    assert split.test_targets.tolist() == [0, 1, 1]
    assert [c[0] for c in split.test.captions] == ["a cat number 9", "a dog number 10", "a owl number 11"]


# ---------------------------------------------------------------------------------------
# Oxford-102 and UCM-Caption layouts


@pytest.fixture()
def oxford_dir(tmp_path: Path) -> Path:
    from PIL import Image
    from scipy.io import savemat

    root = tmp_path / "flowers"
    labels = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3])  # image ids 1..15
    (root / "jpg").mkdir(parents=True)
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 6, 7, 11]]), "valid": np.array([[3, 8, 12]]),
                                 "tstid": np.array([[4, 5, 9, 10, 13, 14, 15]])})
    for i, lab in enumerate(labels, 1):
        Image.new("RGB", (40, 30), (10 * i, 50, 90)).save(root / "jpg" / f"image_{i:05d}.jpg", quality=95)
        if i != 2:  # image 2 has no caption file -> template caption
            t = root / "text_c10" / f"class_{lab:05d}"
            t.mkdir(parents=True, exist_ok=True)
            (t / f"image_{i:05d}.txt").write_text("\n".join(f"flower {i} caption {k}" for k in range(10)) + "\n")
    return root


def test_oxford102_preset(oxford_dir: Path) -> None:
    cfg = DataSection(preset="oxford102", path=str(oxford_dir), normal_classes=["pink primrose"], image_size=16,
                      holdout_fraction=0.25)
    split = build_split(cfg, seed=0)
    assert split.domain == "photos of flowers" and split.name == "oxford102/pink-primrose"
    # class 1 train pool: ids 1, 2, 3 (trnid + valid); test: all 7 tstid images
    assert len(split.train) + len(split.holdout) == 3 and len(split.holdout) == 1
    assert split.test.images.shape == (7, 16, 16, 3)
    assert split.test_targets.tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert set(split.indices["test"].tolist()) == set(range(7))
    caps = {c[0] for c in split.train.captions + split.holdout.captions}
    assert caps & {"flower 1 caption 0", "flower 3 caption 0"}
    assert any(c.endswith("pink primrose.") for c in caps)  # image 2 had none: template caption
    with_captions = [c for c in split.train.captions + split.holdout.captions if c[0].startswith("flower")]
    assert all(len(c) == 10 for c in with_captions)
    # JPEG colour survives decoding (image 4 is (40, 50, 90))
    assert np.allclose(split.test.images[0].reshape(-1, 3).mean(0), (40, 50, 90), atol=3)


def test_oxford102_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="imagelabels.mat"):
        build_split(DataSection(preset="oxford102", path=str(tmp_path)), seed=0)


@pytest.fixture()
def ucm_dir(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "ucm"
    (root / "imgs").mkdir(parents=True)
    numbers = [1, 2, 3, 4, 101, 102, 103, 104, 201, 202, 203, 204, 301, 302]
    images = []
    for n in numbers:
        split = "test" if n % 100 in (3, 4) else ("val" if n % 100 == 2 else "train")
        images.append({"filename": f"{n}.tif", "split": split, "imgid": n - 1,
                       "sentences": [{"raw": f"scene {n} sentence {k} .", "tokens": []} for k in range(5)]})
        if n != 302:  # listed but missing
            Image.new("RGB", (24, 24), (n % 256, 30, 60)).save(root / "imgs" / f"{n}.tif")
    images.append({"filename": "notanumber.tif", "split": "train", "sentences": []})
    (root / "dataset_ucm_modified.json").write_text(json.dumps({"images": images, "dataset": "ucm"}))
    return root


def test_ucm_caption_preset(ucm_dir: Path) -> None:
    split = build_split(DataSection(preset="ucm_caption", path=str(ucm_dir), image_size=12, holdout_fraction=0.25), seed=1)
    assert split.normal_class_names == ["agricultural", "airplane"]  # two classes normal by default
    assert split.domain == "aerial images of land use"
    assert len(split.train) == 3 and len(split.holdout) == 1  # 1, 2, 101, 102 (train + val)
    assert split.test.images.shape == (6, 12, 12, 3)  # 3, 4, 103, 104, 203, 204
    assert split.test_targets.tolist() == [0, 0, 0, 0, 1, 1]
    assert split.train.captions[0][0].startswith("scene") and len(split.train.captions[0]) == 5


# ---------------------------------------------------------------------------------------
# real data, where present


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    t0 = time.process_time()
    train = load_fashion_mnist(None, "train", download=False)
    test = load_fashion_mnist(None, "test", download=False)
    cpu = time.process_time() - t0
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert cpu < 2.5, f"loading Fashion-MNIST took {cpu:.2f} CPU-s (expected about 0.5)"
    split = build_split(DataSection(dataset="fashion_mnist", normal_classes=["shirt"], download=False), seed=0)
    assert len(split.train) == 5400 and len(split.holdout) == 600 and len(split.test) == 10000
    assert split.test_targets.sum() == 9000 and split.name == "fashion_mnist/shirt"
    assert split.train.captions[0][0] in {"a photo of a shirt.", "a picture of a shirt.", "an image of a shirt."}


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_all_ten_fashion_mnist_one_class_splits() -> None:
    """The paper's protocol: each of the ten classes normal in turn, every other class anomalous."""
    test = load_fashion_mnist(None, "test", download=False)
    names = set()
    for c in range(10):
        split = build_split(DataSection(dataset="fashion_mnist", normal_classes=[c], download=False), seed=0)
        assert len(split.train) == 5400 and len(split.holdout) == 600 and len(split.test) == 10000
        assert set(split.train.labels.tolist()) == {c} and set(split.holdout.labels.tolist()) == {c}
        assert np.array_equal(split.test_targets, (test.labels != c).astype(np.int64))
        names.add(split.name)
    assert len(names) == 10


@pytest.mark.skipif(not (SHARED / "cifar-10-partial").is_dir(), reason=f"no partial CIFAR-10 under {SHARED}")
def test_real_cifar10_partial() -> None:
    train = load_cifar(SHARED / "cifar-10-partial", 10, "train")
    test = load_cifar(SHARED / "cifar-10-partial", 10, "test")
    assert train.images.shape == (1102 + 4 * 1017, 32, 32, 3) and len(test) == 1017
    assert len(np.unique(train.labels)) == 10 and train.class_names[0] == "airplane"


@pytest.mark.skipif(not (SHARED / "cifar-100-partial").is_dir(), reason=f"no partial CIFAR-100 under {SHARED}")
def test_real_cifar100_partial_superclass() -> None:
    cfg = DataSection(preset="cifar100_superclass", path=str(SHARED / "cifar-100-partial"), normal_classes=["flowers"])
    split = build_split(cfg, seed=0)
    assert len(split.test) == 916 and split.name == "cifar100_superclass/flowers"
    fine = load_cifar(SHARED / "cifar-100-partial", 100, "train", "fine")
    fine_names = {fine.class_names[i] for i in fine.labels[split.indices["train"]]}
    assert fine_names <= {"orchid", "poppy", "rose", "sunflower", "tulip"}  # the 5 fine classes of 'flowers'
    assert all(c[0].split(" of ")[-1].split(" ", 1)[1].rstrip(".") in fine_names for c in split.train.captions)
    fine_split = build_split(DataSection(preset="cifar100_fine", path=str(SHARED / "cifar-100-partial"),
                                         normal_classes=["rose"]), seed=0)
    assert set(fine_split.train.labels.tolist()) == {fine.class_names.index("rose")}


@pytest.mark.skipif(not (SHARED / "ucm-captions").is_dir(), reason=f"no UCM captions under {SHARED}")
def test_real_ucm_captions() -> None:
    from kka_ray.data.ucm_caption import CLASS_NAMES, read_ucm_caption, read_ucm_captions

    records, n_bad = read_ucm_captions(SHARED / "ucm-captions" / "dataset_ucm_modified.json")
    assert n_bad == 0 and len(records) == 2100
    assert np.bincount([r["label"] for r in records]).tolist() == [100] * 21
    first = next(r for r in records if r["number"] == 1)
    assert CLASS_NAMES[first["label"]] == "agricultural" and "farmland" in first["captions"][0]
    assert all(len(r["captions"]) == 5 for r in records)
    assert sorted({r["split"] for r in records}) == ["test", "train", "val"]
    with pytest.raises(FileNotFoundError, match="imgs"):  # captions only, no images here
        read_ucm_caption(SHARED / "ucm-captions", "train")
