"""The KKA paper's tables from evaluation rows: Markdown, CSV and a PNG of AUROC per iteration.

``main table``: one row per (split, detector, variant) at the final iteration of each run
(iteration 0 for ``none``): AUROC / AUPR / FPR95 mean and std over seeds (detector seeds and
runs of the same split and mode pooled), the last-epoch AUROC, the number of generated
anomalies, the number of seeds; then a ``mean`` row per (detector, variant) averaging the
per-split means and stds over splits (the paper's "mean over classes").

``ablation``: KKA(0..k): AUROC mean/std per (split, detector, mode, iteration), and the mean
over splits. The PNG plots that mean AUROC per iteration, one line per detector and mode.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from kka_ray.detectors.registry import DETECTORS

MAIN_COLUMNS = ["split", "detector", "variant", "auroc_mean", "auroc_std", "aupr_mean", "fpr95_mean",
                "auroc_last_mean", "n_generated", "seeds"]
ABLATION_COLUMNS = ["split", "detector", "mode", "iteration", "auroc_mean", "auroc_std", "n_generated", "seeds"]
DETECTOR_ORDER = list(DETECTORS)
VARIANT_ORDER = ["none", "kka_add", "kka_rep"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std()) if len(arr) > 1 else 0.0


def _sort_key(row: dict[str, Any]) -> tuple:
    det = row["detector"]
    var = row.get("variant", row.get("mode", ""))
    return (row["split"] == "mean", row["split"], DETECTOR_ORDER.index(det) if det in DETECTOR_ORDER else 99,
            VARIANT_ORDER.index(var) if var in VARIANT_ORDER else 99, row.get("iteration", 0))


def final_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows at each run's final evaluated iteration (plus the ``none`` rows)."""
    last: dict[tuple, int] = {}
    for r in rows:
        if r["variant"] != "none":
            key = (r["run"], r["detector"])
            last[key] = max(last.get(key, 0), r["iteration"])
    return [r for r in rows if r["variant"] == "none" or r["iteration"] == last[(r["run"], r["detector"])]]


def main_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in final_rows(rows):
        groups[(r["split"], r["detector"], r["variant"])].append(r)
    table = []
    for (split, det, var), rs in groups.items():
        m, s = _mean_std([r["auroc"] for r in rs])
        table.append({
            "split": split, "detector": det, "variant": var, "auroc_mean": 100 * m, "auroc_std": 100 * s,
            "aupr_mean": 100 * _mean_std([r["aupr"] for r in rs])[0],
            "fpr95_mean": 100 * _mean_std([r["fpr95"] for r in rs])[0],
            "auroc_last_mean": 100 * _mean_std([r["auroc_last"] for r in rs])[0],
            "n_generated": int(round(_mean_std([r["n_generated"] for r in rs])[0])), "seeds": len(rs),
        })
    by_dv: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for t in table:
        by_dv[(t["detector"], t["variant"])].append(t)
    splits = {t["split"] for t in table}
    if len(splits) > 1:
        for (det, var), ts in by_dv.items():
            row = {"split": "mean", "detector": det, "variant": var, "seeds": min(t["seeds"] for t in ts)}
            for col in ("auroc_mean", "auroc_std", "aupr_mean", "fpr95_mean", "auroc_last_mean"):
                row[col] = float(np.mean([t[col] for t in ts]))
            row["n_generated"] = int(round(np.mean([t["n_generated"] for t in ts])))
            row["n_splits"] = len(ts)
            table.append(row)
    return sorted(table, key=_sort_key)


def ablation_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["split"], r["detector"], r["mode"], r["iteration"])].append(r)
    table = []
    for (split, det, mode, it), rs in groups.items():
        m, s = _mean_std([r["auroc"] for r in rs])
        table.append({"split": split, "detector": det, "mode": mode, "iteration": it, "auroc_mean": 100 * m,
                      "auroc_std": 100 * s, "n_generated": int(round(np.mean([r["n_generated"] for r in rs]))),
                      "seeds": len(rs)})
    splits = {t["split"] for t in table}
    if len(splits) > 1:
        agg: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for t in table:
            agg[(t["detector"], t["mode"], t["iteration"])].append(t)
        for (det, mode, it), ts in agg.items():
            table.append({"split": "mean", "detector": det, "mode": mode, "iteration": it,
                          "auroc_mean": float(np.mean([t["auroc_mean"] for t in ts])),
                          "auroc_std": float(np.mean([t["auroc_std"] for t in ts])),
                          "n_generated": int(round(np.mean([t["n_generated"] for t in ts]))),
                          "seeds": min(t["seeds"] for t in ts), "n_splits": len(ts)})
    return sorted(table, key=_sort_key)


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def to_markdown(table: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({c: (round(r[c], 3) if isinstance(r.get(c), float) else r.get(c, "")) for c in columns})
    return buf.getvalue()


def plot_ablation(table: list[dict[str, Any]], path: Path) -> Path:
    """AUROC per iteration, one line per (detector, mode); the mean over splits when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "mean" if any(t["split"] == "mean" for t in table) else (table[0]["split"] if table else "")
    lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for t in table:
        if t["split"] == split:
            lines[(t["detector"], t["mode"])].append((t["iteration"], t["auroc_mean"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (det, mode), pts in sorted(lines.items(), key=lambda kv: _sort_key({"split": "", "detector": kv[0][0]})):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{det} ({mode})")
    ax.set_xlabel("KKA iteration (0 = no generated anomalies)")
    ax.set_ylabel("test AUROC (%)")
    ax.set_title(f"AUROC per iteration: {split}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write table.md/.csv, ablation.md/.csv, auroc_per_iteration.png and rows.jsonl into ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main, abl = main_table(rows), ablation_table(rows)
    paths = {
        "table_md": out / "table.md", "table_csv": out / "table.csv",
        "ablation_md": out / "ablation.md", "ablation_csv": out / "ablation.csv",
        "plot": out / "auroc_per_iteration.png", "rows": out / "rows.jsonl",
    }
    paths["table_md"].write_text(to_markdown(main, MAIN_COLUMNS))
    paths["table_csv"].write_text(to_csv(main, MAIN_COLUMNS))
    paths["ablation_md"].write_text(to_markdown(abl, ABLATION_COLUMNS))
    paths["ablation_csv"].write_text(to_csv(abl, ABLATION_COLUMNS))
    paths["rows"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_ablation(abl, paths["plot"])
    return paths
