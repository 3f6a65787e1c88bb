"""The audit stage of one iteration: the judge labels every image the iteration drew, and the
figures of :mod:`kka_ray.audit.figures` are computed for the kept set, its hard and easy parts,
and what the guard dropped (by reason); the text audit covers every description.

Written to ``<run>/audit/iter_<k>.json`` (with each item's judged class, for the report) and
summarised in the stage record and ``metrics.jsonl``. Nothing in the loop reads it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_JUDGES: dict[str, Any] = {}  # judges loaded in this process, by cache key


def _judge(cfg: Any):
    from kka_ray.audit.judge import load_or_train_judge

    key = repr((cfg.audit.model_dump(), cfg.data.model_dump(), str(cfg.paths.cache_dir()), cfg.knowledge.backbone))
    if key not in _JUDGES:
        _JUDGES[key] = load_or_train_judge(cfg)
    return _JUDGES[key]


def audit_iteration(cfg: Any, split: Any, store: Any, k: int) -> dict[str, Any]:
    """The audit of iteration ``k``'s store file (every drawn item, kept or dropped)."""
    from kka_ray.audit.figures import judged_figures, text_figures
    from kka_ray.data.store import kept_mask
    from kka_ray.rundir import decode_like
    from kka_ray.guard import NormalTermMatcher, normal_terms
    from kka_ray.data.protocols import dataset_key

    judge = _judge(cfg)
    names = judge.class_names
    normal = [names.index(n) for n in split.normal_class_names]
    table = store.read([k], columns=["id", "text", "image", "guard_reason", "is_hard", "distance"]) \
        if store.path(k).is_file() else None
    matcher = NormalTermMatcher(normal_terms(split.normal_class_names, dataset_key(cfg.data), cfg.guard.normal_terms))
    base = {"judge": judge.kind, "judge_test_accuracy": judge.test_accuracy,
            "judge_false_normal_rate": judge.false_normal_rate(normal), "judge_normal_recall": judge.recall(normal),
            "normal_classes": list(split.normal_class_names),
            "note": "an audit only: nothing in the loop reads these figures"}
    if table is None or table.num_rows == 0:
        return {**base, "n_items": 0, "kept": judged_figures(np.zeros(0, np.int64), normal, names)}
    shape = split.train.images.shape[1:]
    images, ok = [], []
    for data in table.column("image").to_pylist():
        try:
            images.append(decode_like(data, shape))
            ok.append(True)
        except Exception:  # noqa: BLE001 - an undecodable image is left out of the judged figures
            images.append(np.zeros(shape, np.uint8))
            ok.append(False)
    ok_arr = np.array(ok, bool)
    pred = judge.predict(np.stack(images))
    kept = kept_mask(table)
    hard = np.asarray(table.column("is_hard").to_pylist(), bool) & kept
    distance = np.asarray(table.column("distance").to_pylist(), np.float64)
    easy = kept & ~hard & np.isfinite(distance)
    reasons = table.column("guard_reason").to_pylist()
    texts = table.column("text").to_pylist()
    out: dict[str, Any] = {
        **base,
        "n_items": table.num_rows,
        "kept": judged_figures(pred[kept & ok_arr], normal, names),
        "hard": judged_figures(pred[hard & ok_arr], normal, names),
        "easy": judged_figures(pred[easy & ok_arr], normal, names),
        "dropped": judged_figures(pred[~kept & ok_arr], normal, names),
        "dropped_by_reason": {
            r: judged_figures(pred[np.array([x == r for x in reasons]) & ok_arr], normal, names)
            for r in sorted({x for x in reasons if x})
        },
        "all": judged_figures(pred[ok_arr], normal, names),
        "text": {**text_figures(texts, matcher),
                 "guard_drop_share": float((~kept).mean()),
                 "guard_drops": {r: int(sum(x == r for x in reasons)) for r in sorted({x for x in reasons if x})}},
        "items": {i: (names[int(p)] if good else None)
                  for i, p, good in zip(table.column("id").to_pylist(), pred, ok)},
    }
    kept_fig = out["kept"]
    logger.info("iteration %d audit: kept %d, normal_leak %s (judge's own false-normal rate %.3f), coverage %d/%d",
                k, kept_fig["n"], kept_fig["normal_leak"], out["judge_false_normal_rate"], kept_fig["coverage"],
                kept_fig["n_other_classes"])
    return out
