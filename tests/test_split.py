"""The loop's evaluate and update stages over two iterations on a constructed case where the new
"anomalies" are known: real Fashion-MNIST test images of the normal class's look-alikes (shirts,
for T-shirt normals) and of far classes (sneakers, bags). The stores stand in for the generate and
guard stages (the drawer is replaced by real images, so the right split is known); everything else
is the engine's own: prep's real EfficientNet-Lite0 features, the confusion evaluator trained on
Ray Train, the quantile threshold, the anomaly set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_overrides
from kka_ray.config import load_config
from kka_ray.cluster import init_ray
from kka_ray.loop import KKARun

pytestmark = pytest.mark.slow

SHIRT, SNEAKER, BAG = 6, 7, 8


def _store_rows(run: KKARun, k: int, images: np.ndarray, kinds: list[str]):
    import io

    import pyarrow as pa
    from PIL import Image

    from kka_ray.data.store import anomaly_id

    n = len(images)
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    ids = [anomaly_id(run.name, k, i, 0) for i in range(n)]
    raw, ok = run._anomaly_features(pa.table({"id": ids, "image": pngs}))
    assert ok.all()
    cols = {
        "id": ids, "run": [run.name] * n, "iteration": [k] * n, "prompt_id": list(range(n)), "sample_idx": [0] * n,
        "cluster": [0] * n, "prompt": ["p"] * n, "description": ["d"] * n, "text": [f"a photo of a {t}" for t in kinds],
        "image": pngs, "seed": [0] * n, "adapter_version": [k - 1] * n, "distance": [float("nan")] * n,
        "is_hard": [False] * n, "features": [list(map(float, r)) for r in raw], "guard_reason": [None] * n,
        "normal_score": [float("nan")] * n, "text_similarity": [float("nan")] * n,
    }
    run.store.write(k, pa.table(cols))


@pytest.mark.parametrize("reference", ["current", "first"])
def test_two_iterations_split_look_alikes_hard_and_far_classes_easy(tiny_cache, tmp_path, reference):
    from kka_ray.data.fashion_mnist import load_fashion_mnist

    cfg = load_config(overrides=tiny_overrides(tiny_cache) + [
        "data.max_normal_train=2000", "knowledge.image_size=64", "evaluator.hidden_dims=[]", "evaluator.rep_dim=256",
        "evaluator.epochs=20", f"evaluator.split_reference={reference}", "evaluator.reference_hard_max=0.25"])
    run = KKARun.create(cfg, str(tmp_path / "run"))
    test = load_fashion_mnist(split="test")
    rng = np.random.default_rng(0)
    started = init_ray(cfg)
    try:
        run.prep()
        hard_shares, taus = [], []
        for k in (1, 2):
            picks = {c: rng.choice(np.flatnonzero(test.labels == c), 12, replace=False) for c in (SHIRT, SNEAKER, BAG)}
            kinds = ["shirt"] * 12 + ["sneaker"] * 12 + ["bag"] * 12
            _store_rows(run, k, np.concatenate([test.images[picks[c]] for c in (SHIRT, SNEAKER, BAG)]), kinds)
            result = run.evaluate(k)
            run.state.mark(f"iter{k}.evaluate")
            run.update(k)
            run.state.mark(f"iter{k}.update")
            rows = run.store.read([k], columns=["text", "distance", "is_hard"]).to_pylist()
            hard = {t: np.mean([r["is_hard"] for r in rows if r["text"].endswith(t)]) for t in ("shirt", "sneaker", "bag")}
            # non-degenerate, and the look-alikes are harder than the far classes
            assert 0.0 < result["hard_fraction"] < 1.0, result
            assert hard["shirt"] > max(hard["sneaker"], hard["bag"]), hard
            d = {t: np.median([r["distance"] for r in rows if r["text"].endswith(t)]) for t in ("shirt", "sneaker", "bag")}
            assert d["shirt"] < min(d["sneaker"], d["bag"]), d
            if reference == "first":  # the yardstick's tau: at most the cap's share of iteration 1 hard
                assert result["tau"] <= result["tau_normals"] and result["tau_capped"] == (result["tau"] < result["tau_normals"])
                assert k == 2 or result["hard_fraction"] <= 0.25
            else:  # the cap is only the fixed yardstick's
                assert result["tau"] == result["tau_normals"] and not result["tau_capped"]
            hard_shares.append(result["hard_fraction"])
            taus.append(result["tau"])
            if k == 2:  # trained on iteration 1's anomaly set, it separates the new ones better
                assert result["n_trained_anomalies"] + result["n_val_anomalies"] == 36
                assert result["evaluator_new_auroc"] > 0.9
                if reference == "current":  # both taus are the normals' quantile: the trained one confuses fewer
                    assert result["hard_fraction_ref"] >= result["hard_fraction_current"]
                    assert result["hard_fraction"] == result["hard_fraction_current"] and taus[1] != taus[0]
                else:  # iteration 1's (normals-only) evaluator splits again: its tau, its hard share
                    assert result["split_iteration"] == 1 and taus[1] == taus[0]
                    assert result["hard_fraction"] == result["hard_fraction_ref"]
        assert json.loads((run.dir / "sets" / "iter_2.json").read_text()) and len(hard_shares) == 2
    finally:
        if started:
            import ray

            ray.shutdown()
