"""Ray Train worker loop for Deep SAD (method.md Eq. 5; Ruff et al., ICLR 2020).

``train_loop_per_worker`` runs inside each ``ray.train.torch.TorchTrainer`` worker (Ray
Train v2). It reads its shard of the ``"train"`` Ray Dataset (columns ``x``: float tensor,
``label``: semi-label in {-1, 0, +1}), then

1. optionally pre-trains a bias-free autoencoder (sum-of-squares reconstruction loss) and
   copies its encoder weights into phi,
2. computes the centre ``c`` with one forward pass in eval mode, summing phi and counts
   over all workers (``torch.distributed.all_reduce`` when the world size is > 1); with
   ``init_scale: unit`` a second pass rescales phi's last layer (and ``c``) so the mean squared
   distance of the non-anomalous rows starts at 1,
3. trains phi with Adam on the Deep SAD loss for ``epochs`` epochs (DDP via
   ``prepare_model``), reporting the mean loss per epoch; every worker reports the same
   number of times, and the last report carries the checkpoint (rank 0 writes it):
   ``model.safetensors`` (phi's state dict), ``center.safetensors`` and ``meta.json``
   (config, input shape, loss history; Train v2 keeps metrics only with checkpoints).

With a ``"val"`` dataset (held-out normals and generated anomalies) the epoch with the best
validation AUROC is kept as phi and the last one as ``model_last.safetensors``. Intermediate
epochs are reported through :class:`kka_ray.training.ray_fit.ReportThrottle` (at most every 2 s,
equally often on every worker); ``meta.json`` keeps every epoch's loss regardless.

The checkpoint file helpers at the bottom are shared with :mod:`kka_ray.detectors.deep_sad.train`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from kka_ray.config import DeepSADSection
from kka_ray.detectors.deep_sad.loss import center_from_sums, deep_sad_loss
from kka_ray.detectors.deep_sad.torch_model import build_autoencoder, build_network
from kka_ray.training.checkpoint import read_checkpoint, write_checkpoint
from kka_ray.training.ray_fit import (
    EpochSelector, ReportThrottle, global_sum, read_val, report_final, shuffled_batches, unwrap, validation_auroc,
    worker_setup,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
LAST_MODEL_FILE = "model_last.safetensors"  # the last epoch's phi, when validation chose another
CENTER_FILE = "center.safetensors"
CHECKPOINT_DIR_NAME = "deep_sad_final"
FORMAT_VERSION = 1
LR_GAMMA = 0.1  # released code: MultiStepLR(gamma=0.1) at the milestones


def deep_sad_fields(cfg: DeepSADSection) -> dict[str, Any]:
    """The DeepSADSection fields of ``cfg`` (also of its Evaluator/Detector subclasses), JSON-ready."""
    dumped = cfg.model_dump(mode="json")
    return {k: dumped[k] for k in DeepSADSection.model_fields}


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One Deep SAD worker; ``config``: ``deep_sad`` (DeepSADSection dict), ``in_shape``, ``seed``,
    optional ``torch_threads``. Returns the loss history (Result.return_value on rank 0)."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    cfg = DeepSADSection.model_validate(config["deep_sad"])
    in_shape = tuple(int(s) for s in config["in_shape"])
    w = worker_setup(config)
    rank, world, device, seed = w.rank, w.world, w.device, w.seed
    dtypes = {"x": torch.float32, "label": torch.float32}

    def batches(epoch: int | None):
        return shuffled_batches(w, cfg.batch_size, dtypes, epoch)

    history: list[dict[str, Any]] = []
    net = build_network(cfg, in_shape)
    # "val" (optional; rank 0 reads it, as only rank 0 chooses and writes): held-out normals (label 0) and generated anomalies
    # (label 1); the epoch with the best validation AUROC is kept, never one chosen on test.
    val = read_val("val", {"x": torch.float32, "label": torch.float32}) if rank == 0 else None

    # 1. optional autoencoder pre-training; its encoder initialises phi
    if cfg.pretrain_autoencoder:
        ae = ray.train.torch.prepare_model(build_autoencoder(cfg, in_shape))
        opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for epoch in range(cfg.ae_epochs):
            t_epoch = time.perf_counter()
            ae.train()
            total, n = 0.0, 0
            for batch in batches(epoch):
                x = batch["x"]
                if x.shape[0] < 2:  # BatchNorm cannot train on one row; shards are equal, so all skip alike
                    continue
                loss = ((ae(x) - x) ** 2).flatten(1).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * x.shape[0], n + x.shape[0]
            total, n = global_sum([total, n], device, world)
            history.append({"stage": "pretrain", "epoch": epoch + 1, "loss": total / max(n, 1.0),
                            "seconds": time.perf_counter() - t_epoch})
            if rank == 0:
                logger.info("Deep SAD AE pre-training epoch %d/%d: loss %.6f", epoch + 1, cfg.ae_epochs, history[-1]["loss"])
        net.load_state_dict(unwrap(ae).encoder.state_dict())
        del ae, opt

    net = ray.train.torch.prepare_model(net)
    raw = unwrap(net)

    # 2. centre c: mean of phi over the training data (one pass, eval mode), summed over workers
    raw.eval()
    sum_phi = torch.zeros(cfg.rep_dim, dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for batch in batches(None):
            phi = raw(batch["x"])
            sum_phi += phi.sum(0).to(torch.float64)
            count += phi.shape[0]
    totals = global_sum([*sum_phi.tolist(), float(count)], device, world)
    center = center_from_sums(torch.tensor(totals[:-1]), totals[-1]).to(device)
    num_samples = int(totals[-1])
    if cfg.init_scale == "unit":
        # Rescale phi's last (bias-free) layer so the mean squared distance of the non-anomalous
        # training rows starts at 1: at the raw scale of standardised features distances are in the
        # hundreds and an anomaly's gradient (1/d^2) vanishes, so labelled anomalies teach nothing.
        sum_d, n_d = 0.0, 0.0
        with torch.no_grad():
            for batch in batches(None):
                keep = batch["label"] >= 0
                d = ((raw(batch["x"][keep]) - center) ** 2).sum(1)
                sum_d, n_d = sum_d + float(d.sum()), n_d + float(keep.sum())
        sum_d, n_d = global_sum([sum_d, n_d], device, world)
        scale = (n_d / max(sum_d, 1e-12)) ** 0.5
        with torch.no_grad():
            raw.code.weight.mul_(scale)
        center = center_from_sums(torch.tensor(totals[:-1]) * scale, totals[-1]).to(device)
    if rank == 0:
        logger.info("Deep SAD centre from %d samples (%.1f s into the worker)", num_samples, time.perf_counter() - t_start)

    # 3. Deep SAD training
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=LR_GAMMA)
    throttle = ReportThrottle(rank, world, device)
    chosen = EpochSelector()
    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        net.train()
        total, n = 0.0, 0
        for batch in batches(cfg.ae_epochs + epoch if cfg.pretrain_autoencoder else epoch):
            x, labels = batch["x"], batch["label"]
            if x.shape[0] < 2:
                continue
            dist_sq = ((net(x) - center) ** 2).sum(1)
            loss = deep_sad_loss(dist_sq, labels, eta=cfg.eta, eps=cfg.eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * x.shape[0], n + x.shape[0]
        sched.step()
        total, n = global_sum([total, n], device, world)
        metrics = {"epoch": epoch + 1, "loss": total / max(n, 1.0)}
        if val is not None:
            metrics["val_auroc"] = _val_auroc(raw, center, val)
            chosen.update(epoch + 1, metrics["val_auroc"], raw.state_dict)
        history.append({"stage": "deep_sad", **metrics, "seconds": time.perf_counter() - t_epoch})
        if rank == 0:
            logger.info("Deep SAD epoch %d/%d: loss %.6f", epoch + 1, cfg.epochs, metrics["loss"])
        if epoch < cfg.epochs - 1:
            throttle.maybe_report(metrics)
            continue
        meta = {
            "format_version": FORMAT_VERSION,
            "config": deep_sad_fields(cfg),
            "in_shape": list(in_shape),
            "history": history,
            "seed": seed,
            "world_size": world,
            "num_samples": num_samples,
            "loop_seconds": time.perf_counter() - t_start,  # worker-side wall, for cost accounting
            **chosen.meta(cfg.epochs, metrics.get("val_auroc")),
        }
        use, last = chosen.states(cfg.epochs, raw.state_dict())
        report_final(metrics, rank, lambda d: write_checkpoint_files(d, use, center, meta, last), CHECKPOINT_DIR_NAME)
    return history


def _val_auroc(net: torch.nn.Module, center: torch.Tensor, val: dict[str, torch.Tensor]) -> float | None:
    """Validation AUROC of ``||phi(x) - c||^2`` (eval mode), labels 1 = anomaly."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        x = val["x"].to(center.device)
        scores = torch.cat([((net(x[i : i + 1024]) - center) ** 2).sum(1) for i in range(0, len(x), 1024)])
    net.train(was_training)
    return validation_auroc(scores.double().cpu().numpy(), val["label"].cpu().numpy())


# ---------------------------------------------------------------------------------------
# checkpoint files (safetensors + JSON; nothing is pickled)


def write_checkpoint_files(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], center: torch.Tensor,
                           meta: dict[str, Any], last_state: dict[str, torch.Tensor] | None = None) -> None:
    """``model.safetensors`` (phi), ``center.safetensors``, ``meta.json`` (+ ``model_last.safetensors``)."""
    write_checkpoint(directory, {MODEL_FILE: state_dict, CENTER_FILE: {"center": center.detach().to(torch.float32)},
                                 LAST_MODEL_FILE: last_state}, meta)


def read_checkpoint_files(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """Read what :func:`write_checkpoint_files` wrote; a missing file is a clear error."""
    states, meta = read_checkpoint(directory, [MODEL_FILE, CENTER_FILE], "Deep SAD", FORMAT_VERSION)
    return states[MODEL_FILE], states[CENTER_FILE]["center"], meta
