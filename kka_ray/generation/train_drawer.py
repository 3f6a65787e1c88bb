"""Training of the default drawer ``G`` (Eq. 4, ``x_a = G(t_a)``) on Fashion-MNIST's training split.

The drawer is ``KKAPixelDiffusionPipeline``: a small pixel-space ``UNet2DConditionModel``
conditioned on the frozen all-MiniLM-L6-v2 token states. This module teaches its UNet to draw
Fashion-MNIST items from free-form text:

- captions come from the class names through many templates, synonyms, adjectives and
  class-specific descriptive paraphrases (``build_captions``); all distinct captions are
  encoded by MiniLM once, exactly as the pipeline encodes prompts (same tokenizer call);
- diffusion loss: v-prediction on the cosine (``squaredcos_cap_v2``) schedule of
  ``make_pixel_scheduler``, with Min-SNR-5 loss weights (Hang et al., ICCV 2023);
- classifier-free guidance (Ho & Salimans 2022): the caption is replaced by the empty prompt
  ``""`` with probability ``cfg_drop``, so the pipeline's guidance against ``""`` is learned;
- AdamW with warm-up and cosine decay over ``max(step/steps, elapsed/time_budget)``, an EMA of
  the UNet weights (what is saved), periodic checkpoints.

Only the TRAINING split is read. The output directory holds the drawer assets
(``unet/``, ``scheduler/``, ``drawer_info.json``) that ``build_drawer.assemble_pixel_drawer``
turns into a full pipeline around MiniLM. Command line:
``python -m kka_ray.generation.train_drawer OUT_DIR --steps 3000 --device auto``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kka_ray.data.fashion_mnist import CLASS_SYNONYMS  # the drawer learns every synonym

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# captions

GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of {a}", "a picture of {a}", "an image of {a}", "{a}", "a black and white photo of {a}",
    "a grayscale picture of {a}", "a product photo of {a}", "a small photo of {a}", "a centered photo of {a}",
    "a low resolution photo of {a}", "this is {a}", "{a} on a black background", "a catalogue image of {a}",
    "a photo of the {n}", "a close-up photo of {a}", "a sketch of {a}",
)  # fmt: skip
ADJECTIVE_TEMPLATES: tuple[str, ...] = ("{a}", "a photo of {a}", "a picture of {a}")
ADJECTIVES: tuple[str, ...] = (
    "plain", "simple", "dark", "light", "white", "black", "grey", "striped", "patterned", "new", "old",
    "casual", "classic", "small", "large", "worn", "clean", "modern", "cheap", "fancy", "elegant", "bright",
)  # fmt: skip
# Descriptive paraphrases per class (the benchmark's held-out paraphrases are disjoint from these).
CLASS_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "t-shirt/top": ("a short-sleeved cotton t-shirt", "a plain tee with a round neck", "a sleeveless top",
                    "a t-shirt with a printed logo", "a simple summer top", "a crew neck t-shirt"),
    "trouser": ("a pair of long trousers", "a pair of blue jeans", "long pants with two legs",
                "a pair of slim fit pants", "trousers with belt loops", "a pair of sweatpants"),
    "pullover": ("a long-sleeved pullover", "a warm wool sweater", "a knitted jumper with long sleeves",
                 "a hoodie without a zip", "a cozy winter sweater", "a crew neck sweatshirt"),
    "dress": ("a long summer dress", "a sleeveless dress", "a dress with a flared skirt", "an evening gown",
              "a knee-length dress", "a dress with short sleeves"),
    "coat": ("a long coat with buttons", "a zipped jacket with long sleeves", "a warm winter coat", "a rain jacket",
             "a coat with a collar and pockets", "a hooded parka"),
    "sandal": ("a pair of summer sandals", "an open-toe sandal with straps", "a flat sandal", "a high-heeled sandal",
               "a beach flip-flop", "a sandal with thin straps"),
    "shirt": ("a button-down shirt with a collar", "a long-sleeved shirt", "a checked flannel shirt",
              "a formal dress shirt", "a loose blouse", "a shirt with a breast pocket"),
    "sneaker": ("a pair of running sneakers", "a low-top sneaker with laces", "a white sports shoe",
                "a canvas trainer", "a casual sneaker", "a tennis shoe"),
    "bag": ("a handbag with a strap", "a leather purse", "a tote bag with handles", "a shopping bag",
            "a small clutch bag", "a bag with a zipper"),
    "ankle boot": ("a pair of leather boots", "an ankle boot with a heel", "a warm winter boot",
                   "a lace-up ankle boot", "a short suede boot", "a chelsea boot"),
}  # fmt: skip


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def build_captions(class_names: Sequence[str], max_per_class: int = 100, seed: int = 0) -> list[list[str]]:
    """Distinct captions per class: templates x synonyms, adjective variants and descriptive paraphrases.

    Every caption list contains ``"a photo of a <class name>"``; at most ``max_per_class`` per
    class (a seeded sample of the generic/adjective ones; the paraphrases are always kept).
    """
    rng = random.Random(seed)
    out: list[list[str]] = []
    for name in class_names:
        if name not in CLASS_SYNONYMS:
            raise ValueError(f"no caption vocabulary for class {name!r}: the drawer trainer knows {list(CLASS_SYNONYMS)}")
        names = CLASS_SYNONYMS[name]
        generic = {t.format(a=_with_article(n), n=n) for t in GENERIC_TEMPLATES for n in names}
        generic |= {t.format(a=_with_article(f"{adj} {n}")) for t in ADJECTIVE_TEMPLATES for adj in ADJECTIVES for n in names}
        fixed = [f"a photo of {_with_article(name)}", *CLASS_PARAPHRASES[name]]
        rest = sorted(generic - set(fixed))
        rng.shuffle(rest)
        out.append(fixed + rest[: max(0, max_per_class - len(fixed))])
    return out


# ----------------------------------------------------------------------------------------
# training


@dataclass
class DrawerTrainingConfig:
    """Everything that decides one training run of the drawer's UNet."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    image_size: int = 28
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    cross_attention_levels: tuple[int, ...] = (2,)
    text_time_embedding: bool = False
    cfg_drop: float = 0.12
    ema_decay: float = 0.995
    snr_gamma: float = 5.0
    captions_per_class: int = 60
    max_train_images: int | None = None
    device: str = "auto"
    threads: int | None = 2
    seed: int = 0
    time_budget_s: float | None = None
    checkpoint_every_s: float = 300.0
    log_every: int = 50


