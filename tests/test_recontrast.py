"""ReContrast (Guo et al., NeurIPS 2023) with KKA's anomaly term: the equations on hand-worked
numbers, and one real fit (EfficientNet-Lite0 from a model cache, Fashion-MNIST, local Ray
Train) through the public detector interface."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kka_ray.detectors.recontrast.loss import (
    anomaly_term, attach_easy_point_hook, easy_point_mask, global_cosine_distance, global_cosine_hm, hook_alpha,
    recontrast_loss, reconstruction_distance,
)
from kka_ray.detectors.recontrast.torch_model import gaussian_blur, image_scores

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TROUSER, SANDAL, SNEAKER, BAG = 1, 5, 7, 8


# -- (a) the alpha ramp ------------------------------------------------------------------------
def test_hook_alpha_ramps_linearly_then_stays():
    # released: min(-3 + (1 - -3) * it / (total * 0.1), 1)
    assert hook_alpha(0, 1000, -3.0, 1.0, 0.1) == -3.0
    assert hook_alpha(25, 1000, -3.0, 1.0, 0.1) == pytest.approx(-2.0)
    assert hook_alpha(50, 1000, -3.0, 1.0, 0.1) == pytest.approx(-1.0)  # 5 % of 1000 with a 10 % ramp
    assert hook_alpha(100, 1000, -3.0, 1.0, 0.1) == 1.0
    assert hook_alpha(999, 1000, -3.0, 1.0, 0.1) == 1.0
    assert hook_alpha(10, 40, -3.0, 1.0, 0.5) == pytest.approx(-1.0)  # half of a 20-iteration ramp
    with pytest.raises(ValueError, match="total_iters"):
        hook_alpha(0, 0)


# -- (b) the hard-point hook -------------------------------------------------------------------
def _points_at_distances(dists: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target (1, 2, 2, 2): (1, 0) everywhere; reconstruction at angle theta with 1 - cos = d."""
    target = torch.zeros(1, 2, 2, 2)
    target[:, 0] = 1.0
    theta = torch.tensor([math.acos(1 - d) for d in dists]).view(2, 2)
    recon = torch.stack([torch.cos(theta), torch.sin(theta)]).unsqueeze(0)
    return target, recon


def test_easy_point_mask_hand_worked():
    d = torch.tensor([[[0.1, 0.2], [0.3, 1.0]]])
    # mean 0.4, unbiased std sqrt((0.09 + 0.04 + 0.01 + 0.36) / 3) = 0.40825
    assert easy_point_mask(d, 0.0).tolist() == [[[True, True], [True, False]]]
    assert easy_point_mask(d, 1.0).tolist() == [[[True, True], [True, False]]]  # thresh 0.808
    assert easy_point_mask(d, 1.5).tolist() == [[[True, True], [True, True]]]  # thresh 1.012
    assert easy_point_mask(d, -0.5).tolist() == [[[True, False], [False, False]]]  # thresh 0.196
    assert not easy_point_mask(d, -1.0).any()  # thresh -0.008


def test_hook_zeroes_easy_point_gradients():
    recon = torch.ones(1, 3, 2, 2, requires_grad=True)
    out = recon * 1.0
    easy = torch.tensor([[[True, False], [False, True]]])
    attach_easy_point_hook(out, easy, factor=0.0)
    (out * torch.arange(1.0, 13.0).view(1, 3, 2, 2)).sum().backward()
    grad = recon.grad[0]
    assert torch.all(grad[:, 0, 0] == 0) and torch.all(grad[:, 1, 1] == 0)
    assert grad[:, 0, 1].tolist() == [2.0, 6.0, 10.0] and grad[:, 1, 0].tolist() == [3.0, 7.0, 11.0]

    recon.grad = None
    out = recon * 1.0
    attach_easy_point_hook(out, easy, factor=0.5)
    out.sum().backward()
    assert recon.grad[0, :, 0, 0].tolist() == [0.5] * 3 and recon.grad[0, :, 0, 1].tolist() == [1.0] * 3


