"""Quality check of the default drawer ``G`` (Eq. 4, ``x_a = G(t_a)``) on Fashion-MNIST.

1. A small CNN classifier is trained on the real Fashion-MNIST TRAINING images (or loaded from
   its safetensors cache); its test accuracy is reported (it must exceed 90 % to be a judge).
2. The drawer, assembled from the shipped assets + MiniLM (``prepare_default_drawer``) and
   loaded through ``DiffusersImageGenerator`` like in a run, draws
   (a) ``"a photo of a <class>"`` images and (b) images for held-out paraphrases that never
   appeared in training (checked against ``build_captions``). The classifier labels them:
   mean per-class accuracy for (a) and (b) (goals: >= 80 % and >= 60 %).
3. Diversity: mean pairwise L2 distance between generated images of a class divided by the
   same figure for as many real test images of that class (1.0 = as varied as real data).
4. Speed: images per second for batches of 64 at the given steps / guidance.

Writes ``benchmarks/results/drawer_quality.json`` and ``benchmarks/results/drawer_samples.png``.
Run: ``python benchmarks/drawer_quality.py [--assets DIR] [--steps 12 --guidance 3]
[--sweep 8:2,12:3,20:3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from machine import machine  # benchmarks/machine.py

logger = logging.getLogger("drawer_quality")

RESULTS = Path(__file__).resolve().parent / "results"
# Held-out paraphrases: none of these strings is a training caption (asserted at run time).
HELD_OUT: dict[str, tuple[str, ...]] = {
    "t-shirt/top": ("a white t-shirt with short sleeves and a v-neck", "a basic cotton top for the gym",
                    "a loose fitting tee for summer", "a graphic tee with a round collar"),
    "trouser": ("a pair of high waisted denim trousers", "long straight-leg pants for the office",
                "a pair of baggy cargo pants", "black formal trousers"),
    "pullover": ("a thick knitted sweater for winter", "a woolen jumper with a high neck",
                 "a grey turtleneck pullover", "a soft fleece sweatshirt with long sleeves"),
    "dress": ("an elegant long dress for a party", "a short dress with thin shoulder straps",
              "a flowing maxi dress", "a cocktail dress"),
    "coat": ("a heavy padded winter jacket with a zipper", "a long trench coat with a belt",
             "a leather jacket with pockets", "a wool overcoat with large buttons"),
    "sandal": ("a pair of open summer sandals with thin straps", "a leather sandal for the beach",
               "a strappy high heel sandal", "a gladiator sandal"),
    "shirt": ("a checked shirt with buttons and a pocket", "a formal white shirt with long sleeves",
              "a denim shirt with a collar", "a plaid flannel shirt for autumn"),
    "sneaker": ("a pair of white running shoes with laces", "a sporty trainer for jogging",
                "a low canvas sneaker with a rubber sole", "a basketball shoe"),
    "bag": ("a leather handbag with a long shoulder strap", "a large shopping tote",
            "a small purse for the evening", "a travel bag with handles"),
    "ankle boot": ("a pair of high leather boots with laces", "a black ankle boot with a thick heel",
                   "a rugged hiking boot", "a suede boot with a zipper"),
}  # fmt: skip


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks + an MLP head: about 92 % Fashion-MNIST test accuracy after 3 epochs."""

    def __init__(self, n_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 64))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _to_input(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, 28, 28) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).float().div(127.5).sub(1.0).unsqueeze(1)
    if x.shape[-1] != 28:
        x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return x


def predict(model: nn.Module, images_u8: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(_to_input(images_u8[i : i + batch])).argmax(1).numpy() for i in range(0, len(images_u8), batch)])


