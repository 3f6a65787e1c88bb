"""Deep SAD (method.md Eq. 5) and the hard/easy split (Eq. 6).

Hand-worked numbers for the loss, the centre rule and the thresholds; structural checks of
the bias-free networks; one real Ray Train (TorchTrainer, Ray Data shard) fit on a tiny
synthetic set through the public ``DeepSAD`` API, its safetensors checkpoint and a
save/load round trip.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kka_ray.config import DeepSADSection, EvaluatorSection
from kka_ray.evaluator import cap_threshold, distance_threshold, hard_fraction, split_hard_easy
from kka_ray.detectors.deep_sad.loss import center_from_sums, deep_sad_loss
from kka_ray.detectors.deep_sad.torch_model import (
    CNNAutoencoder,
    CNNNet,
    MLPAutoencoder,
    MLPNet,
    build_autoencoder,
    build_network,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# Eq. 5: loss and centre


def test_loss_all_three_labels_by_hand():
    d = torch.tensor([4.0, 1.0, 0.5, 2.0, 9.0], dtype=torch.float64)
    y = torch.tensor([0, 1, -1, 1, -1])
    # eta = 1, eps = 0.5:
    #   label  0: d                 = 4
    #   label +1: (1 + 0.5)^1       = 1.5
    #   label -1: (0.5 + 0.5)^-1    = 1
    #   label +1: (2 + 0.5)^1       = 2.5
    #   label -1: (9 + 0.5)^-1      = 0.105263157894737
    #   mean = (4 + 1.5 + 1 + 2.5 + 0.105263157894737) / 5 = 9.105263157894737 / 5 = 1.821052631578947
    assert deep_sad_loss(d, y, eta=1.0, eps=0.5).item() == pytest.approx(1.821052631578947, rel=1e-12)
    # eta = 2 scales only the labelled terms:
    #   4 + 2*1.5 + 2*1 + 2*2.5 + 2*0.105263157894737 = 14.210526315789474; / 5 = 2.842105263157895
    assert deep_sad_loss(d, y, eta=2.0, eps=0.5).item() == pytest.approx(2.842105263157895, rel=1e-12)


def test_loss_default_eps_keeps_inverse_finite():
    # a known anomaly exactly at the centre: (0 + 1e-6)^-1 = 1e6 (finite); an unlabeled
    # sample at d = 3 adds 3 and ignores eps; mean = (1e6 + 3) / 2 = 500001.5
    d = torch.tensor([0.0, 3.0], dtype=torch.float64)
    y = torch.tensor([-1, 0])
    assert deep_sad_loss(d, y).item() == pytest.approx(500001.5, rel=1e-9)
    # a known normal: eta * (d + eps) = 1 * (3 + 1e-6) = 3.000001
    assert deep_sad_loss(d[1:], torch.tensor([1])).item() == pytest.approx(3.000001, rel=1e-12)


def test_loss_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="semi-labels"):
        deep_sad_loss(torch.ones(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        deep_sad_loss(torch.ones(2), torch.tensor([0, 1, 1]))


def test_center_rule_pushes_small_coordinates_to_plus_minus_eps():
    sums = torch.tensor([1.0, -0.3, 0.1, -0.1, 0.0, 0.6, 0.26])
    # / 2 -> [0.5, -0.15, 0.05, -0.05, 0.0, 0.3, 0.13]; |c_i| < 0.1 -> +-0.1 with sign, 0 -> +0.1
    c = center_from_sums(sums, 2)
    assert torch.allclose(c, torch.tensor([0.5, -0.15, 0.1, -0.1, 0.1, 0.3, 0.13]), atol=1e-7)
    with pytest.raises(ValueError, match="0 samples"):
        center_from_sums(sums, 0)


# ---------------------------------------------------------------------------------------
# networks


def _assert_bias_free(module: torch.nn.Module) -> None:
    names = [n for n, _ in module.named_parameters()]
    assert names and not any(n.endswith("bias") for n in names), names
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        assert bn.affine is False and bn.weight is None and bn.bias is None


@pytest.mark.parametrize(
    "net",
    [
        MLPNet(16, [32, 8], 4),
        MLPAutoencoder(16, [32, 8], 4),
        CNNNet(1, 28, 32),
        CNNAutoencoder(1, 28, 32),
        CNNNet(3, 32, 16),
        CNNAutoencoder(3, 32, 16),
    ],
    ids=["mlp", "mlp-ae", "lenet28", "lenet28-ae", "lenet32", "lenet32-ae"],
)
def test_networks_have_no_bias_and_no_affine_batchnorm(net):
    _assert_bias_free(net)


def test_network_shapes_and_autoencoder_initialises_phi():
    cfg = DeepSADSection(network="cnn", rep_dim=32)
    phi, ae = build_network(cfg, (1, 28, 28)), build_autoencoder(cfg, (1, 28, 28))
    assert [m.out_channels for m in phi.convs] == [8, 4]  # Ruff et al.'s MNIST LeNet
    x = torch.randn(3, 1, 28, 28)
    assert phi(x).shape == (3, 32) and ae(x).shape == x.shape
    phi.load_state_dict(ae.encoder.state_dict(), strict=True)
    phi.eval(), ae.eval()
    assert torch.equal(phi(x), ae.encoder(x))
    cifar = build_network(DeepSADSection(network="cnn", rep_dim=16), (3, 32, 32))
    assert [m.out_channels for m in cifar.convs] == [32, 64, 128] and cifar(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    mlp = build_network(DeepSADSection(hidden_dims=[8], rep_dim=4), (16,))
    assert mlp(torch.randn(5, 16)).shape == (5, 4)
    with pytest.raises(ValueError, match="divisible"):
        CNNNet(1, 30, 8)
    with pytest.raises(ValueError, match="square images"):
        build_network(DeepSADSection(network="cnn"), (64,))


# ---------------------------------------------------------------------------------------
# Eq. 6: threshold and split


def test_threshold_rules_by_hand():
    d = np.array([0.2, 1.5, 0.7, 3.0, 1.1])
    assert distance_threshold(d) == 3.0  # default: the maximum held-out normal distance
    # sorted [0.2, 0.7, 1.1, 1.5, 3.0]; q = 0.5 -> position 4*0.5 = 2 -> 1.1
    assert distance_threshold(d, "quantile", 0.5) == pytest.approx(1.1)
    # q = 0.9 -> position 3.6 -> 1.5 + 0.6 * (3.0 - 1.5) = 2.4
    assert distance_threshold(d, "quantile", 0.9) == pytest.approx(2.4)
    with pytest.raises(ValueError, match="empty"):
        distance_threshold(np.array([]))
    with pytest.raises(ValueError, match="non-finite"):
        distance_threshold(np.array([1.0, np.nan]))


def test_split_hard_easy_and_top_m():
    d = np.array([0.5, 3.0, 2.5, 4.0, 1.1, 10.0])
    hard, easy = split_hard_easy(d, tau=2.5)  # d <= 2.5 is hard (2.5 itself included)
    assert hard.tolist() == [True, False, True, False, True, False]
    assert easy.tolist() == [False, True, False, True, False, True]
    # only the 2 farthest easy ones: 10.0 (idx 5) and 4.0 (idx 3); 3.0 is neither hard nor easy
    hard2, easy2 = split_hard_easy(d, tau=2.5, easy_top_m=2)
    assert hard2.tolist() == hard.tolist()
    assert easy2.tolist() == [False, False, False, True, False, True]
    assert split_hard_easy(d, 2.5, easy_top_m=10)[1].tolist() == easy.tolist()
    assert hard_fraction(hard) == 0.5  # 3 of 6
    assert hard_fraction(np.zeros(0, dtype=bool)) == 0.0


def test_cap_threshold_keeps_at_most_the_share_hard():
    d = np.array([0.5, 3.0, 2.5, 4.0, 1.1, 10.0])  # sorted: 0.5, 1.1, 2.5, 3.0, 4.0, 10.0
    assert cap_threshold(d, tau=2.5, max_share=0.5) == 2.5  # 3 of 6 hard: within the cap, tau stays
    assert cap_threshold(d, tau=5.0, max_share=0.5) == 2.5  # 5 of 6 would be hard: at most 3
    assert cap_threshold(d, tau=5.0, max_share=0.4) == 1.1  # floor(2.4) = 2 of 6
    tau = cap_threshold(d, tau=5.0, max_share=0.1)  # not even one may be hard
    assert tau < 0.5 and not split_hard_easy(d, tau)[0].any()
    # a tie across the cut: 1.1 twice, at most 2 of 5 hard -> only 0.5 (never 3 of 5)
    tied = np.array([0.5, 1.1, 1.1, 3.0, 4.0])
    assert cap_threshold(tied, tau=5.0, max_share=0.4) == 0.5
    for share in (0.2, 0.5, 0.6, 0.9):
        rng = np.random.default_rng(3)
        x = rng.gamma(2.0, size=41)
        assert hard_fraction(split_hard_easy(x, cap_threshold(x, x.max(), share))[0]) <= share
    with pytest.raises(ValueError, match="max_share"):
        cap_threshold(d, 1.0, 0.0)


# ---------------------------------------------------------------------------------------
# Ray Train end to end


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    shift = 1.5
    return {
        "normal": rng.normal(size=(256, 16)).astype(np.float32),
        "anomalies": (rng.normal(size=(32, 16)) + shift).astype(np.float32),
        "val": rng.normal(size=(100, 16)).astype(np.float32),
        "test_normal": rng.normal(size=(200, 16)).astype(np.float32),
        "test_anomalies": (rng.normal(size=(200, 16)) + shift).astype(np.float32),
    }


@pytest.fixture(scope="module")
def fitted(ray_two_cpus, data, tmp_path_factory):
    from kka_ray.detectors.deep_sad import DeepSAD

    # an EvaluatorSection (a DeepSADSection subclass) as the engine passes it
    cfg = EvaluatorSection(hidden_dims=[32], rep_dim=8, epochs=12, batch_size=32, lr=3e-3,
                           pretrain_autoencoder=True, ae_epochs=2)
    storage = tmp_path_factory.mktemp("ray_train")
    return DeepSAD(cfg, storage_path=str(storage), seed=0).fit(data["normal"], data["anomalies"], name="sad")


@pytest.mark.slow
def test_fit_scores_anomalies_above_normals(fitted, data):
    s_norm = fitted.decision_function(data["test_normal"])
    s_anom = fitted.decision_function(data["test_anomalies"])
    assert _auroc(s_norm, s_anom) > 0.9
    hist = [h["loss"] for h in fitted.history_ if h["stage"] == "deep_sad"]
    assert len(hist) == 12 and hist[-1] < hist[0]
    assert [h["stage"] for h in fitted.history_[:2]] == ["pretrain", "pretrain"]
    assert np.all(np.abs(fitted.center_) >= 0.1 - 1e-7)  # the centre rule held in the loop
    tau = fitted.set_threshold(data["val"])  # max rule: no validation normal lies above tau
    assert tau == pytest.approx(fitted.decision_function(data["val"]).max())
    assert fitted.predict(data["val"]).sum() == 0
    assert fitted.predict(data["test_anomalies"]).mean() > 0.5


@pytest.mark.slow
def test_checkpoint_is_safetensors_and_round_trips(fitted, data, tmp_path):
    from safetensors import safe_open

    from kka_ray.detectors.deep_sad import DeepSAD
    from kka_ray.detectors.deep_sad.train import DeepSADState

    ckpt = fitted.checkpoint_path_
    assert os.path.basename(ckpt) == "deep_sad_final"
    for name in ("model.safetensors", "center.safetensors", "meta.json"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "code.weight" in keys and not any(k.endswith("bias") for k in keys)
    with safe_open(os.path.join(ckpt, "center.safetensors"), "pt") as fh:
        assert tuple(fh.get_tensor("center").shape) == (8,)
    meta = json.loads(open(os.path.join(ckpt, "meta.json")).read())
    assert meta["in_shape"] == [16] and meta["config"]["rep_dim"] == 8 and len(meta["history"]) == 14
    assert meta["num_samples"] == 256 + 32

    x = np.r_[data["test_normal"], data["test_anomalies"]]
    ref = fitted.decision_function(x)
    assert np.array_equal(DeepSADState.load(ckpt).score(x), ref)
    fitted.set_threshold(data["val"], rule="quantile", q=0.9)
    fitted.save(tmp_path / "det")
    loaded = DeepSAD.load(tmp_path / "det")
    assert np.array_equal(loaded.decision_function(x), ref)
    assert loaded.threshold_ == fitted.threshold_
    assert np.array_equal(loaded.predict(x), fitted.predict(x))


@pytest.mark.slow
def test_arrays_become_a_tensor_dataset_with_its_shape(ray_two_cpus):
    from kka_ray.detectors.deep_sad.train import _dataset_in_shape, arrays_to_dataset

    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    labels = np.r_[np.zeros(30, np.int64), -np.ones(10, np.int64)]
    ds = arrays_to_dataset(x, labels, num_workers=2, seed=1)
    assert _dataset_in_shape(ds) == (3,)
    rows = ds.take_all()
    got = sorted((tuple(r["x"].tolist()), int(r["label"])) for r in rows)
    assert got == sorted((tuple(a.tolist()), int(b)) for a, b in zip(x, labels))
    with pytest.raises(ValueError, match="semi_labels"):
        arrays_to_dataset(x, np.full(40, 2), num_workers=1)



@pytest.mark.slow
def test_confusion_evaluator_splits_unseen_anomalies_by_closeness(ray_two_cpus, tmp_path):
    """The evaluator trains on normals + the anomaly set, then splits new anomalies it has not seen:
    the ones that lie among the normals are hard, the far ones easy; a quantile threshold keeps the
    split non-degenerate where the maximum of held-out normals would call everything hard."""
    from kka_ray.evaluator import ConfusionEvaluator

    rng = np.random.default_rng(1)
    normal = rng.normal(size=(400, 16)).astype(np.float32)
    heldout = rng.normal(size=(120, 16)).astype(np.float32)
    heldout[0] += 12.0  # one outlying held-out normal
    anomaly_set = (rng.normal(size=(40, 16)) + 3.0).astype(np.float32)  # D_a: far ones
    val_anomalies = (rng.normal(size=(20, 16)) + 3.0).astype(np.float32)
    close = (rng.normal(size=(30, 16)) * 0.9).astype(np.float32)  # new anomalies inside the normal region
    far = (rng.normal(size=(30, 16)) + 3.0).astype(np.float32)
    cfg = EvaluatorSection(hidden_dims=[32], rep_dim=8, epochs=15, batch_size=64, lr=3e-3, threshold="quantile", quantile=0.9)
    ev = ConfusionEvaluator(cfg, seed=0).fit(normal, anomaly_set, heldout, val_anomalies=val_anomalies,
                                             storage_path=tmp_path, name="ev")
    d_close, d_far = ev.score(close), ev.score(far)
    hard_close, _ = ev.split(d_close)
    hard_far, easy_far = ev.split(d_far)
    assert hard_close.mean() > 0.6 and hard_far.mean() < 0.2 and easy_far.mean() > 0.8
    assert ev.val_auroc_ > 0.95 and ev.auroc(far) > 0.95 and ev.auroc(close) < 0.7
    assert ev.tau_ == pytest.approx(np.quantile(ev.score(heldout), 0.9))
    # the paper's rule: the one outlying normal sets tau, and the far anomalies turn hard too
    assert ev.score(heldout).max() > np.quantile(d_far, 0.5)
    # saved and loaded, it scores and splits the same
    ev.save(tmp_path / "saved")
    loaded = ConfusionEvaluator.load(tmp_path / "saved", cfg)
    assert np.array_equal(loaded.score(far), d_far) and loaded.tau_ == ev.tau_
    assert np.array_equal(loaded.split(d_close)[0], hard_close)
    # a cap on the share of the close ones that may be hard lowers tau below the normals' quantile,
    # and the saved evaluator keeps both
    assert ev.cap(d_close, 0.3) and hard_fraction(ev.split(d_close)[0]) <= 0.3 and ev.tau_ < ev.tau_normals_
    assert not ev.cap(d_close, 0.3)  # already within it
    ev.save(tmp_path / "capped")
    capped = ConfusionEvaluator.load(tmp_path / "capped", cfg)
    assert (capped.tau_, capped.tau_normals_) == (ev.tau_, ev.tau_normals_) and capped.tau_normals_ == loaded.tau_


@pytest.mark.slow
def test_two_ray_train_workers_fit_as_one(ray_two_cpus, data, tmp_path):
    """Deep SAD (the evaluator's and the SAD detector's model) on two Ray Train workers (gloo DDP,
    each worker half of the rows) against one worker, same seed: the centre ``c`` is the mean of the
    same initial phi over all rows, so it agrees to float precision; the weights then follow
    different mini-batches (two half-batches averaged by DDP), so the fits agree in what they are
    for, test AUROC within 0.03, not bit for bit."""
    from kka_ray.detectors.deep_sad import DeepSAD

    fits = {}
    for workers in (1, 2):
        cfg = EvaluatorSection(hidden_dims=[32], rep_dim=8, epochs=12, batch_size=32, lr=3e-3,
                               pretrain_autoencoder=False, num_workers=workers)
        fits[workers] = DeepSAD(cfg, storage_path=str(tmp_path / "train"), seed=0).fit(
            data["normal"], data["anomalies"], name=f"sad_{workers}w")
    metas = {w: json.loads(open(os.path.join(f.checkpoint_path_, "meta.json")).read()) for w, f in fits.items()}
    assert [metas[1]["world_size"], metas[2]["world_size"]] == [1, 2]
    assert metas[1]["num_samples"] == metas[2]["num_samples"] == 256 + 32  # every row counted once across workers
    np.testing.assert_allclose(fits[2].center_, fits[1].center_, rtol=1e-4, atol=1e-5)
    aurocs = {w: _auroc(f.decision_function(data["test_normal"]), f.decision_function(data["test_anomalies"]))
              for w, f in fits.items()}
    assert min(aurocs.values()) > 0.9 and abs(aurocs[2] - aurocs[1]) < 0.03, aurocs
    losses = {w: [h["loss"] for h in f.history_ if h["stage"] == "deep_sad"] for w, f in fits.items()}
    assert losses[2][-1] < losses[2][0] and losses[1][-1] < losses[1][0]


def test_one_cpu_worker_fits_in_process_as_on_a_worker_actor(ray_two_cpus, data, tmp_path):
    """Ray Train's local mode (``in_process``, the default for one CPU worker) against a worker
    actor, same seed: no Ray Train worker process starts, the checkpoint is kept where Ray Train
    keeps it, torch's thread count is the caller's again, and the fit is the same fit (the centre
    to float precision, test AUROC within 0.01)."""
    import torch

    from kka_ray.detectors.deep_sad import DeepSAD

    threads, before = torch.get_num_threads(), _train_worker_pids()
    fits = {}
    for in_process in (True, False):
        cfg = EvaluatorSection(hidden_dims=[32], rep_dim=8, epochs=6, batch_size=32, lr=3e-3,
                               pretrain_autoencoder=False, in_process=in_process,
                               resources_per_worker={"CPU": 2 if threads == 1 else 1})
        fits[in_process] = DeepSAD(cfg, storage_path=str(tmp_path / "train"), seed=0).fit(
            data["normal"], data["anomalies"], name=f"sad_{in_process}")
        if in_process:
            assert _train_worker_pids() == before, "the in-process fit started a Ray Train worker"
            assert torch.get_num_threads() == threads
    local = fits[True].checkpoint_path_
    assert local.startswith(str(tmp_path / "train" / "sad_True")) and os.path.isfile(os.path.join(local, "model.safetensors"))
    np.testing.assert_allclose(fits[True].center_, fits[False].center_, rtol=1e-4, atol=1e-5)
    aurocs = [_auroc(f.decision_function(data["test_normal"]), f.decision_function(data["test_anomalies"]))
              for f in fits.values()]
    assert abs(aurocs[0] - aurocs[1]) < 0.01, aurocs


def _train_worker_pids() -> set[int]:
    from conftest import own_ray_pids

    return own_ray_pids("RayTrainWorker")


@pytest.mark.slow
def test_a_killed_ray_train_worker_is_replaced_and_the_fit_completes(ray_two_cpus, data, tmp_path):
    """A Ray Train worker killed (SIGKILL, as an OOM kill or a lost node) in the middle of a Deep SAD
    fit: Ray Train's FailureConfig starts a new worker, the fit runs again from its start and
    finishes with every epoch and its checkpoint; the killed process is gone."""
    import signal
    import time

    from conftest import start_background
    from kka_ray.detectors.deep_sad import DeepSAD

    before = _train_worker_pids()
    cfg = EvaluatorSection(hidden_dims=[32], rep_dim=8, epochs=300, batch_size=16, lr=1e-3, pretrain_autoencoder=False,
                           in_process=False)
    thread, result = start_background(lambda: DeepSAD(cfg, storage_path=str(tmp_path / "rt"), seed=0).fit(
        data["normal"], data["anomalies"], name="killed"))
    deadline, victim = time.monotonic() + 300, None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        new = _train_worker_pids() - before
        if new:
            time.sleep(4.0)  # let it start training
            victim = min(new)
        else:
            time.sleep(0.5)
    assert victim is not None, "no Ray Train worker process appeared"
    os.kill(victim, signal.SIGKILL)
    replacement = None
    while replacement is None and thread.is_alive():
        replacement = next(iter(_train_worker_pids() - before - {victim}), None)
        time.sleep(0.2)
    thread.join(timeout=900)
    assert replacement is not None, "the killed worker was not replaced (did the fit end before the kill?)"
    assert "error" not in result, result.get("error")
    det = result["value"]
    assert len([h for h in det.history_ if h["stage"] == "deep_sad"]) == 300
    assert os.path.isfile(os.path.join(det.checkpoint_path_, "model.safetensors"))
    assert victim not in _train_worker_pids()
