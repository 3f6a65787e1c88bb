"""Did DPO change what the describer writes? The describer shift of one preference update (method.md
Eq. 7 -> Eq. 8, measured directly rather than through the next iteration).

Before and after each DPO update the resident describer writes for a fixed set of held-out
prompts (built from the held-out normals' captions, never from the Eq. 2 representatives the
training prompts use) at fixed seeds; the drawer draws them, the normal-likeness guard screens
them, and the iteration's confusion evaluator and the audit's judge score them. The figures of
both sides are recorded as ``describer_shift``:

- ``kept_share``: share of the samples that survive parsing, drawing and the guard;
- ``hard_share``: share of the kept ones the evaluator places among the normals (``d <= tau``),
  and ``hard_per_sample``: hard ones per sample written (what DPO is asked to raise);
- ``normal_leak``, ``coverage``: the judge's figures of the kept ones;
- ``names_normal_share``: share of descriptions naming the normal class;
- ``changed_texts``: share of samples whose text differs from the other side's at the same seed.

The sets are cached per adapter version (``<run>/shift/v<version>.parquet``), so the "after" of
one update is the "before" of the next, scored again by the next evaluator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Offsets the shift prompts' seed from the run's, so they differ from the training prompts.
SHIFT_SEED_OFFSET = 7919


def shift_prompts(cfg: Any, split: Any) -> list[dict[str, Any]]:
    """The fixed held-out prompts: the describer's template filled with held-out normals' captions."""
    from kka_ray.knowledge.prompts import build_prompts, normal_concept, resolve_template
    from kka_ray.knowledge.selection import Representative

    captions = sorted({c for cs in (split.holdout.captions or []) for c in cs})
    reps = [Representative(cluster=0, index=i, score=0.0, description=c) for i, c in enumerate(captions)]
    return build_prompts(resolve_template(cfg.describer).text, split.domain, reps, cfg.preference.shift_prompts,
                         cfg.run.seed + SHIFT_SEED_OFFSET, normal=normal_concept(split.normal_class_names))


def shift_figures(table: Any, n_samples: int, distances: np.ndarray, tau: float, judged: np.ndarray | None,
                  normal: list[int], class_names: list[str], matcher: Any) -> dict[str, Any]:
    """Figures of one side. ``table``: the screened rows (``text``, ``guard_reason``); ``distances``
    of its kept rows; ``judged``: the judge's class of each kept row (None without a judge)."""
    from kka_ray.audit.figures import judged_figures
    from kka_ray.data.store import kept_mask

    kept = kept_mask(table) if table is not None and table.num_rows else np.zeros(0, bool)
    n_kept = int(kept.sum())
    hard = np.asarray(distances, np.float64) <= tau
    texts = table.column("text").to_pylist() if table is not None else []
    out: dict[str, Any] = {
        "n_samples": int(n_samples), "n_drawn": len(texts), "n_kept": n_kept,
        "kept_share": n_kept / n_samples if n_samples else 0.0,
        "hard_share": float(hard.mean()) if n_kept else None,
        "hard_per_sample": float(hard.sum()) / n_samples if n_samples else 0.0,
        "names_normal_share": (sum(matcher.match(t) is not None for t in texts) / len(texts)) if texts else None,
    }
    if judged is not None:
        f = judged_figures(np.asarray(judged, np.int64), normal, class_names)
        out.update(normal_leak=f["normal_leak"], coverage=f["coverage"], judged_kept=f["histogram"])
    return out


def changed_share(before: Any, after: Any, n_samples: int) -> float:
    """Share of (prompt, sample) slots whose text differs between the two sides (a slot dropped on
    one side only counts as changed)."""
    def texts(t):
        if t is None:
            return {}
        return {(p, s): x for p, s, x in zip(t.column("prompt_id").to_pylist(), t.column("sample_idx").to_pylist(),
                                              t.column("text").to_pylist())}

    a, b = texts(before), texts(after)
    slots = set(a) | set(b)
    changed = sum(a.get(s) != b.get(s) for s in slots)
    return changed / n_samples if n_samples else 0.0