def get_classifier(cache: Path, epochs: int = 3, seed: int = 0) -> tuple[nn.Module, float]:
    """Train (or load from ``cache``) the judge CNN on the training split; return it and its test accuracy."""
    from safetensors.torch import load_file, save_file

    from kka_ray.data.fashion_mnist import load_fashion_mnist

    test = load_fashion_mnist(split="test")
    model = SmallCNN()
    if cache.is_file():
        model.load_state_dict(load_file(str(cache)))
    else:
        train = load_fashion_mnist(split="train")
        torch.manual_seed(seed)
        x, y = _to_input(train.images), torch.as_tensor(np.asarray(train.labels), dtype=torch.long)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(y) + 127) // 128))
        t0 = time.time()
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(y))
            for i in range(0, len(y), 128):
                idx = perm[i : i + 128]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            logger.info("classifier epoch %d done (%.0f s)", epoch + 1, time.time() - t0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    acc = float((predict(model, test.images) == np.asarray(test.labels)).mean())
    logger.info("classifier test accuracy %.4f", acc)
    return model, acc


def generate(gen, texts: list[str], seeds: list[int], batch: int = 64) -> tuple[np.ndarray, float]:
    """uint8 (N, H, W) images and the seconds it took."""
    t0 = time.time()
    out = []
    for i in range(0, len(texts), batch):
        out += [np.asarray(im, dtype=np.uint8) for im in gen.generate(texts[i : i + batch], seeds[i : i + batch])]
    return np.stack(out), time.time() - t0


def per_class_accuracy(pred: np.ndarray, target: np.ndarray, n_classes: int) -> list[float]:
    return [float((pred[target == c] == c).mean()) for c in range(n_classes)]


def mean_pairwise_l2(images: np.ndarray) -> float:
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def evaluate(gen, clf, class_names, real_test, n_class: int, n_para: int) -> dict:
    n_classes = len(class_names)
    texts = [f"a photo of a {name}" for name in class_names for _ in range(n_class)]
    labels = np.repeat(np.arange(n_classes), n_class)
    seeds = list(range(len(texts)))
    imgs, secs = generate(gen, texts, seeds)
    acc_a = per_class_accuracy(predict(clf, imgs), labels, n_classes)
    p_texts, p_labels = [], []
    for c, name in enumerate(class_names):
        for phrase in HELD_OUT[name]:
            p_texts += [phrase] * n_para
            p_labels += [c] * n_para
    p_imgs, p_secs = generate(gen, p_texts, list(range(10_000, 10_000 + len(p_texts))))
    acc_b = per_class_accuracy(predict(clf, p_imgs), np.asarray(p_labels), n_classes)
    ratios = []
    test_labels = np.asarray(real_test.labels)
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        real = real_test.images[rng.choice(np.flatnonzero(test_labels == c), n_class, replace=False)]
        real = _to_input(real).add(1).mul(127.5).squeeze(1).round().clamp(0, 255).numpy().astype(np.uint8)
        fake = imgs[labels == c]
        ratios.append(mean_pairwise_l2(fake) / mean_pairwise_l2(real))
    return {
        "class_prompt_accuracy": float(np.mean(acc_a)),
        "class_prompt_accuracy_per_class": dict(zip(class_names, acc_a)),
        "paraphrase_accuracy": float(np.mean(acc_b)),
        "paraphrase_accuracy_per_class": dict(zip(class_names, acc_b)),
        "diversity_ratio": float(np.mean(ratios)),
        "diversity_ratio_per_class": dict(zip(class_names, ratios)),
        "images_per_second": (len(texts) + len(p_texts)) / (secs + p_secs),
        "num_images": len(texts) + len(p_texts),
        "_class_images": imgs,
    }


def save_grid(images: np.ndarray, n_classes: int, per_row: int, path: Path) -> None:
    from PIL import Image

    n_per = len(images) // n_classes
    h, w = images.shape[1:]
    grid = np.zeros((n_classes * h, per_row * w), dtype=np.uint8)
    for c in range(n_classes):
        for j in range(min(per_row, n_per)):
            grid[c * h : (c + 1) * h, j * w : (j + 1) * w] = images[c * n_per + j]
    Image.fromarray(grid).resize((per_row * w * 2, n_classes * h * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", default=None, help="drawer assets dir (default: the shipped kka_ray/assets/kka-pixel-drawer)")
    parser.add_argument("--cache-dir", default=None, help="model cache for MiniLM + the assembled drawer (default: a temp dir)")
    parser.add_argument("--classifier", default=str(Path("~/.cache/kka_ray/fmnist_judge_cnn.safetensors").expanduser()))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sweep", default="", help="extra steps:guidance pairs to compare on fewer images, e.g. 8:2,12:3")
    parser.add_argument("--n-class", type=int, default=50, help="images per class for the class prompts")
    parser.add_argument("--n-para", type=int, default=8, help="images per held-out paraphrase")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "drawer_quality.json"))
    parser.add_argument("--grid", default=str(RESULTS / "drawer_samples.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from kka_ray.data.fashion_mnist import load_fashion_mnist
    from kka_ray.generation.build_drawer import prepare_default_drawer, read_drawer_info, shipped_drawer_assets
    from kka_ray.generation.image import DiffusersImageGenerator
    from kka_ray.generation.train_drawer import build_captions

    real_test = load_fashion_mnist(split="test")
    class_names = list(real_test.class_names)
    train_caps = {c for caps in build_captions(class_names) for c in caps}
    leaked = [p for ps in HELD_OUT.values() for p in ps if p in train_caps]
    if leaked:
        raise SystemExit(f"held-out paraphrases are training captions: {leaked}")
    clf, clf_acc = get_classifier(Path(args.classifier))

    assets = Path(args.assets) if args.assets else shipped_drawer_assets()
    info = read_drawer_info(assets)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        drawer_dir = prepare_default_drawer(cache, assets_dir=assets)
        settings = [(args.steps, args.guidance)] + [tuple(float(v) for v in s.split(":")) for s in args.sweep.split(",") if s]
        sweep = []
        main_result = None
        gen = DiffusersImageGenerator(str(drawer_dir), cache)  # loaded once; each setting changes only the sampler's knobs
        for k, (steps, guidance) in enumerate(settings):
            gen.num_inference_steps, gen.guidance_scale = int(steps), float(guidance)
            n_class, n_para = (args.n_class, args.n_para) if k == 0 else (max(10, args.n_class // 3), max(2, args.n_para // 3))
            res = evaluate(gen, clf, class_names, real_test, n_class, n_para)
            row = {"steps": int(steps), "guidance_scale": guidance, **{k2: v for k2, v in res.items() if not k2.startswith("_") and not k2.endswith("per_class")}}
            logger.info("steps %d guidance %.1f: %s", steps, guidance, json.dumps({k2: round(v, 3) for k2, v in row.items()}))
            if k == 0:
                main_result = res
            else:
                sweep.append(row)
    grid_images = main_result.pop("_class_images")
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid_images, len(class_names), 12, Path(args.grid))
    report = {
        "classifier_test_accuracy": clf_acc,
        **main_result,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "goals": {"class_prompt_accuracy": 0.8, "paraphrase_accuracy": 0.6, "classifier_test_accuracy": 0.9},
        "held_out_paraphrases": HELD_OUT,
        "sweep": sweep,
        "training": {k: info.get(k) for k in ("steps_done", "train_wall_s", "final_loss", "unet_params", "device", "config", "num_captions", "partial")},
        "machine": {**machine(), "threads": args.threads},
        "note": "timings on a shared 2-core machine while other jobs ran (nice 19): an upper bound on the drawer's cost",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s and %s", args.out, args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
