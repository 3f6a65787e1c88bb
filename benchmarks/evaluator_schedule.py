"""Which network and schedule make the confusion evaluator (Deep SAD, method.md Eq. 5) separate
normals from generated anomalies, measured on validation data only.

Input: finished runs whose iteration 1 was generated, guarded and audited (the anomaly-audit
benchmark's run directories). For each run the kept anomalies are cut in two halves by a hash of
their ids: the evaluator trains on the normal training features plus half A (label -1) and is
measured on the held-out normals against half B, which it has not seen: the situation of a new
iteration's anomalies. Reported per setting (mean over runs): the AUROC of held-out normals vs B,
the hard fraction of B at the threshold rules (quantiles of the held-out normals' distances, and
their maximum), and the one-class case (no anomalies in training: iteration 1).

No test data is read. The Deep SAD objective, centre rule and networks are the engine's own
(kka_ray.detectors.deep_sad); training runs in-process (the engine runs the same loop on Ray Train).

    python benchmarks/evaluator_schedule.py /path/to/anomaly_audit/default
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (0.8, 0.9, 0.95, 0.98, 0.99)
logger = logging.getLogger("evaluator_schedule")


def load_run(run_dir: Path):
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    from kka_ray.knowledge.features import FeatureNormalizer

    feats = load_file(str(run_dir / "prep" / "features.safetensors"))
    norm = FeatureNormalizer.from_state_dict(load_file(str(run_dir / "prep" / "normalizer.safetensors")))
    rows = pq.read_table(run_dir / "anomalies" / "iter_1.parquet", columns=["id", "features", "guard_reason"]).to_pylist()
    rows = [r for r in rows if not r["guard_reason"]]
    z = norm.transform(np.stack([np.asarray(r["features"], np.float32) for r in rows])).astype(np.float32)
    half = np.array([int(hashlib.sha1(r["id"].encode()).hexdigest()[:8], 16) % 2 for r in rows], bool)
    return feats["train"], feats["holdout"], z[~half], z[half]


def train(normals, anomalies, hidden, lr, epochs, eta=1.0, seed=0, rep_dim=256, batch=128, wd=1e-6, unit=False):
    from kka_ray.config import DeepSADSection
    from kka_ray.detectors.deep_sad.loss import center_from_sums, deep_sad_loss
    from kka_ray.detectors.deep_sad.torch_model import build_network

    torch.manual_seed(seed)
    cfg = DeepSADSection(hidden_dims=list(hidden), rep_dim=rep_dim, lr=lr, epochs=epochs)
    x = torch.from_numpy(np.concatenate([normals, anomalies]).astype(np.float32))
    y = torch.cat([torch.zeros(len(normals)), -torch.ones(len(anomalies))])
    net = build_network(cfg, (x.shape[1],))
    net.eval()
    with torch.no_grad():
        c = center_from_sums(net(x).sum(0), len(x))
        if unit:  # rescale phi (bias-free, so c scales with it) so the mean training distance starts at 1
            d0 = ((net(x[: len(normals)]) - c) ** 2).sum(1).mean()
            for m in net.modules():
                if isinstance(m, torch.nn.Linear):
                    last = m
            last.weight.mul_(d0.rsqrt())
            c = center_from_sums(net(x).sum(0), len(x))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            if len(idx) < 2:
                continue
            loss = deep_sad_loss(((net(x[idx]) - c) ** 2).sum(1), y[idx], eta=eta)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    def score(z):
        with torch.no_grad():
            return ((net(torch.from_numpy(np.asarray(z, np.float32))) - c) ** 2).sum(1).double().numpy()

    return score


def measure(score, holdout, unseen) -> dict:
    from sklearn.metrics import roc_auc_score

    dh, du = score(holdout), score(unseen)
    out = {"auroc_unseen": float(roc_auc_score(np.r_[np.zeros(len(dh)), np.ones(len(du))], np.r_[dh, du]))}
    for q in QUANTILES:
        out[f"hard_q{q}"] = float((du <= np.quantile(dh, q)).mean())
    out["hard_max"] = float((du <= dh.max()).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="a directory of runs (class*/) with iteration 1 generated and guarded")
    p.add_argument("--out", default=str(RESULTS / "evaluator_schedule.json"))
    p.add_argument("--hidden", default="none,512", help="hidden layer sets: none or comma-free sizes like 512-128")
    p.add_argument("--lr", default="1e-4,1e-3")
    p.add_argument("--epochs", default="10,30")
    p.add_argument("--eta", default="1", help="Deep SAD eta values (weight of the labelled terms)")
    p.add_argument("--one-class", default="yes", choices=["yes", "no"], help="also fit without anomalies")
    p.add_argument("--unit", default="no", help="yes/no list: rescale phi so the mean training distance starts at 1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    runs = sorted(d for d in Path(args.root).glob("class*") if (d / "anomalies" / "iter_1.parquet").is_file())
    data = {d.name: load_run(d) for d in runs}
    hidden_sets = [[] if h == "none" else [int(v) for v in h.split("-")] for h in args.hidden.split(",")]
    grid = list(itertools.product(hidden_sets, [float(v) for v in args.lr.split(",")], [int(v) for v in args.epochs.split(",")],
                                  [float(v) for v in args.eta.split(",")], [u == "yes" for u in args.unit.split(",")]))
    rows = []
    for hidden, lr, epochs, eta, unit in grid:
        t0 = time.perf_counter()
        per = {}
        for name, (normals, holdout, half_a, half_b) in data.items():
            per[name] = {"with_anomalies": measure(train(normals, half_a, hidden, lr, epochs, eta, unit=unit), holdout, half_b)}
            if args.one_class == "yes":
                per[name]["one_class"] = measure(train(normals, half_a[:0], hidden, lr, epochs, eta, unit=unit), holdout, half_b)
        kinds = list(next(iter(per.values())))
        mean = {kind: {k: float(np.mean([v[kind][k] for v in per.values()])) for k in next(iter(per.values()))[kind]}
                for kind in kinds}
        rows.append({"hidden_dims": hidden, "lr": lr, "epochs": epochs, "eta": eta, "unit_init": unit, "mean": mean, "per_run": per,
                     "seconds": round(time.perf_counter() - t0, 1)})
        logger.info("hidden %s lr %g epochs %d eta %g: %s", hidden, lr, epochs, eta, json.dumps(mean))
    best = max(rows, key=lambda r: r["mean"]["with_anomalies"]["auroc_unseen"])
    result = {"runs": [d.name for d in runs], "grid": rows,
              "best_by_unseen_auroc": {k: best[k] for k in ("hidden_dims", "lr", "epochs", "eta", "unit_init")},
              "note": "validation only: held-out normals vs generated anomalies the evaluator was not trained on",
              "machine": machine()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        m = r["mean"]
        one = m.get("one_class")
        print(f"hidden {r['hidden_dims']!s:8} lr {r['lr']:<7g} epochs {r['epochs']:3d} eta {r['eta']:<5g} unit {r['unit_init']!s:5} | with anomalies: "
              f"AUROC unseen {m['with_anomalies']['auroc_unseen']:.3f}, hard q0.9 {m['with_anomalies']['hard_q0.9']:.2f} q0.95 "
              f"{m['with_anomalies']['hard_q0.95']:.2f} max {m['with_anomalies']['hard_max']:.2f}"
              + (f" | one-class: AUROC {one['auroc_unseen']:.3f}, hard q0.95 {one['hard_q0.95']:.2f}" if one else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
