"""Ray Train worker loop for ReContrast (Guo et al., NeurIPS 2023) with KKA's anomaly term.

``train_loop_per_worker`` runs in each worker of the engine's one Ray Train path
(:func:`kka_ray.training.ray_fit.fit_torch`). Its ``"train"`` shard has columns ``x`` (float
image (3, S, S), ImageNet-normalised) and ``label`` (0 normal, 1 generated anomaly); the
optional ``"val"`` dataset (held-out normals + generated anomalies, whole on every worker) picks
the epoch with the best validation AUROC. Per batch (released ``recontrast_mvtec.py``):

1. ``alpha = hook_alpha(it, total_iters, ...)``; one forward of the whole batch through E_t,
   E_f, the bottleneck and the decoder (so BatchNorm sees the batch as it is);
2. normal rows: :func:`~kka_ray.detectors.recontrast.loss.recontrast_loss` (two
   cross-reconstruction branches, easy-point hook); anomaly rows:
   :func:`~kka_ray.detectors.recontrast.loss.anomaly_term`;
3. AdamW on bottleneck + decoder (``decoder_lr``) and AdamW on E_t (``encoder_lr``), betas
   (0.9, 0.999), both stepped every iteration.

Iterations: ``epochs`` passes over the shard, capped at ``total_iters`` when set (the released
code runs a fixed 2000-3000 iterations); the alpha ramp is over that total. Every epoch is
recorded (loss, normal loss, anomaly term and distance, alpha, validation AUROC); reports are
throttled (:class:`~kka_ray.training.ray_fit.ReportThrottle`) and the final report carries the
checkpoint: ``model.safetensors`` (E_t, bottleneck, decoder of the selected epoch),
``model_last.safetensors`` (the last epoch, when another was selected) and ``meta.json``.
E_f is the pretrained Lite0 from the model cache and is not saved.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch

from kka_ray.config import ReContrastSection
from kka_ray.detectors.recontrast.loss import anomaly_term, hook_alpha, recontrast_loss, reconstruction_distance
from kka_ray.detectors.recontrast.torch_model import (
    ReContrastNet, build_recontrast_net, image_scores, smoothing_sigma,
)
from kka_ray.training.checkpoint import read_checkpoint, write_checkpoint
from kka_ray.training.ray_fit import (
    EpochSelector, ReportThrottle, global_sum, read_val, report_final, shuffled_batches, unwrap, validation_auroc,
    worker_setup,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
LAST_MODEL_FILE = "model_last.safetensors"
CHECKPOINT_DIR_NAME = "recontrast_final"
FORMAT_VERSION = 1
BETAS = (0.9, 0.999)  # released AdamW betas for both optimisers
# Rows per forward when scoring validation images (eval mode, no gradients).
SCORE_BATCH = 64
# BatchNorm cannot train on one row: smaller batches are skipped (equally on every worker).
MIN_BATCH = 2


def iteration_plan(n_rows: int, world: int, batch_size: int, epochs: int, total_iters: int | None) -> tuple[int, int, int]:
    """``(steps_per_epoch, total_iters, epochs_to_run)`` for ``n_rows`` split equally over ``world`` workers."""
    rows = n_rows // world
    steps = rows // batch_size + (1 if rows % batch_size >= MIN_BATCH else 0)
    if steps < 1:
        raise ValueError(f"{n_rows} training rows over {world} worker(s) leave fewer than {MIN_BATCH} per worker")
    total = epochs * steps if total_iters is None else min(epochs * steps, int(total_iters))
    return steps, total, math.ceil(total / steps)


def score_images(net: ReContrastNet, x: torch.Tensor, cfg: ReContrastSection, image_size: int,
                 batch_size: int = SCORE_BATCH) -> torch.Tensor:
    """Image anomaly scores (eval mode, no gradients) of normalised images ``x`` (n, 3, S, S)."""
    was_training = net.training
    net.eval()
    sigma = smoothing_sigma(cfg.score_sigma, image_size)
    device = next(net.decoder.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            amap = net.anomaly_map(x[i : i + batch_size].to(device), sigma)
            out.append(image_scores(amap, cfg.score_max_ratio).double().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One ReContrast worker. ``config``: ``recontrast`` (ReContrastSection dict), ``cache_dir``,
    ``image_size``, ``n_train``, ``n_anomalies``, ``seed``, optional ``torch_threads``."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    cfg = ReContrastSection.model_validate(config["recontrast"])
    image_size = int(config["image_size"])
    w = worker_setup(config)  # the same new layers on every worker
    rank, world, device = w.rank, w.world, w.device
    dtypes = {"x": torch.float32, "label": torch.float32}
    steps, total_iters, epochs = iteration_plan(int(config["n_train"]), world, cfg.batch_size, cfg.epochs, cfg.total_iters)

    raw = build_recontrast_net(config["cache_dir"], cfg.encoder_bn_train, cfg.encoder_bn_momentum)
    fingerprint = raw.frozen_fingerprint()
    net = ray.train.torch.prepare_model(raw)
    raw = unwrap(net)
    opt_dec = torch.optim.AdamW(list(raw.decoder.parameters()) + list(raw.bottleneck.parameters()),
                                lr=cfg.decoder_lr, betas=BETAS, weight_decay=cfg.weight_decay)
    opt_enc = torch.optim.AdamW(raw.encoder.parameters(), lr=cfg.encoder_lr, betas=BETAS, weight_decay=cfg.weight_decay)
    val = read_val("val", dtypes) if rank == 0 else None  # only rank 0 selects and writes the checkpoint

    throttle = ReportThrottle(rank, world, device)
    history: list[dict[str, Any]] = []
    chosen = EpochSelector()
    it = 0
    if rank == 0:
        logger.info("ReContrast: %d epoch(s) x %d step(s), %d iterations, %d worker(s)", epochs, steps, total_iters, world)
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        net.train()
        sums = np.zeros(6)  # loss*rows, normal loss*normal rows, normal rows, term*anom rows, d_anom sum, anom rows
        alpha = hook_alpha(it, total_iters, cfg.alpha_start, cfg.alpha_end, cfg.ramp_fraction)
        for batch in shuffled_batches(w, cfg.batch_size, dtypes, epoch):
            if it >= total_iters:
                break
            x, label = batch["x"], batch["label"]
            if x.shape[0] < MIN_BATCH:
                continue
            alpha = hook_alpha(it, total_iters, cfg.alpha_start, cfg.alpha_end, cfg.ramp_fraction)
            targets, recons = net(x)
            anom = label > 0.5
            n_anom = int(anom.sum())
            n_norm = x.shape[0] - n_anom
            if n_anom == 0:
                normal_loss = recontrast_loss(targets, recons, alpha, cfg.hook_factor)
                term, d_anom = normal_loss.new_zeros(()), normal_loss.new_zeros(0)
            else:
                keep = ~anom
                normal_loss = (recontrast_loss([t[keep] for t in targets], [r[keep] for r in recons], alpha, cfg.hook_factor)
                               if n_norm > 0 else x.new_zeros(()))
                d_anom = reconstruction_distance([t[anom] for t in targets], [r[anom] for r in recons])
                term = anomaly_term(d_anom, cfg.anomaly_margin, cfg.anomaly_weight)
            loss = normal_loss + term
            opt_dec.zero_grad(set_to_none=True)
            opt_enc.zero_grad(set_to_none=True)
            loss.backward()
            opt_dec.step()
            opt_enc.step()
            it += 1
            sums += [loss.item() * x.shape[0], normal_loss.item() * n_norm, n_norm, term.item() * n_anom,
                     float(d_anom.detach().sum()), n_anom]
        s = global_sum(sums.tolist() + [float(it)], device, world)
        rows = s[2] + s[5]
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "iterations": it, "alpha": alpha,
            "loss": s[0] / max(rows, 1.0), "normal_loss": s[1] / max(s[2], 1.0),
            "anomaly_term": s[3] / max(s[5], 1.0) if s[5] else None,
            "anomaly_distance": s[4] / max(s[5], 1.0) if s[5] else None,
        }
        if val is not None:
            scores = score_images(raw, val["x"], cfg, image_size)
            metrics["val_auroc"] = validation_auroc(scores.numpy(), val["label"].cpu().numpy())
            chosen.update(epoch + 1, metrics["val_auroc"], raw.trainable_state_dict)
        history.append({**metrics, "seconds": time.perf_counter() - t_epoch})
        if rank == 0:
            logger.info("ReContrast epoch %d/%d: loss %.5f (normal %.5f), alpha %.2f, val AUROC %s",
                        epoch + 1, epochs, metrics["loss"], metrics["normal_loss"], alpha, metrics.get("val_auroc"))
        reported = {k: v for k, v in metrics.items() if v is not None}
        if epoch < epochs - 1:
            throttle.maybe_report(reported)
            continue
        meta = {
            "format_version": FORMAT_VERSION, "config": cfg.model_dump(mode="json"), "image_size": image_size,
            "seed": w.seed, "world_size": world, "history": history, "epochs": epochs, "steps_per_epoch": steps,
            "total_iters": total_iters, "iterations": it, "n_train": int(config["n_train"]),
            "n_anomalies": int(config.get("n_anomalies", 0)), "frozen_fingerprint": fingerprint,
            **chosen.meta(epoch + 1, metrics.get("val_auroc")), "loop_seconds": time.perf_counter() - t_start,
        }
        use, last = chosen.states(epoch + 1, {k: v.detach().cpu() for k, v in raw.trainable_state_dict().items()})

        def write(directory: str) -> None:
            write_checkpoint_files(directory, use, last, meta)

        report_final(reported, rank, write, CHECKPOINT_DIR_NAME)
    return history


# ---------------------------------------------------------------------------------------
# checkpoint files (safetensors + JSON; nothing is pickled)


def write_checkpoint_files(directory: str | os.PathLike, state: dict[str, torch.Tensor],
                           last_state: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    """``model.safetensors`` (+ ``model_last.safetensors`` when given) and ``meta.json``."""
    write_checkpoint(directory, {MODEL_FILE: state, LAST_MODEL_FILE: last_state}, meta)


def read_checkpoint_files(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """What :func:`write_checkpoint_files` wrote: (selected state, last state or None, meta)."""
    states, meta = read_checkpoint(directory, [MODEL_FILE], "ReContrast", FORMAT_VERSION, optional=(LAST_MODEL_FILE,))
    return states[MODEL_FILE], states[LAST_MODEL_FILE], meta
