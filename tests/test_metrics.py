"""Detection metrics and stage accounting on hand-worked numbers."""

import numpy as np
import pytest

from kka_ray.metrics import cost_per_anomaly, detection_metrics


def test_detection_metrics_by_hand():
    # normals score 0.1, 0.4; anomalies 0.35, 0.8. Pairs (anomaly > normal): (0.35>0.1), (0.8>0.1),
    # (0.8>0.4) = 3 of 4 -> AUROC 0.75.
    m = detection_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auroc"] == pytest.approx(0.75)
    # ranking: 0.8 (A), 0.4 (N), 0.35 (A), 0.1 (N): AP = (1/1 + 2/3) / 2 = 0.8333
    assert m["aupr"] == pytest.approx((1 + 2 / 3) / 2)
    # TPR reaches 0.95 only at threshold 0.35, where one of two normals (0.4) is above: FPR 0.5
    assert m["fpr95"] == pytest.approx(0.5)


def test_detection_metrics_errors():
    with pytest.raises(ValueError, match="both normal"):
        detection_metrics(np.zeros(3), np.arange(3.0))
    with pytest.raises(ValueError, match="not finite"):
        detection_metrics(np.array([0, 1]), np.array([0.0, np.nan]))


def test_cost_per_anomaly():
    c = cost_per_anomaly({"gpu": 3600.0, "cpu": 7200.0}, {"gpu": 2.0, "cpu": 0.05}, n_anomalies=10, n_hard=4)
    assert c["cost"] == pytest.approx(2.1)
    assert c["cost_per_anomaly"] == pytest.approx(0.21)
    assert c["cost_per_hard_anomaly"] == pytest.approx(0.525)
    assert cost_per_anomaly({}, {"gpu": 1.0}, 0, 0)["cost_per_anomaly"] is None


def test_resource_seconds_from_declared_roles():
    from kka_ray.config import load_config
    from kka_ray.metrics import resource_seconds

    secs = {"generate": 10.0, "evaluate": 4.0, "update": 1.0, "detect": 2.0, "preference": 5.0}
    # default: describer 1 CPU + drawer 1 CPU while generating, 1 CPU for every other stage
    # cpu = 2*10 + 4 + 1 + 2 + 5 = 32
    assert resource_seconds(load_config(), secs) == {"cpu": 32.0, "gpu": 0.0}
    gpu_cfg = load_config(overrides=["describer.resources.num_gpus=1", "describer.resources.replicas=2",
                                     "drawer.resources.num_gpus=1", "evaluator.use_gpu=true", "evaluator.num_workers=4"])
    # gpu = (1*2 + 1*1) * 10 + 4 workers * 1 GPU * 4 s = 46; cpu = (1*2 + 1)*10 + 4*1*4 + 1 + 2 + 5 = 54
    assert resource_seconds(gpu_cfg, secs) == {"cpu": 54.0, "gpu": 46.0}


def test_detect_stage_resources_follow_the_configured_detector():
    from kka_ray.config import load_config
    from kka_ray.metrics import stage_resources

    assert stage_resources(load_config(overrides=["detector.num_workers=3"]), "detect") == (3.0, 0.0)
    simplenet = load_config(overrides=["detector.name=simplenet", "detector.simplenet.num_workers=2",
                                       "detector.simplenet.resources_per_worker={CPU: 4}"])
    assert stage_resources(simplenet, "detect") == (8.0, 0.0)
    assert stage_resources(load_config(overrides=["detector.name=ssd", "detector.num_workers=3"]), "detect") == (1.0, 0.0)


def test_money_prices_each_roles_gpus_by_its_accelerator_type():
    from kka_ray.config import load_config
    from kka_ray.metrics import stage_money, stage_resources

    cfg = load_config(overrides=[
        "describer.resources.num_gpus=1", "describer.resources.replicas=2",
        "describer.resources.resources={accelerator_type:H100: 0.001}",
        "drawer.resources.num_gpus=1", "drawer.resources.resources={accelerator_type:A10G: 0.001}",
        "cost.cpu_per_hour=0.1", "cost.gpu_per_hour=9.0", "cost.accelerators={H100: 4.0, A10G: 1.0}"])
    # an hour of generating: 2 describers (1 CPU + 1 H100 each) + 1 drawer (1 CPU + 1 A10G)
    assert stage_money(cfg, "generate", 3600.0, cfg.cost) == pytest.approx(3 * 0.1 + 2 * 4.0 + 1 * 1.0)
    # a GPU whose type has no price, or no type at all, costs gpu_per_hour
    plain = load_config(overrides=["preference.resources.num_gpus=2", "cost.cpu_per_hour=0.1", "cost.gpu_per_hour=9.0"])
    assert stage_money(plain, "preference", 1800.0, plain.cost) == pytest.approx((0.1 + 2 * 9.0) / 2)
    workers = load_config(overrides=["preference.num_workers=4", "preference.resources.num_gpus=1"])
    assert stage_resources(workers, "preference") == (4.0, 4.0)  # a Ray Train DPO job: every worker's share
    assert stage_money(plain, "update", None, plain.cost) == 0.0
