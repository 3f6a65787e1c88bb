"""Detectors through the shared interface: SSD and few-shot SSD on hand-worked Mahalanobis
numbers, Deep SAD's validation-chosen checkpoint, CMDA's ridge map and interpolation, the
registry, the anomaly-set validation split, and the paper tables built from result rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kka_ray.config import CMDASection, DeepSADSection, DetectorSection, SSDSection, load_config
from kka_ray.data.store import Member
from kka_ray.detectors.base import Validation
from kka_ray.detectors.registry import build_detector, input_kind
from kka_ray.rundir import split_members


# ------------------------------------------------------------------ SSD
def _square():
    # four normals at (+-1, +-1): mean 0, ML covariance I, so s(x) = ||x||^2
    return np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)


def test_ssd_is_mahalanobis_to_the_normals():
    from kka_ray.detectors.ssd import SSD

    det = SSD(SSDSection(n_clusters=1, covariance="pinv", few_shot=True)).fit(_square())
    s = det.decision_function(np.array([[0, 0], [2, 0], [1, 2]], np.float32))
    assert s == pytest.approx([0.0, 4.0, 5.0])
    assert det.fit_info_["few_shot"] is False and not det.has_distinct_last  # no epochs: one model
    # max rule on validation normals, then predict
    assert det.set_threshold(_square()) == pytest.approx(2.0)
    assert det.predict(np.array([[0, 0], [3, 0]], np.float32)).tolist() == [0, 1]


def test_few_shot_ssd_subtracts_the_anomaly_distance():
    from kka_ray.knowledge.mahalanobis import MahalanobisScorer

    from kka_ray.detectors.ssd import SSD

    rng = np.random.default_rng(0)
    anomalies = (rng.normal(size=(30, 2)) * 0.5 + [4.0, 0.0]).astype(np.float32)
    det = SSD(SSDSection(few_shot=True)).fit(_square(), anomalies)
    x = np.array([[0, 0], [4, 0], [-4, 0]], np.float32)
    lw = MahalanobisScorer(1, "ledoit_wolf").fit(anomalies)
    assert det.decision_function(x) == pytest.approx(np.sum(x**2, 1) - lw.score(x))
    s = det.decision_function(x)
    # (4, 0) and (-4, 0) are equally far from the normals; the known anomaly side scores higher
    assert s[1] > s[2]
    assert det.fit_info_ == {"few_shot": True, "n_anomalies": 30, "selected_epoch": None}
    # few_shot off: anomalies are ignored
    plain = SSD(SSDSection(few_shot=False)).fit(_square(), anomalies)
    assert plain.decision_function(x) == pytest.approx([0.0, 16.0, 16.0])


def test_ssd_save_load_and_errors(tmp_path):
    from kka_ray.detectors.ssd import SSD

    from kka_ray.detectors.base import DETECTOR_META, DetectorContext

    ctx = DetectorContext(storage_path=str(tmp_path / "rt"), cache_dir=str(tmp_path), image_size=48, seed=3)
    det = SSD(context=ctx).fit(_square(), np.array([[3, 3], [3.5, 3], [3, 3.2]], np.float32))
    det.set_threshold(_square(), rule="quantile", q=0.5)
    det.save(tmp_path / "ssd")
    loaded = SSD.load(tmp_path / "ssd")
    x = np.array([[0.5, 0.1], [3, 3]], np.float32)
    assert np.array_equal(loaded.decision_function(x), det.decision_function(x))
    assert loaded.threshold_ == det.threshold_
    # the context travels, except where Ray Train wrote; a model cache that is gone is dropped
    assert (loaded.context.seed, loaded.context.image_size, loaded.context.cache_dir) == (3, 48, str(tmp_path))
    assert loaded.context.storage_path is None
    meta_path = tmp_path / "ssd" / DETECTOR_META
    meta = json.loads(meta_path.read_text())
    # the layout before the context had its own entry: seed (and size, cache) at the top
    meta.pop("context")
    meta_path.write_text(json.dumps({**meta, "seed": 5, "cache_dir": str(tmp_path / "gone")}))
    old = SSD.load(tmp_path / "ssd")
    assert old.context.seed == 5 and old.context.cache_dir is None
    assert np.array_equal(old.decision_function(x), det.decision_function(x))
    with pytest.raises(RuntimeError, match="not fitted"):
        SSD().decision_function(x)
    with pytest.raises(ValueError, match="shaped"):
        SSD().fit(np.zeros((4, 2, 2), np.float32))
    with pytest.raises(RuntimeError, match="set_threshold"):
        SSD().fit(_square()).predict(x)
    with pytest.raises(ValueError, match="holds a 'ssd' detector, not 'cmda'"):
        from kka_ray.detectors.cmda import CMDA

        CMDA.load(tmp_path / "ssd")


# ------------------------------------------------------------------ registry and validation split
def test_registry_builds_each_detector_from_its_section():
    section = DetectorSection()
    from kka_ray.detectors.base import DetectorContext

    ctx = DetectorContext(seed=3)
    assert type(build_detector("ssd", section, ctx)).__name__ == "SSD"
    assert type(build_detector("sad", section, ctx)).__name__ == "DeepSAD"
    cmda = build_detector("cmda", section, ctx, normal_texts=["a"], class_names=["shirt"])
    # CMDA's Deep SAD is SAD's settings with its own eta (1, not SAD's 1000); None keeps SAD's
    assert cmda.cfg == section.cmda and cmda.sad_cfg.eta == section.cmda.eta == 1.0 != section.eta
    assert cmda.sad_cfg.model_dump(exclude={"eta"}) == section.model_dump(exclude={"eta"})
    own = section.model_copy(update={"cmda": section.cmda.model_copy(update={"eta": None})})
    assert build_detector("cmda", own, ctx, normal_texts=["a"], class_names=["shirt"]).sad_cfg.eta == section.eta
    assert input_kind("simplenet") == "images" and input_kind("ssd") == "features"
    with pytest.raises(ValueError, match="unknown detector 'svm'"):
        input_kind("svm")
    # image detectors need the built-in backbone's intermediate maps: refused before any download
    for name in ("simplenet", "recontrast"):
        with pytest.raises(ValueError, match="efficientnet_lite0"):
            build_detector(name, section, DetectorContext(backbone="timm:resnet18"))


def test_detector_config_names_the_bad_field():
    from kka_ray.config import ConfigError

    with pytest.raises(ConfigError, match="detector.name"):
        load_config(overrides=["detector.name=svm"])
    with pytest.raises(ConfigError, match="detector.simplenet.epochs"):
        load_config(overrides=["detector.simplenet.epochs=0"])
    with pytest.raises(ConfigError, match="detector.cmda.*mix_low"):
        load_config(overrides=["detector.cmda.mix_low=0.9"])
    cfg = load_config(overrides=["detector.name=simplenet", "detector.baselines=[ssd,cmda]"])
    assert cfg.detector.name == "simplenet" and cfg.detector.baselines == ["ssd", "cmda"]


def test_split_members_is_stable_and_keeps_training_rows():
    members = [Member(f"run/it1/p{i:04d}/s00", float(i), i % 2 == 0) for i in range(200)]
    train, val = split_members(members, 0.2)
    assert len(train) + len(val) == 200 and not {m.id for m in train} & {m.id for m in val}
    assert 20 < len(val) < 60  # ~20 % by hash
    # the same id is on the same side when the set changes (next iteration, other order)
    train2, val2 = split_members(list(reversed(members[:150])), 0.2)
    assert {m.id for m in val2} == {m.id for m in val if int(m.id[9:13]) < 150}
    assert split_members(members, 0.0) == (members, [])
    assert split_members(members[:1], 0.5) == (members[:1], [])


def test_validation_arrays_label_anomalies_one():
    v = Validation(np.zeros((3, 2)), np.ones((2, 2)))
    x, y = v.arrays()
    assert x.shape == (5, 2) and y.tolist() == [0, 0, 0, 1, 1] and v.has_anomalies
    assert not Validation(np.zeros((3, 2))).has_anomalies


# ------------------------------------------------------------------ CMDA
def test_cmda_ridge_map_and_interpolation_closed_form():
    from kka_ray.detectors.cmda import interpolate, ridge_map

    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 3))
    w_true = rng.normal(size=(3, 4))
    z = t @ w_true + 2.0
    w, b = ridge_map(t, z, alpha=1e-9)
    assert np.allclose(w, w_true, atol=1e-6) and np.allclose(t @ w + b, z, atol=1e-6)
    # ridge shrinks: a large alpha maps everything towards the mean image feature
    w_big, b_big = ridge_map(t, z, alpha=1e9)
    assert np.allclose(t @ w_big + b_big, z.mean(0), atol=1e-3)

    normal = np.zeros((5, 2), np.float32)
    mapped = np.full((3, 2), 10.0, np.float32)
    x = interpolate(normal, mapped, n=100, low=0.3, high=0.7, seed=0)
    assert x.shape == (100, 2) and np.all(x >= 3.0 - 1e-5) and np.all(x <= 7.0 + 1e-5)
    assert np.array_equal(x, interpolate(normal, mapped, 100, 0.3, 0.7, seed=0))


def test_cmda_needs_one_caption_per_normal_row():
    from kka_ray.detectors.cmda import CMDA

    det = CMDA(CMDASection(), normal_texts=["a photo of a shirt."], class_names=["shirt"])
    assert "a photo of a damaged shirt." in det.anomaly_texts()
    with pytest.raises(ValueError, match="one caption per normal row"):
        det.pseudo_anomalies(np.zeros((3, 4), np.float32))


# ------------------------------------------------------------------ Deep SAD through the interface
def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    normal = rng.normal(0, 1, (256, 8)).astype(np.float32)
    anomalies = rng.normal(0, 1, (48, 8)).astype(np.float32) + 3.0
    return normal, anomalies


@pytest.mark.slow
def test_sad_picks_its_checkpoint_on_validation_and_keeps_the_last(ray_two_cpus, tmp_path):
    from kka_ray.detectors.deep_sad import DeepSAD
    from kka_ray.detectors.base import DetectorContext

    normal, anomalies = _blobs()
    cfg = DeepSADSection(hidden_dims=[16], rep_dim=4, epochs=6, batch_size=64, lr=1e-2)
    det = DeepSAD(cfg, context=DetectorContext(storage_path=str(tmp_path / "rt"), seed=0))
    val = Validation(normal[:64], anomalies[:16])
    det.fit(normal[64:], anomalies[16:], val, name="sad")
    info = det.fit_info_
    hist = [h for h in det.history_ if h["stage"] == "deep_sad"]
    val_aurocs = [h["val_auroc"] for h in hist]
    assert len(val_aurocs) == 6 and all(0.0 <= a <= 1.0 for a in val_aurocs)
    best = int(np.argmax(val_aurocs)) + 1
    assert info["selected_epoch"] == best and info["selected_val_auroc"] == pytest.approx(max(val_aurocs))
    assert info["last_val_auroc"] == pytest.approx(val_aurocs[-1])
    x = np.r_[normal[:32], anomalies[:32]]
    sel, last = det.decision_function(x), det.decision_function(x, which="last")
    assert det.has_distinct_last == (best != 6)
    if best != 6:
        assert not np.allclose(sel, last)  # two different phis were kept
    det.set_threshold(normal[:64])
    det.save(tmp_path / "det")
    loaded = DeepSAD.load(tmp_path / "det")
    assert np.array_equal(loaded.decision_function(x), sel)
    assert np.array_equal(loaded.decision_function(x, which="last"), last)
    assert loaded.fit_info_["selected_epoch"] == best and loaded.has_distinct_last == det.has_distinct_last


# ------------------------------------------------------------------ tables
def _rows():
    rows = []
    for split, base in (("fashion_mnist/0", 0.80), ("fashion_mnist/1", 0.90)):
        for seed, noise in ((0, -0.01), (1, 0.01)):
            common = {"run": f"runs/{split}", "split": split, "mode": "add", "seed": seed}
            rows.append({**common, "detector": "sad", "variant": "none", "iteration": 0, "auroc": base + noise,
                         "aupr": 0.5, "fpr95": 0.3, "auroc_last": base, "n_generated": 0})
            for k in (1, 2):
                rows.append({**common, "detector": "sad", "variant": "kka_add", "iteration": k,
                             "auroc": base + 0.02 * k + noise, "aupr": 0.6, "fpr95": 0.2, "auroc_last": base,
                             "n_generated": 64 * k})
    return rows


def test_main_table_means_stds_and_class_average():
    from kka_ray.tables.paper import main_table

    table = {(r["split"], r["variant"]): r for r in main_table(_rows())}
    r = table[("fashion_mnist/0", "kka_add")]  # final iteration only: 0.84 +- 0.01
    assert r["auroc_mean"] == pytest.approx(84.0) and r["auroc_std"] == pytest.approx(1.0)
    assert r["n_generated"] == 128 and r["seeds"] == 2
    assert table[("fashion_mnist/1", "none")]["auroc_mean"] == pytest.approx(90.0)
    mean = table[("mean", "kka_add")]
    assert mean["auroc_mean"] == pytest.approx((84.0 + 94.0) / 2) and mean["n_splits"] == 2
    assert table[("mean", "none")]["auroc_mean"] == pytest.approx(85.0)


def test_ablation_and_written_files(tmp_path):
    from kka_ray.tables.paper import ablation_table, write_tables

    abl = [r for r in ablation_table(_rows()) if r["split"] == "mean"]
    assert [(r["iteration"], round(r["auroc_mean"], 6)) for r in abl] == [(0, 85.0), (1, 87.0), (2, 89.0)]
    paths = write_tables(_rows(), tmp_path / "tables")
    csv_text = paths["table_csv"].read_text().splitlines()
    assert csv_text[0].split(",")[:6] == ["split", "detector", "variant", "auroc_mean", "auroc_std", "aupr_mean"]
    assert "| mean | sad | kka_add | 89.0 |" in paths["table_md"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths["rows"].read_text().splitlines()) == len(_rows())
    assert json.loads(paths["rows"].read_text().splitlines()[0])["detector"] == "sad"


@pytest.mark.slow
def test_cmda_fits_on_interpolated_text_features(ray_two_cpus, tmp_path):
    """CMDA through the public interface: real MiniLM embeddings (from the installed package),
    the ridge map, the interpolated pseudo-anomalies and a Deep SAD fit on Ray Train."""
    from kka_ray.detectors.base import DetectorContext
    from kka_ray.detectors.cmda import CMDA

    normal, anomalies = _blobs(1)
    texts = [["a photo of a shirt.", "a picture of a shirt."][i % 2] for i in range(len(normal))]
    ctx = DetectorContext(storage_path=str(tmp_path / "rt"), cache_dir=str(tmp_path / "cache"), seed=0)
    sad = DeepSADSection(hidden_dims=[16], rep_dim=4, epochs=3, batch_size=64, lr=1e-2)
    det = CMDA(CMDASection(n_samples=64), sad, ctx, normal_texts=texts, class_names=["shirt"])
    pseudo = det.pseudo_anomalies(normal)
    assert pseudo.shape == (64, 8) and np.isfinite(pseudo).all()
    det.fit(normal, validation=Validation(normal[:32]), name="cmda")
    assert det.fit_info_["n_pseudo_anomalies"] == 64 and det.sad_.n_anomalies_ == 64
    assert not det.has_distinct_last  # validation without anomalies chooses nothing: the last epoch is kept
    scores = det.decision_function(np.r_[normal[:16], anomalies[:16]])
    assert scores.shape == (32,) and scores.dtype == np.float64 and np.isfinite(scores).all()
    det.set_threshold(normal[:32])
    det.save(tmp_path / "cmda")
    assert np.array_equal(CMDA.load(tmp_path / "cmda").decision_function(anomalies[:4]), det.decision_function(anomalies[:4]))


def test_settings_hash_names_settings_not_placement():
    from kka_ray.config import DetectorSection
    from kka_ray.tables.runner import settings_hash

    base = DetectorSection()
    for name in ("sad", "simplenet", "recontrast", "cmda"):
        tag = settings_hash(base, name)
        gpu = base.model_copy(deep=True)
        own = gpu if name in ("sad", "cmda") else getattr(gpu, name)
        own.use_gpu, own.resources_per_worker = True, {"CPU": 8, "GPU": 0.25}
        assert settings_hash(gpu, name) == tag, name
    longer = base.model_copy(update={"simplenet": base.simplenet.model_copy(update={"epochs": 3})})
    assert settings_hash(longer, "simplenet") != settings_hash(base, "simplenet")
    assert settings_hash(longer, "recontrast") == settings_hash(base, "recontrast")
    wider = base.model_copy(update={"simplenet": base.simplenet.model_copy(update={"num_workers": 2})})
    assert settings_hash(wider, "simplenet") != settings_hash(base, "simplenet")


def test_evaluation_overrides_change_detectors_and_placement_only(tmp_path):
    from kka_ray.config import ConfigError, KKAConfig
    from kka_ray.tables.runner import device_overrides, run_config, settings_hash

    (tmp_path / "config.yaml").write_text(KKAConfig().to_yaml())
    cfg = run_config(tmp_path, [*device_overrides("cuda"), "ray.address=auto", "detector.epochs=3"])
    assert cfg.run.device == "cuda" and cfg.ray.address == "auto" and cfg.detector.epochs == 3
    assert cfg.detector.use_gpu and cfg.detector.simplenet.use_gpu and cfg.detector.recontrast.use_gpu

    def gpu_flags(d: dict) -> list[bool]:  # every use_gpu in the section, however deep
        return [v for k, v in d.items() if k == "use_gpu"] + [f for v in d.values() if isinstance(v, dict) for f in gpu_flags(v)]

    assert all(gpu_flags(cfg.detector.model_dump())) and len(gpu_flags(cfg.detector.model_dump())) >= 3
    # the GPU does not change which cached results answer for these settings
    cpu = run_config(tmp_path, ["detector.epochs=3"])
    assert all(settings_hash(cfg.detector, d) == settings_hash(cpu.detector, d) for d in ("sad", "simplenet", "cmda"))
    with pytest.raises(ConfigError, match=r"detector\.\*, run\.device or ray\.\*.*data\.normal_classes"):
        run_config(tmp_path, ["data.normal_classes=[3]"])