def test_global_cosine_hm_drops_gradient_of_easy_points_only():
    target, recon = _points_at_distances([0.1, 0.2, 0.3, 1.0])
    recon.requires_grad_(True)
    loss = global_cosine_hm([target], [recon], alpha=0.0, factor=0.0)  # thresh 0.4: only d = 1.0 is hard
    loss.backward()
    g = recon.grad[0].abs().sum(0)  # per point
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[1, 0] == 0
    assert g[1, 1] > 0
    # the loss value is the global cosine distance, whatever the hook does
    assert loss.item() == pytest.approx(global_cosine_distance(target, recon.detach()).item(), abs=1e-6)


# -- (c) global cosine distance ----------------------------------------------------------------
def test_global_cosine_distance_hand_worked():
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4).view(4, 1, 2, 2)
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]).view(4, 1, 2, 2)
    assert global_cosine_distance(a, b).tolist() == pytest.approx([0.0, 1.0, 2.0, 0.0], abs=1e-7)
    # the whole (C, H, W) map is one vector: t = (1, 0, 0, 1), r = (1, 0, 1, 0): cos = 1 / 2
    t = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 2, 1, 2)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 2, 1, 2)
    assert global_cosine_distance(t, r).item() == pytest.approx(0.5, abs=1e-7)


def test_recontrast_loss_is_mean_of_reconstruction_distance():
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(3, 4, 2, 2, generator=g) for _ in range(6)]
    recons = [torch.randn(3, 4, 2, 2, generator=g, requires_grad=True) for _ in range(6)]
    loss = recontrast_loss(targets, recons, alpha=-3.0)
    d = reconstruction_distance(targets, recons)
    by_hand = sum(global_cosine_distance(t, r).mean() for t, r in zip(targets, recons)) / 2
    assert loss.item() == pytest.approx(d.mean().item(), abs=1e-6)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)


# -- (d) KKA's anomaly term --------------------------------------------------------------------
def test_anomaly_term_hinge():
    d = torch.tensor([0.2, 0.6, 0.8], requires_grad=True)
    term = anomaly_term(d, margin=0.5, weight=2.0)
    assert term.item() == pytest.approx(2.0 * (0.3 + 0 + 0) / 3)
    term.backward()
    assert d.grad.tolist() == pytest.approx([-2.0 / 3, 0.0, 0.0])  # linear below the margin only
    assert anomaly_term(torch.tensor([0.5, 1.7]), 0.5, 2.0).item() == 0.0
    assert anomaly_term(torch.zeros(0), 0.5, 2.0).item() == 0.0


# -- scoring helpers ---------------------------------------------------------------------------
def test_gaussian_blur_matches_scipy_and_image_scores():
    from scipy.ndimage import gaussian_filter

    x = torch.randn(2, 1, 9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (0.5, 2.0, 4.0):  # 4.0: radius 16 > image, folds the reflection
        ref = np.stack([gaussian_filter(x[i, 0].numpy(), sigma) for i in range(2)])
        np.testing.assert_allclose(gaussian_blur(x, sigma)[:, 0].numpy(), ref, atol=1e-12)
    amap = torch.tensor([[[0.0, 1.0], [3.0, 2.0]]])
    assert image_scores(amap).item() == 3.0
    assert image_scores(amap, 0.5).item() == 2.5  # mean of the top half


# -- (e)-(h) the detector on real data -----------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist():
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST_DIR}")
    from kka_ray.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(FMNIST_DIR, "train", download=False), load_fashion_mnist(FMNIST_DIR, "test", download=False)


@pytest.fixture(scope="module")
def fitted(ray_two_cpus, fmnist, tmp_path_factory):
    """One fit serves (e)-(g): 48 trousers + 16 bags as stand-in generated anomalies, validation
    16 trousers + 8 bags, 32 px, 2 epochs (8 iterations); margin 10 so the term is always active."""
    from kka_ray.config import ReContrastSection
    from kka_ray.detectors.base import DetectorContext, Validation
    from kka_ray.detectors.recontrast import ReContrast
    from kka_ray.knowledge.backbones import prepare_efficientnet_lite0

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("rc-cache")
    prepare_efficientnet_lite0(cache)
    train, _ = fmnist
    trousers, bags = train.images[train.labels == TROUSER], train.images[train.labels == BAG]
    cfg = ReContrastSection(epochs=2, batch_size=16, anomaly_margin=10.0, anomaly_weight=0.1)
    ctx = DetectorContext(storage_path=str(tmp_path_factory.mktemp("rc-ray")), cache_dir=str(cache), image_size=32, seed=0)
    det = ReContrast(cfg, ctx)
    det.fit(trousers[:48], bags[:16], Validation(trousers[48:64], bags[16:24]), name="rc-test")
    return det


