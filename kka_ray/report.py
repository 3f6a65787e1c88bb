"""``report.html`` of a run: AUROC per iteration against the baselines, and per iteration the
grids of hard and easy anomalies (method.md Eq. 6) with the texts that produced them, what the
normal-likeness guard rejected (with the reason), and beside them the audit: the judge's class
histograms of the kept set and of its hard and easy parts (an audit only; the loop never reads it).

Self-contained HTML: images are inline PNG data URIs and the chart is inline SVG, so the file
can be copied off a cluster and opened anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from kka_ray.rundir import RunLayout, require_run_dir
from pathlib import Path
from typing import Any

SCALE = 3  # upscale factor for small images (28 px Fashion-MNIST -> 84 px on screen)


def _data_uri(png: bytes) -> str:
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    if img.width < 96:
        img = img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _caption(r: dict[str, Any], judged: dict[str, Any]) -> str:
    bits = []
    if r.get("guard_reason"):
        bits.append(f'<b>{html.escape(str(r["guard_reason"]))}</b>')
    elif r.get("distance") is not None and math.isfinite(r["distance"]):
        bits.append(f'd={r["distance"]:.3g}')
    bits.append(f'adapter v{r["adapter_version"]}')
    if judged.get(r["id"]):
        bits.append(f'judge: {html.escape(str(judged[r["id"]]))}')
    return " · ".join(bits)


def _grid(rows: list[dict[str, Any]], title: str, judged: dict[str, Any], total: int | None = None) -> str:
    if not rows:
        return f"<h4>{html.escape(title)}: none</h4>"
    cells = "".join(
        f'<figure><img src="{_data_uri(r["image"])}" alt=""><figcaption>{html.escape(r["text"])}'
        f'<br><small>{_caption(r, judged)}</small></figcaption></figure>'
        for r in rows
    )
    shown = f"{len(rows)} of {total} shown" if total is not None and total > len(rows) else f"{len(rows)} shown"
    return f'<h4>{html.escape(title)} ({shown})</h4><div class="grid">{cells}</div>'


def _histogram(hist: dict[str, int] | None, normal: list[str]) -> str:
    if not hist:
        return "<i>none</i>"
    total = sum(hist.values())
    bars = []
    for name, count in sorted(hist.items(), key=lambda kv: -kv[1]):
        width = int(160 * count / total)
        color = "#d62728" if name in normal else "#1f77b4"
        bars.append(f'<div class="bar"><span class="lbl">{html.escape(name)}</span>'
                    f'<span style="display:inline-block;width:{width}px;background:{color}">&nbsp;</span> {count}</div>')
    return "".join(bars)


def _audit_panel(audit: dict[str, Any], normal: list[str]) -> str:
    if not audit:
        return "<p><i>No audit for this iteration.</i></p>"
    kept = audit.get("kept", {})
    leak = kept.get("normal_leak")
    lines = [f'<p><b>Audit</b> (judge: {html.escape(str(audit.get("judge")))}, test accuracy '
             f'{100 * audit.get("judge_test_accuracy", float("nan")):.1f} %; an audit only, the loop never reads it)<br>'
             f'normal_leak of the kept set: <b>{"-" if leak is None else f"{100 * leak:.1f} %"}</b> '
             f'(the judge itself calls {100 * audit.get("judge_false_normal_rate", float("nan")):.1f} % of real other-class '
             f'images normal); coverage {kept.get("coverage", 0)} of {kept.get("n_other_classes", 0)} other classes; '
             f'descriptions naming the normal class: {100 * (audit.get("text", {}).get("names_normal_share") or 0):.1f} %</p>']
    cols = [("kept", "Kept"), ("hard", "Hard"), ("easy", "Easy"), ("dropped", "Dropped by the guard")]
    lines.append('<div class="hists">' + "".join(
        f'<div><h5>{title} ({audit.get(key, {}).get("n", 0)})</h5>{_histogram(audit.get(key, {}).get("histogram"), normal)}</div>'
        for key, title in cols) + "</div>")
    return "".join(lines)


def auroc_chart(metrics: list[dict[str, Any]], baselines: dict[str, Any], width: int = 560, height: int = 260) -> str:
    """Inline SVG: detector AUROC per iteration, baselines as dashed lines."""
    pts = [(m["iteration"], m["auroc"]) for m in metrics if m.get("auroc") is not None]
    base = {k: v["auroc"] for k, v in baselines.items() if isinstance(v, dict) and "auroc" in v}
    values = [a for _, a in pts] + list(base.values())
    if not values:
        return "<p>No AUROC recorded yet.</p>"
    lo, hi = min(values), max(values)
    pad = max(0.01, (hi - lo) * 0.15)
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    n = max([i for i, _ in pts] + [1])
    x = lambda i: 50 + (width - 110) * (i / n)  # noqa: E731  iteration 0 = baselines; room for the last label
    y = lambda a: 20 + (height - 50) * (1 - (a - lo) / (hi - lo or 1))  # noqa: E731
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<line x1="50" y1="{height-30}" x2="{width-20}" y2="{height-30}" stroke="#888"/>',
             f'<line x1="50" y1="20" x2="50" y2="{height-30}" stroke="#888"/>']
    for t in range(5):
        a = lo + (hi - lo) * t / 4
        parts.append(f'<text x="4" y="{y(a)+4:.1f}">{a*100:.1f}</text>')
    for i in range(0, n + 1):
        parts.append(f'<text x="{x(i)-3:.1f}" y="{height-14}">{i}</text>')
    colors = ["#d62728", "#2ca02c", "#9467bd", "#8c564b"]
    for j, (name, a) in enumerate(sorted(base.items())):
        c = colors[j % len(colors)]
        parts.append(f'<line x1="50" x2="{width-20}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="{c}" stroke-dasharray="5,4"/>')
        parts.append(f'<text x="{width-150}" y="{y(a)-4:.1f}" fill="{c}">{html.escape(name)} (no anomalies) {a*100:.2f}</text>')
    if pts:
        poly = " ".join(f"{x(i):.1f},{y(a):.1f}" for i, a in pts)
        parts.append(f'<polyline points="{poly}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        for i, a in pts:
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(a):.1f}" r="3" fill="#1f77b4"/>'
                         f'<text x="{x(i)+5:.1f}" y="{y(a)-6:.1f}" fill="#1f77b4">{a*100:.2f}</text>')
    parts.append(f'<text x="{width/2-40:.0f}" y="{height-2}">iteration</text></svg>')
    return "".join(parts)


def _shift_table(metrics: list[dict[str, Any]]) -> str:
    """Before/after figures of every DPO update on the fixed held-out prompts (the describer shift)."""
    rows = [(m["iteration"], m["describer_shift"]) for m in metrics if m.get("describer_shift")]
    if not rows:
        return ""
    keys = ["kept_share", "hard_share", "hard_per_sample", "normal_leak", "coverage", "names_normal_share"]
    pct = lambda v: "-" if v is None else (f"{100 * v:.1f} %" if isinstance(v, float) else str(v))  # noqa: E731
    out = ["<h3>What each DPO update changed (fixed held-out prompts and seeds, scored by the evaluator "
           "that split that iteration, and the judge)</h3><table><tr><th>update</th><th>changed texts</th>"
           + "".join(f"<th>{k}<br>before → after</th>" for k in keys) + "</tr>"]
    for k, sh in rows:
        b, a = sh.get("before", {}), sh.get("after", {})
        out.append(f"<tr><td>{k}</td><td>{pct(sh.get('changed_texts'))}</td>"
                   + "".join(f"<td>{pct(b.get(key))} → {pct(a.get(key))}</td>" for key in keys) + "</tr>")
    return "".join(out) + "</table>"


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.html`` from what the run directory holds now."""
    from kka_ray.data.store import AnomalyStore
    from kka_ray.config import load_config

    run_dir = Path(run_dir)
    layout = RunLayout(require_run_dir(run_dir))
    cfg = load_config(layout.config)
    metrics_path = layout.metrics
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.is_file() else []
    baselines = json.loads(layout.baselines.read_text()) if layout.baselines.is_file() else {}
    store = AnomalyStore(layout.store)
    n = cfg.report.grid_size
    sections = []
    normal: list[str] = []
    for k in store.iterations():
        table = store.read([k], columns=["id", "text", "image", "distance", "is_hard", "adapter_version", "guard_reason"])
        audit_path = layout.audit(k)
        audit = json.loads(audit_path.read_text()) if audit_path.is_file() else {}
        judged, normal = audit.get("items", {}), audit.get("normal_classes", [])
        all_rows = table.to_pylist()
        rows = sorted((r for r in all_rows if not r["guard_reason"]), key=lambda r: r["distance"])
        hard = [r for r in rows if r["is_hard"]]
        easy = [r for r in rows if not r["is_hard"]][::-1]
        dropped = [r for r in all_rows if r["guard_reason"]]
        sections.append(f"<h3>Iteration {k}</h3>" + _audit_panel(audit, normal)
                        + _grid(hard[:n], "Hard (closest to normal)", judged, len(hard))
                        + _grid(easy[:n], "Easy (farthest)", judged, len(easy))
                        + _grid(dropped[:n], "Rejected by the normal-likeness guard", judged, len(dropped)))
    normal_names = ", ".join(normal) if normal else str(cfg.data.normal_classes or "the dataset's default class")
    head = ["iteration", "n_generated", "n_kept", "n_anomalies", "hard_fraction", "hard_fraction_ref",
            "hard_fraction_current", "normal_leak", "coverage",
            "evaluator_new_auroc", "auroc", "aupr", "fpr95", "n_pairs", "dpo_last_loss", "cpu_seconds_per_anomaly",
            "cpu_seconds_per_hard_anomaly", "gpu_seconds_per_hard_anomaly", "cost_per_anomaly", "cost_per_hard_anomaly"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    table_html = "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{fmt(m.get(h))}</td>" for h in head) + "</tr>" for m in metrics) + "</table>"
    currency = metrics[0].get("currency") if metrics else None
    if currency:
        table_html += (f"<p>cost_*: {html.escape(currency)} at the run's <code>cost</code> prices (inputs, not facts: "
                       "<code>kka cost RUN --prices FILE</code> reprices the run; by stage there).</p>")
    table_html += (f"<p>hard_fraction: the split DPO learns from, by {'iteration 1' if cfg.evaluator.split_reference == 'first' else 'each iteration'}'s "
                   "evaluator (<code>evaluator.split_reference</code>); hard_fraction_ref: by iteration 1's (normals only), "
                   "a fixed yardstick; hard_fraction_current: by each iteration's, trained on the anomaly set so far.</p>")
    capped = next((m for m in metrics if m.get("tau_capped")), None)
    if capped:
        table_html += (f"<p>tau {capped['tau']:.4g}: lowered from the held-out normals' {capped['tau_normals']:.4g} so that at most "
                       f"{cfg.evaluator.reference_hard_max:.0%} of iteration 1's anomalies are hard "
                       "(<code>evaluator.reference_hard_max</code>): the fixed yardstick leaves room to get harder.</p>")
    table_html += _shift_table(metrics)
    base_html = "".join(f"<li>{html.escape(k)}: AUROC {v['auroc']*100:.2f}</li>" for k, v in baselines.items()
                        if isinstance(v, dict) and "auroc" in v)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>KKA run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{width:150px;margin:0;font-size:11px}} figure img{{image-rendering:pixelated;display:block}}
.hists{{display:flex;gap:24px;font-size:12px}} .bar .lbl{{display:inline-block;width:80px}} h5{{margin:4px 0}}</style></head><body>
<h1>KKA run {html.escape(run_dir.name)}</h1>
<p>Data: {html.escape(cfg.data.preset or cfg.data.dataset)}, normal: {html.escape(normal_names)};
mode <b>{cfg.run.mode}</b>; {cfg.run.iterations} iterations; describer {html.escape(cfg.describer.model)};
drawer {html.escape(cfg.drawer.model)}; detector {cfg.detector.name}.</p>
<h2>Detector AUROC per iteration</h2>{auroc_chart(metrics, baselines)}<ul>{base_html}</ul>{table_html}
<h2>Generated anomalies</h2>{''.join(sections) or '<p>None yet.</p>'}
</body></html>"""
    out = layout.report
    out.write_text(page)
    return out