def encode_captions(text_encoder, tokenizer, captions: Sequence[str], max_length: int, batch_size: int = 64):
    """MiniLM token states ``(N, max_length, hidden)`` and masks ``(N, max_length)``, encoded by the
    pipeline's own :func:`~kka_ray.generation.pixel_pipeline.encode_text`, ``batch_size`` at a time."""
    import torch

    from kka_ray.generation.pixel_pipeline import encode_text

    states, masks = [], []
    with torch.no_grad():
        for i in range(0, len(captions), batch_size):
            s, m = encode_text(text_encoder, tokenizer, list(captions[i : i + batch_size]), max_length)
            states.append(s)
            masks.append(m)
    return torch.cat(states), torch.cat(masks)


def images_to_tensor(images, image_size: int):
    """uint8 ``(N, H, W)`` -> float ``(N, 1, S, S)`` in [-1, 1] (zero-padded / resized to ``image_size``)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)
    h = x.shape[-1]
    if image_size == h:
        return x
    if image_size > h and (image_size - h) % 2 == 0:
        p = (image_size - h) // 2
        return F.pad(x, (p, p, p, p), value=-1.0)
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_unet_steps(unet, scheduler, images, labels, states, masks, caption_ids, empty_state, empty_mask, cfg: DrawerTrainingConfig, *, device, on_checkpoint=None) -> dict:
    """The training loop proper; returns the loss history and the EMA state dict.

    ``images`` float ``(N, 1, S, S)`` in [-1, 1]; ``labels`` int64 ``(N,)``; ``states``/``masks``
    the encoded captions; ``caption_ids[c]`` the caption rows of class ``c``.
    """
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    live = unet.state_dict()  # detached views of the parameters and buffers: updated in place by the optimiser
    ema = {k: v.detach().clone().float() for k, v in live.items()}
    ema_float = [ema[k] for k, v in live.items() if v.dtype.is_floating_point]
    live_float = [v for v in live.values() if v.dtype.is_floating_point]
    ema_other = [(ema[k], v) for k, v in live.items() if not v.dtype.is_floating_point]
    alphas = scheduler.alphas_cumprod.to(device)
    snr_all = alphas / (1.0 - alphas)
    class_ids = [torch.as_tensor(ids, dtype=torch.long) for ids in caption_ids]
    states, masks = states.to(device), masks.to(device)
    empty_state, empty_mask = empty_state.to(device), empty_mask.to(device)
    n = images.shape[0]
    losses: list[float] = []
    start = last_ckpt = time.time()
    for step in range(cfg.steps):
        elapsed = time.time() - start
        progress = step / cfg.steps
        if cfg.time_budget_s:
            progress = max(progress, elapsed / cfg.time_budget_s)
            if progress >= 1.0:
                logger.info("time budget of %.0f s reached after %d steps", cfg.time_budget_s, step)
                break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(progress, step, cfg.warmup_steps)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = images[idx].to(device)
        lab = labels[idx]
        rows = torch.stack([class_ids[c][torch.randint(0, len(class_ids[c]), (1,), generator=gen)][0] for c in lab.tolist()])
        rows = rows.to(device)
        ctx, ctx_mask = states[rows], masks[rows]
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_drop).to(device)
        ctx = torch.where(drop[:, None, None], empty_state.expand_as(ctx), ctx)
        ctx_mask = torch.where(drop[:, None], empty_mask.expand_as(ctx_mask), ctx_mask)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=ctx, encoder_attention_mask=ctx_mask).sample
        snr = snr_all[t]
        weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1.0)  # Min-SNR-gamma for v-prediction
        loss = (weight * (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema_float, decay)
            torch._foreach_add_(ema_float, [v.float() for v in live_float], alpha=1.0 - decay)
            for e, v in ema_other:
                e.copy_(v)
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = losses[-cfg.log_every :]
            logger.info("step %d: loss %.4f, lr %.2e, %.1f s", step + 1, sum(recent) / len(recent), opt.param_groups[0]["lr"], time.time() - start)
        if on_checkpoint is not None and time.time() - last_ckpt > cfg.checkpoint_every_s:
            on_checkpoint(ema, step + 1, time.time() - start, losses)
            last_ckpt = time.time()
    else:
        step = cfg.steps
    return {"losses": losses, "ema": ema, "steps_done": step, "wall_s": time.time() - start}


def save_drawer_assets(out_dir: str | os.PathLike, unet, ema: dict, info: dict) -> Path:
    """Write ``unet/`` (EMA weights, safetensors), ``scheduler/`` and ``drawer_info.json`` to ``out_dir`` (atomically per file set)."""
    import copy
    import hashlib

    from kka_ray.data.store import write_json_atomic
    from kka_ray.generation.build_drawer import INFO_FILE, make_pixel_scheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    export = copy.deepcopy(unet).to("cpu").eval()
    export.load_state_dict(ema)  # copy_ casts each tensor to the parameter's dtype
    export.save_pretrained(out / "unet", safe_serialization=True)
    make_pixel_scheduler().save_pretrained(out / "scheduler")
    digest = hashlib.sha256((out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    write_json_atomic({**info, "unet_sha256": digest}, out / INFO_FILE)
    return out


def train_pixel_drawer(
    out_dir: str | os.PathLike,
    config: DrawerTrainingConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
) -> Path:
    """Train the default drawer's UNet on the Fashion-MNIST training split; return ``out_dir`` (drawer assets).

    ``cache_dir`` is the model cache where MiniLM is extracted (default: the project's model
    cache, ``paths.model_cache`` or ``$KKA_CACHE``).
    """
    import numpy as np
    import torch

    from kka_ray.config import PathsSection
    from kka_ray.data.fashion_mnist import load_fashion_mnist
    from kka_ray.generation.build_drawer import make_pixel_scheduler, make_pixel_unet
    from kka_ray.generation.minilm import load_minilm, prepare_minilm
    from kka_ray.generation.pixel_pipeline import DEFAULT_MAX_TEXT_LENGTH

    cfg = config or DrawerTrainingConfig()
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"steps, batch_size must be >= 1 and lr > 0, got {cfg.steps}, {cfg.batch_size}, {cfg.lr}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from kka_ray.devices import resolve_device

    dev = torch.device(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    cache = Path(cache_dir).expanduser() if cache_dir else PathsSection().cache_dir()
    text_encoder, tokenizer = load_minilm(prepare_minilm(cache))

    data = load_fashion_mnist(data_path, split="train")  # the training split only, never test
    images, labels = data.images, np.asarray(data.labels)
    if cfg.max_train_images:
        keep = np.random.default_rng(cfg.seed).permutation(len(labels))[: cfg.max_train_images]
        images, labels = images[keep], labels[keep]
    x = images_to_tensor(images, cfg.image_size)
    y = torch.as_tensor(labels, dtype=torch.long)

    per_class = build_captions(data.class_names, cfg.captions_per_class, cfg.seed)
    flat = [c for caps in per_class for c in caps]
    offsets = np.cumsum([0] + [len(c) for c in per_class])
    caption_ids = [list(range(offsets[i], offsets[i + 1])) for i in range(len(per_class))]
    t0 = time.time()
    # Cross-attention masks the padding, so padding to the longest caption (not the pipeline's
    # max_text_length) gives the same token states for the real tokens, at a fraction of the cost.
    # The pooled text-time embedding does not mask, so it needs the pipeline's exact padding.
    longest = max(len(ids) for ids in tokenizer(flat)["input_ids"])
    length = DEFAULT_MAX_TEXT_LENGTH if cfg.text_time_embedding else min(DEFAULT_MAX_TEXT_LENGTH, longest)
    states, masks = encode_captions(text_encoder, tokenizer, flat, length)
    empty_state, empty_mask = encode_captions(text_encoder, tokenizer, [""], length)
    logger.info("encoded %d captions in %.1f s; %d training images on %s", len(flat), time.time() - t0, len(y), dev)

    unet = make_pixel_unet(
        image_size=cfg.image_size, channels=1, cross_attention_dim=text_encoder.config.hidden_size,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        cross_attention_levels=cfg.cross_attention_levels, text_time_embedding=cfg.text_time_embedding,
    )  # fmt: skip
    n_params = sum(p.numel() for p in unet.parameters())
    scheduler = make_pixel_scheduler()
    base_info = {
        "format": "kka-pixel-drawer-assets/1",
        "dataset": "fashion-mnist train split",
        "class_names": list(data.class_names),
        "num_captions": len(flat), "max_text_length": DEFAULT_MAX_TEXT_LENGTH,
        "unet_params": n_params,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "device": str(dev),
        "torch": torch.__version__,
    }

    def checkpoint(ema, done, wall, losses):
        tail = losses[-200:]
        save_drawer_assets(out_dir, unet, ema, {**base_info, "steps_done": done, "train_wall_s": round(wall, 1), "final_loss": sum(tail) / len(tail), "partial": True})
        logger.info("checkpoint after %d steps written to %s", done, out_dir)

    result = train_unet_steps(unet, scheduler, x, y, states, masks, caption_ids, empty_state, empty_mask, cfg, device=dev, on_checkpoint=checkpoint)
    tail = result["losses"][-200:] or [float("nan")]
    info = {**base_info, "steps_done": result["steps_done"], "train_wall_s": round(result["wall_s"], 1), "final_loss": sum(tail) / len(tail), "partial": False}
    out = save_drawer_assets(out_dir, unet, result["ema"], info)
    logger.info("drawer trained: %d steps in %.0f s (%.2fM params), assets in %s", result["steps_done"], result["wall_s"], n_params / 1e6, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kka_ray.generation.train_drawer OUT_DIR [options]``."""
    defaults = DrawerTrainingConfig()
    parser = argparse.ArgumentParser(prog="python -m kka_ray.generation.train_drawer", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where to write unet/, scheduler/ and drawer_info.json (e.g. kka_ray/assets/kka-pixel-drawer)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda[:N] or auto")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds (the LR schedule follows it)")
    parser.add_argument("--max-train-images", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="model cache for MiniLM (default: paths.model_cache, ~/.cache/kka_ray or $KKA_CACHE)")
    parser.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: the system dataset)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = dataclasses.replace(
        defaults, steps=args.steps, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        device=args.device, seed=args.seed, time_budget_s=args.time_budget, max_train_images=args.max_train_images,
        threads=args.threads or None,
    )  # fmt: skip
    train_pixel_drawer(args.out_dir, config, cache_dir=args.cache_dir, data_path=args.data_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
