"""SimpleNet (Liu et al., CVPR 2023) as a KKA detector.

Hand-worked numbers for the truncated L1 loss and the parameter-free projection; a statistical
check of the Gaussian negatives; the EfficientNet-Lite0 stage map and patch grid; then real
fits through the public ``SimpleNet`` API (real EfficientNet-Lite0 weights converted into a
temporary model cache, real Fashion-MNIST images, Ray Train TorchTrainer): easy-pair AUROC,
generated anomalies as negatives, validation-based selection, a safetensors save/load round
trip and clear errors on bad input. One Ray Train fit serves the slow tests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kka_ray.config import SimpleNetSection
from kka_ray.detectors.base import DetectorContext, Validation
from kka_ray.detectors.simplenet.loss import perturb, truncated_l1_loss
from kka_ray.detectors.simplenet.torch_model import LayerProjection, build_head

torch.set_num_threads(1)

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
TROUSER, DRESS, SNEAKER = 1, 3, 7


# ---------------------------------------------------------------------------------------
# loss, negatives, projection


def test_truncated_l1_loss_by_hand():
    d_normal = torch.tensor([0.7, 0.2], dtype=torch.float64)
    d_neg = torch.tensor([-0.9, 0.1], dtype=torch.float64)
    # th = 0.5: normal part mean(clip(0.5 - [0.7, 0.2], 0)) = mean([0, 0.3]) = 0.15
    #           negative part mean(clip(0.5 + [-0.9, 0.1], 0)) = mean([0, 0.6]) = 0.3
    loss, stats = truncated_l1_loss(d_normal, d_neg, margin=0.5)
    assert loss.item() == pytest.approx(0.45, abs=1e-12)
    assert stats["normal_loss"] == pytest.approx(0.15) and stats["negative_loss"] == pytest.approx(0.3)
    # p_true = P(D >= 0.5) = 1/2 (0.7); p_fake = P(D < -0.5) = 1/2 (-0.9)
    assert stats["p_true"] == 0.5 and stats["p_fake"] == 0.5
    # th = 1: mean([0.3, 0.8]) = 0.55 and mean([0.1, 1.1]) = 0.6
    assert truncated_l1_loss(d_normal, d_neg, margin=1.0)[0].item() == pytest.approx(1.15, abs=1e-12)
    # no normal rows (a batch of generated anomalies only): that term is 0
    assert truncated_l1_loss(d_normal[:0], d_neg, margin=0.5)[0].item() == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match="margin"):
        truncated_l1_loss(d_normal, d_neg, margin=0.0)


def test_gaussian_negatives_have_the_configured_std():
    gen = torch.Generator().manual_seed(0)
    adapted = torch.randn(2000, 256, generator=gen) * 3.0 + 1.0
    for std in (0.015, 0.1):
        neg = perturb(adapted, std, torch.Generator().manual_seed(1))
        diff = (neg - adapted).double()
        assert neg.shape == adapted.shape and (diff != 0).double().mean().item() > 0.999  # float32 may absorb a rare tiny draw
        # 512,000 draws: the sample std is within ~0.1 % of sigma, the mean within ~sigma/700
        assert diff.std().item() == pytest.approx(std, rel=0.01)
        assert abs(diff.mean().item()) < std / 100
    with pytest.raises(ValueError, match="noise_std"):
        perturb(adapted, 0.0)


def test_layer_projection_by_hand():
    # stages of 2 and 4 channels, embed_dim 2: MeanMapper per stage -> [1, 3] and [(2+4)/2, (6+8)/2] = [3, 7];
    # Aggregator over [1, 3, 3, 7] -> [(1+3)/2, (3+7)/2] = [2, 5]
    x = torch.tensor([[1.0, 3.0, 2.0, 4.0, 6.0, 8.0]])
    assert LayerProjection([2, 4], 2)(x).tolist() == [[2.0, 5.0]]


def test_training_pass_scores_normals_anomalies_and_noise_rows():
    head = build_head([3, 5], embed_dim=8, dsc_hidden=16, dsc_layers=2)
    x = torch.randn(10, 8)
    out = head(x, n_normal=6, noise_std=0.1)  # 10 adapted rows + 6 perturbed normals
    assert out.shape == (16,)
    head.eval()
    assert head(x).shape == (10,)
    # the standardiser's statistics travel in the state dict (safetensors-ready buffers)
    assert {"standardizer.mean", "standardizer.std"} <= set(head.state_dict())


# ---------------------------------------------------------------------------------------
# real backbone, real images, Ray Train


@pytest.fixture(scope="module")
def lite0_cache(tmp_path_factory):
    if not os.path.isdir(FMNIST_DIR):
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST_DIR}")
    from kka_ray.knowledge.backbones import prepare_efficientnet_lite0

    cache = tmp_path_factory.mktemp("lite0-cache")
    prepare_efficientnet_lite0(cache)
    return str(cache)


@pytest.fixture(scope="module")
def fmnist():
    from kka_ray.data.fashion_mnist import load_fashion_mnist

    train = load_fashion_mnist(split="train", download=False)
    test = load_fashion_mnist(split="test", download=False)

    def pick(ds, cls, start, n):
        return ds.images[ds.labels == cls][start : start + n]

    return {
        "normal": pick(train, TROUSER, 0, 64),
        "val_normal": pick(train, TROUSER, 64, 16),
        "generated": pick(train, DRESS, 0, 16),  # stand-ins for generated anomalies
        "val_generated": pick(train, DRESS, 16, 16),
        "test_normal": pick(test, TROUSER, 0, 48),
        "test_easy": pick(test, SNEAKER, 0, 48),
    }


CFG = SimpleNetSection(epochs=3, gan_epochs=2, batch_size=8)


def _context(cache: str, storage) -> DetectorContext:
    return DetectorContext(storage_path=str(storage), cache_dir=cache, image_size=64, seed=0)


@pytest.fixture(scope="module")
def fitted(ray_two_cpus, lite0_cache, fmnist, tmp_path_factory):
    """One Ray Train fit (the expensive part): trousers as normals, dresses as the generated anomalies."""
    from kka_ray.detectors.simplenet import SimpleNet

    det = SimpleNet(CFG, _context(lite0_cache, tmp_path_factory.mktemp("runs")))
    val = Validation(fmnist["val_normal"], fmnist["val_generated"])
    return det.fit(fmnist["normal"], anomalies=fmnist["generated"], validation=val, name="kka")


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def test_stage_map_and_patch_grid(lite0_cache, fmnist):
    from kka_ray.detectors.simplenet import SimpleNet
    from kka_ray.detectors.simplenet.torch_model import PatchFeatureExtractor, efficientnet_stage_blocks

    det = SimpleNet(CFG, DetectorContext(cache_dir=lite0_cache, image_size=64))
    feats = det.patch_features(fmnist["normal"][:3])  # 28 px grey, upscaled to 64 px
    # stage 3 (stride 8) = block 4, 40 ch, 8x8; stage 4 (stride 16) = block 10, 112 ch, 4x4 -> 8x8
    assert feats.shape == (3, 64, 152) and feats.dtype == np.float32
    trunk = det._feature_modules()[1].net
    assert efficientnet_stage_blocks(trunk) == {1: 0, 2: 2, 3: 4, 4: 10, 5: 15}
    with pytest.raises(ValueError, match="simplenet.layers"):
        PatchFeatureExtractor(trunk, [3, 7])


def test_frozen_features_are_computed_once_per_content_and_bounded():
    """The process-wide cache: equal rows (another array object) hit, other rows or other
    settings miss, least recently used goes first past the byte budget, 0 bytes turns it off."""
    from kka_ray.detectors.base import FrozenFeatureCache

    cache, calls = FrozenFeatureCache(), []

    def compute(rows):
        calls.append(len(rows))
        return rows.astype(np.float32) * 2.0  # 4 bytes per value

    a, b = np.arange(6, dtype=np.uint8).reshape(2, 3), np.arange(6, 12, dtype=np.uint8).reshape(2, 3)
    first = cache.get(("s",), a, compute, max_bytes=48)
    again = cache.get(("s",), a.copy(), compute, max_bytes=48)
    assert again is first and calls == [2] and not first.flags.writeable
    assert (cache.hits, cache.misses, cache.nbytes) == (1, 1, 24)
    cache.get(("other",), a, compute, max_bytes=48)  # other settings: computed again
    assert calls == [2, 2] and cache.nbytes == 48
    cache.get(("s",), a, compute, max_bytes=48)  # touch ("s", a): ("other", a) is now the oldest
    cache.get(("s",), b, compute, max_bytes=48)  # 72 bytes > 48: the oldest goes
    assert cache.nbytes == 48 and calls == [2, 2, 2]
    cache.get(("s",), a, compute, max_bytes=48)
    assert calls == [2, 2, 2]  # still there
    cache.get(("other",), a, compute, max_bytes=48)
    assert calls == [2, 2, 2, 2]  # evicted, so computed again
    off = cache.get(("s",), a, compute, max_bytes=0)
    assert off.flags.writeable and calls[-1] == 2 and len(calls) == 5


def test_patch_features_reuse_the_frozen_feature_cache(lite0_cache, fmnist):
    from kka_ray.detectors.base import FROZEN_FEATURES
    from kka_ray.detectors.simplenet import SimpleNet

    FROZEN_FEATURES.clear()
    images = fmnist["normal"][:4]
    det = SimpleNet(CFG, DetectorContext(cache_dir=lite0_cache, image_size=64))
    feats = det.patch_features(images)
    other = SimpleNet(CFG, DetectorContext(cache_dir=lite0_cache, image_size=64, seed=3))  # another seed: same features
    assert other.patch_features(images.copy()) is feats and FROZEN_FEATURES.hits == 1
    uncached = SimpleNet(CFG, DetectorContext(cache_dir=lite0_cache, image_size=64, feature_cache_bytes=0))
    np.testing.assert_array_equal(uncached.patch_features(images), feats)  # the cache returns what it computed
    coarser = SimpleNet(SimpleNetSection(layers=[4], epochs=1), DetectorContext(cache_dir=lite0_cache, image_size=64))
    assert coarser.patch_features(images).shape == (4, 16, 112)  # other layers: not the cached array
    assert FROZEN_FEATURES.misses == 2
    FROZEN_FEATURES.clear()


@pytest.mark.slow
def test_fit_separates_an_easy_pair(fitted, fmnist):
    s_norm = fitted.decision_function(fmnist["test_normal"])
    s_easy = fitted.decision_function(fmnist["test_easy"])  # sneakers: never seen in training
    assert s_norm.shape == (48,) and s_norm.dtype == np.float64 and np.isfinite(s_norm).all()
    assert _auroc(s_norm, s_easy) > 0.8
    maps = fitted.patch_scores(fmnist["test_easy"][:5])
    assert maps.shape == (5, 8, 8) and maps.dtype == np.float64
    np.testing.assert_allclose(maps.reshape(5, -1).max(1), s_easy[:5], rtol=1e-5)  # batch size changes float32 sums
    info = fitted.fit_info_
    assert info["epochs"] == 3 and info["n_normal"] == 64 and info["n_anomalies"] == 16 and info["seconds"] > 0


@pytest.mark.slow
def test_generated_anomalies_join_the_negatives(fitted, fmnist):
    info = fitted.fit_info_
    # every meta epoch = 2 passes; each normal patch row (64 images x 64 patches) gets one noisy
    # copy, and every patch of the 16 generated anomalies is a negative as well
    assert [h["n_normal_rows"] for h in info["history"]] == [2 * 64 * 64] * 3
    assert [h["n_noise_negatives"] for h in info["history"]] == [2 * 64 * 64] * 3
    assert [h["n_anomaly_negatives"] for h in info["history"]] == [2 * 16 * 64] * 3
    # the anomalies trained as negatives rank above unseen normals
    assert _auroc(fitted.decision_function(fmnist["test_normal"]), fitted.decision_function(fmnist["generated"])) > 0.9
    # validation (held-out normals + held-out generated anomalies) chose the kept epoch
    assert info["selected_val_auroc"] is not None and 1 <= info["selected_epoch"] <= 3
    assert info["selected_val_auroc"] == max(h["val_auroc"] for h in info["history"])
    assert info["history"][info["selected_epoch"] - 1]["val_auroc"] == info["selected_val_auroc"]
    assert info["last_val_auroc"] == info["history"][-1]["val_auroc"]
    assert fitted.has_distinct_last == (info["selected_epoch"] != 3)


@pytest.mark.slow
def test_checkpoint_and_save_load_round_trip(fitted, fmnist, tmp_path):
    from safetensors import safe_open

    from kka_ray.detectors.base import Detector
    from kka_ray.detectors.simplenet import SimpleNet

    ckpt = fitted.checkpoint_path_
    assert os.path.basename(ckpt) == "simplenet_final"
    with safe_open(os.path.join(ckpt, "head.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"adaptor.fc.weight", "discriminator.tail.weight", "standardizer.mean"} <= keys
    meta = json.loads(open(os.path.join(ckpt, "meta.json")).read())
    assert meta["layer_channels"] == [40, 112] and meta["num_anomaly_images"] == 16

    x = np.r_[fmnist["test_normal"][:16], fmnist["test_easy"][:16]]
    ref = {w: fitted.decision_function(x, which=w) for w in ("selected", "last")}
    fitted.set_threshold(fmnist["val_normal"])
    fitted.save(tmp_path / "det")
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in (tmp_path / "det").iterdir())
    loaded = SimpleNet.load(tmp_path / "det")
    for w in ("selected", "last"):
        assert np.array_equal(loaded.decision_function(x, which=w), ref[w])
    assert loaded.threshold_ == fitted.threshold_ and loaded.fit_info_ == json.loads(json.dumps(fitted.fit_info_))
    assert np.array_equal(loaded.predict(x), fitted.predict(x))
    assert isinstance(loaded, Detector) and loaded.cfg == CFG
    with pytest.raises(ValueError, match="which"):
        loaded.decision_function(x, which="best")


def test_clear_errors_on_bad_input(lite0_cache, fmnist):
    from pydantic import ValidationError

    from kka_ray.detectors.simplenet import SimpleNet

    det = SimpleNet(CFG, DetectorContext(cache_dir=lite0_cache))
    with pytest.raises(RuntimeError, match="not fitted"):
        det.decision_function(fmnist["test_normal"])
    with pytest.raises(ValueError, match="uint8"):
        det.patch_features(fmnist["normal"][:2].astype(np.float32) / 255)
    with pytest.raises(ValueError, match="shaped"):
        det.patch_features(np.zeros((2, 28, 28, 2), np.uint8))
    with pytest.raises(ValueError, match="shaped"):
        det.fit(np.zeros((28, 28), np.uint8))
    with pytest.raises(ValidationError):
        SimpleNetSection(layers=[])
    # the engine builds it by name from the detector section
    from kka_ray.config import DetectorSection
    from kka_ray.detectors.registry import build_detector

    built = build_detector("simplenet", DetectorSection(), DetectorContext(cache_dir=lite0_cache))
    assert isinstance(built, SimpleNet) and built.input_kind == "images" and built.cfg.noise_std == 0.1
