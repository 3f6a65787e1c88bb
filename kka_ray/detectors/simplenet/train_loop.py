"""Ray Train worker loop for SimpleNet (Liu et al., CVPR 2023), run by
:func:`kka_ray.training.ray_fit.fit_torch`.

Input: the ``"train"`` shard with columns ``x`` (frozen-backbone patch features per image,
float ``(P, sum C_l)``) and ``label`` (0 normal, 1 generated anomaly), and optionally
``"val"`` (whole on every worker, same columns: held-out normals 0, generated anomalies 1).

Each *meta epoch* (``cfg.epochs``; reference 40) makes ``cfg.gan_epochs`` passes (reference 4)
over the shard in batches of ``cfg.batch_size`` images. A step takes every patch of the
batch's normal images and of its anomaly images, and trains the adaptor (AdamW,
``adaptor_lr``) and the discriminator (Adam, ``dsc_lr``, weight decay 1e-5) together on the
truncated L1 loss (:mod:`kka_ray.detectors.simplenet.loss`); the negatives are the perturbed
adapted normals plus the adapted anomaly patches. After each meta epoch the validation AUROC
of the image score ``max over patches of -D`` picks the kept state (the released code picks
it on test data; the engine never does).

Every worker reports the same number of times (:class:`ReportThrottle` after each meta epoch
but the last, then :func:`report_final`), whose checkpoint holds ``head.safetensors`` (the
selected state), ``head_last.safetensors`` (the last one) and ``meta.json``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from kka_ray.config import SimpleNetSection
from kka_ray.detectors.simplenet.loss import truncated_l1_loss
from kka_ray.detectors.simplenet.torch_model import SimpleNetHead, build_head
from kka_ray.training.checkpoint import read_checkpoint, write_checkpoint
from kka_ray.training.ray_fit import (
    EpochSelector, ReportThrottle, global_sum, read_val, report_final, shuffled_batches, unwrap, validation_auroc,
    worker_setup,
)

logger = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
LAST_HEAD_FILE = "head_last.safetensors"
CHECKPOINT_DIR_NAME = "simplenet_final"
FORMAT_VERSION = 1
DSC_WEIGHT_DECAY = 1e-5  # released code: Adam(discriminator, dsc_lr, weight_decay=1e-5)
VAL_BATCH_IMAGES = 256


def head_from_config(cfg: SimpleNetSection, layer_channels: list[int], mean: list[float] | None = None,
                     std: list[float] | None = None) -> SimpleNetHead:
    """The head for ``cfg``; the standardiser statistics default to identity (a checkpoint sets them)."""
    return build_head(layer_channels, cfg.embed_dim, cfg.dsc_hidden, cfg.dsc_layers, mean, std)


def image_scores(head: SimpleNetHead, x: torch.Tensor, batch: int = VAL_BATCH_IMAGES) -> torch.Tensor:
    """``max over patches of -D(adapt(x))`` per image of ``x`` (N, P, C), in eval mode."""
    was_training = head.training
    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            out.append((-head(xb.flatten(0, 1))).view(len(xb), -1).amax(1))
    head.train(was_training)
    return torch.cat(out) if out else x.new_zeros(0)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """One SimpleNet worker; ``config``: ``simplenet`` (SimpleNetSection dict), ``layer_channels``,
    ``feature_mean``/``feature_std`` (per channel, from the training normals), ``n_patches``, ``seed``,
    optional ``torch_threads``. Returns the per-meta-epoch history."""
    import ray.train
    import ray.train.torch

    t_start = time.perf_counter()
    cfg = SimpleNetSection.model_validate(config["simplenet"])
    layer_channels = [int(c) for c in config["layer_channels"]]
    w = worker_setup(config)  # the same initial weights on every worker
    rank, world, device, seed = w.rank, w.world, w.device, w.seed
    dtypes = {"x": torch.float32, "label": torch.int64}
    # only rank 0 chooses the epoch and writes the checkpoint
    val = read_val("val", {"x": torch.float32, "label": torch.float32}) if rank == 0 else None

    head = head_from_config(cfg, layer_channels, config.get("feature_mean"), config.get("feature_std"))
    model = ray.train.torch.prepare_model(head)
    raw: SimpleNetHead = unwrap(model)
    opt_adaptor = torch.optim.AdamW(raw.adaptor.parameters(), lr=cfg.adaptor_lr)
    opt_dsc = torch.optim.Adam(raw.discriminator.parameters(), lr=cfg.dsc_lr, weight_decay=DSC_WEIGHT_DECAY)
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(seed * 1_000_003 + rank)
    throttle = ReportThrottle(rank, world, device)

    history: list[dict[str, Any]] = []
    chosen = EpochSelector()
    images = {"normal": 0.0, "anomaly": 0.0}
    passes = 0
    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        model.train()
        # loss sum, steps, normal rows, noise negatives, anomaly negatives, normal rows past th, negatives past -th
        sums = [0.0] * 7
        for _ in range(cfg.gan_epochs):
            n_img = {"normal": 0, "anomaly": 0}
            for batch in shuffled_batches(w, cfg.batch_size, dtypes, passes):
                x, label = batch["x"], batch["label"]
                is_anom = label == 1
                normal, anomalies = x[~is_anom].flatten(0, 1), x[is_anom].flatten(0, 1)
                n_img["normal"] += int((~is_anom).sum())
                n_img["anomaly"] += int(is_anom.sum())
                n_normal = len(normal)
                scores = model(torch.cat([normal, anomalies]), n_normal=n_normal, noise_std=cfg.noise_std, generator=noise_gen)
                loss, stats = truncated_l1_loss(scores[:n_normal], scores[n_normal:], cfg.margin)
                opt_adaptor.zero_grad(set_to_none=True)
                opt_dsc.zero_grad(set_to_none=True)
                loss.backward()
                opt_adaptor.step()
                opt_dsc.step()
                n_neg = len(scores) - n_normal
                sums[0] += float(loss.detach())
                sums[1] += 1
                sums[2] += n_normal
                sums[3] += n_normal  # one perturbed copy per normal row
                sums[4] += len(anomalies)
                sums[5] += stats["p_true"] * n_normal
                sums[6] += stats["p_fake"] * n_neg
            passes += 1
            if epoch == 0 and passes == 1:
                images = {k: float(v) for k, v in n_img.items()}
        sums = global_sum(sums, device, world)
        n_negatives = sums[3] + sums[4]
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": sums[0] / max(sums[1], 1.0),
            "p_true": sums[5] / max(sums[2], 1.0),
            "p_fake": sums[6] / max(n_negatives, 1.0),
            "n_normal_rows": int(sums[2]),
            "n_noise_negatives": int(sums[3]),
            "n_anomaly_negatives": int(sums[4]),
        }
        if val is not None:
            scores = image_scores(raw, val["x"].to(device))
            metrics["val_auroc"] = validation_auroc(scores.double().cpu().numpy(), val["label"].cpu().numpy())
            chosen.update(epoch + 1, metrics["val_auroc"], raw.state_dict)
        history.append({**metrics, "seconds": time.perf_counter() - t_epoch})
        if rank == 0:
            logger.info("SimpleNet meta epoch %d/%d: loss %.5f p_true %.3f p_fake %.3f val_auroc %s", epoch + 1,
                        cfg.epochs, metrics["loss"], metrics["p_true"], metrics["p_fake"], metrics.get("val_auroc"))
        if epoch < cfg.epochs - 1:
            throttle.maybe_report(metrics)

    totals = global_sum([images["normal"], images["anomaly"]], device, world)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "layer_channels": layer_channels,
        "n_patches": int(config.get("n_patches", 0)),
        "history": history,
        "seed": seed,
        "world_size": world,
        "num_normal_images": int(totals[0]),
        "num_anomaly_images": int(totals[1]),
        "loop_seconds": time.perf_counter() - t_start,
        **chosen.meta(cfg.epochs, history[-1].get("val_auroc")),
    }
    last_state = raw.state_dict()
    selected = chosen.state if chosen.state is not None else last_state

    def write(directory: str) -> None:
        write_checkpoint_files(directory, selected, last_state, meta)

    report_final(metrics, rank, write, CHECKPOINT_DIR_NAME)
    return history


# ---------------------------------------------------------------------------------------
# checkpoint files (safetensors + JSON; nothing is pickled)


def write_checkpoint_files(directory: str | os.PathLike, selected: dict[str, torch.Tensor],
                           last: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``head.safetensors`` (selected), ``head_last.safetensors`` (last epoch), ``meta.json``."""
    write_checkpoint(directory, {HEAD_FILE: selected, LAST_HEAD_FILE: last}, meta)


def read_checkpoint_files(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`write_checkpoint_files` wrote; a missing file is a clear error."""
    states, meta = read_checkpoint(directory, [HEAD_FILE, LAST_HEAD_FILE], "SimpleNet", FORMAT_VERSION)
    return states[HEAD_FILE], states[LAST_HEAD_FILE], meta