def _test_pair(fmnist, n: int = 64):
    _, test = fmnist
    x = np.concatenate([test.images[test.labels == TROUSER][:n], test.images[test.labels == SNEAKER][:n]])
    return x, np.r_[np.zeros(n), np.ones(n)]


def test_fit_and_score_real_images(fitted, fmnist):
    from sklearn.metrics import roc_auc_score

    x, y = _test_pair(fmnist)
    scores = fitted.decision_function(x)
    assert scores.shape == (len(x),) and scores.dtype == np.float64 and np.isfinite(scores).all()
    assert roc_auc_score(y, scores) > 0.5
    maps = fitted.anomaly_maps(x[:3])
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all() and (maps >= 0).all()
    info = fitted.fit_info_
    assert info["iterations"] == 8 and info["epochs"] == 2 and info["n_anomalies"] == 16
    assert info["selected_epoch"] in (1, 2) and info["last_val_auroc"] is not None
    assert fitted.has_distinct_last == (info["selected_epoch"] != 2)
    # the RGB path: the same image as (H, W) grey and (H, W, 3) scores the same
    rgb = np.repeat(x[:4, :, :, None], 3, axis=-1)
    np.testing.assert_allclose(fitted.decision_function(rgb), scores[:4], rtol=1e-6)


def test_history_records_anomaly_term(fitted):
    history = fitted.fit_info_["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        # every clip is inactive (margin 10 > any distance, at most 6), so term = w * (margin - mean d)
        assert 0 < h["anomaly_distance"] < 6
        assert h["anomaly_term"] == pytest.approx(0.1 * (10.0 - h["anomaly_distance"]), rel=1e-5)
        assert math.isfinite(h["normal_loss"]) and h["normal_loss"] > 0 and h["val_auroc"] is not None
    assert history[-1]["alpha"] == 1.0  # 10 % ramp of 8 iterations is over


def test_save_load_round_trip(fitted, fmnist, tmp_path):
    from kka_ray.detectors.recontrast import ReContrast

    x, _ = _test_pair(fmnist, 16)
    fitted.set_threshold(x[:16])
    fitted.save(tmp_path / "det")
    assert (tmp_path / "det" / "model.safetensors").is_file() and (tmp_path / "det" / "detector.json").is_file()
    loaded = ReContrast.load(tmp_path / "det")
    for which in ("selected", "last"):
        np.testing.assert_array_equal(loaded.decision_function(x, which=which), fitted.decision_function(x, which=which))
    assert loaded.threshold_ == fitted.threshold_
    assert loaded.fit_info_["selected_epoch"] == fitted.fit_info_["selected_epoch"]


def test_clear_errors(fitted, fmnist):
    from kka_ray.config import ReContrastSection
    from kka_ray.detectors.base import DetectorContext
    from kka_ray.detectors.recontrast import ReContrast

    x, _ = _test_pair(fmnist, 4)
    with pytest.raises(ValueError, match="uint8"):
        fitted.decision_function(x.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="shaped"):
        fitted.decision_function(x[0])
    with pytest.raises(ValueError, match="which"):
        fitted.decision_function(x, which="best")
    fresh = ReContrast(ReContrastSection())
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.decision_function(x)
    with pytest.raises(ValueError, match="uint8"):
        fresh.fit(x.astype(np.float64))
    with pytest.raises(ValueError, match="backbone"):
        ReContrast(context=DetectorContext(backbone="timm:resnet18"))
    with pytest.raises(ValueError, match="at least 2"):
        fresh.fit(x[:1])
