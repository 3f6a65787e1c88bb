"""The normal-likeness guard (kka_ray/guard.py) and the audit's figures (kka_ray/audit/), on
hand-made embeddings, scores and judged labels whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kka_ray.audit.figures import judged_figures, text_figures
from kka_ray.config import GuardSection
from kka_ray.guard import (
    IMAGE_LIKE_NORMAL, NAMES_NORMAL, TEXT_LIKE_NORMAL, NormalLikenessGuard, NormalTermMatcher, TextSimilarityRule,
    caption_terms, normal_terms,
)


# ---------------------------------------------------------------------------- names_normal


def test_matcher_whole_words_plurals_and_hyphens():
    m = NormalTermMatcher(["t-shirt/top", "tee"])
    assert m.match("a photo of a T-Shirt with a logo") == "t-shirt"
    assert m.match("two tees on a chair") == "tees"
    assert m.match("a photo of a t shirt") == "t shirt"  # hyphen variant
    assert m.match("a photo of a tops") == "tops"
    assert m.match("a photo of a laptop") is None  # not a whole word
    assert m.match("a photo of a shirt") is None
    shirt = NormalTermMatcher(["shirt"])
    assert shirt.match("a photo of a t-shirt") is None  # a hyphenated word is one word
    assert shirt.match("a photo of two shirts.") == "shirts"
    assert NormalTermMatcher([]).match("anything") is None


def test_normal_terms_from_names_synonyms_extra_and_captions():
    terms = normal_terms(["trouser"], "fashion_mnist", extra=["chinos"])
    m = NormalTermMatcher(terms)
    for text in ("a pair of jeans", "grey slacks", "some chinos", "a trouser leg"):
        assert m.match(text) is not None, text
    assert m.match("a photo of a dress") is None
    # caption mining: words in >= 30 % of the normal images' captions, minus template and domain words
    caps = [["there is an airplane on the runway"], ["an airplane parked"], ["many planes near the terminal"],
            ["a white airplane"]]
    assert caption_terms(caps, 0.3, exclude_text="aerial images") == ["airplane"]
    assert caption_terms(caps, 0.0) == []


# ---------------------------------------------------------------------------- text_like_normal


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_text_rule_threshold_from_heldout_captions_only():
    # training captions sit near e0; held-out captions are identical strings or near them
    train = ["a", "b", "c"]
    emb = _unit([[1, 0.1, 0], [1, -0.1, 0], [1, 0, 0.1]])
    rule = TextSimilarityRule(train, emb, k=2)
    rule.calibrate(["a", "d"], _unit([[1, 0.1, 0], [1, 0.05, 0.05]]), quantile=0.5)
    # "a" is scored without its identical training caption: mean of its 2 best other similarities
    s_a = np.sort(emb[[1, 2]] @ emb[0])[-2:].mean()
    s_d = np.sort(emb @ _unit([1, 0.05, 0.05]))[-2:].mean()
    assert rule.threshold_ == pytest.approx(np.quantile([s_a, s_d], 0.5), rel=1e-6)
    near, far = rule.score(_unit([[1, 0.02, 0.02], [0, 1, 0]]))
    assert near >= rule.threshold_ > far


def test_guard_drops_normal_like_items_and_keeps_far_ones():
    cfg = GuardSection(text_quantile=0.5, image_quantile=0.5)
    train_caps, held_caps = ["cap a", "cap b", "cap c"], ["cap d", "cap e"]
    table = {"cap a": [1, 0.1, 0], "cap b": [1, -0.1, 0], "cap c": [1, 0, 0.1], "cap d": [1, 0.3, 0],
             "cap e": [1, 0, 0.3], "near text": [1, 0, 0], "far text": [0, 1, 0], "far image": [0, 0, 1],
             "a photo of a tee": [0, 1, 1]}
    embed = lambda texts: _unit([table[t] for t in texts])  # noqa: E731
    held_scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # median 3.0
    guard = NormalLikenessGuard.calibrate(cfg, ["t-shirt", "tee"], train_captions=train_caps, heldout_captions=held_caps,
                                          embed=embed, heldout_image_scores=held_scores)
    assert guard.thresholds()["image"] == pytest.approx(3.0)
    texts = ["a photo of a tee", "near text", "far image", "far text"]
    v = guard.screen(texts, embed(texts), np.array([10.0, 10.0, 1.5, 10.0]))
    assert v.reasons == [NAMES_NORMAL, TEXT_LIKE_NORMAL, IMAGE_LIKE_NORMAL, None]
    assert v.kept.tolist() == [False, False, False, True]
    assert v.counts() == {NAMES_NORMAL: 1, TEXT_LIKE_NORMAL: 1, IMAGE_LIKE_NORMAL: 1}
    # each rule can be switched off
    off = GuardSection(names_normal=False, text_similarity=False, image_similarity=False)
    none = NormalLikenessGuard.calibrate(off, ["tee"])
    assert none.screen(texts).reasons == [None] * 4


def test_guard_needs_heldout_data_for_each_rule():
    with pytest.raises(ValueError, match="held-out"):
        NormalLikenessGuard.calibrate(GuardSection(text_similarity=False), [], heldout_image_scores=np.zeros(0))
    with pytest.raises(ValueError, match="captions"):
        NormalLikenessGuard.calibrate(GuardSection(image_similarity=False), [], train_captions=["a"], heldout_captions=[],
                                      embed=lambda t: np.zeros((len(t), 2)))


# ---------------------------------------------------------------------------- audit figures


def test_judged_figures_on_a_known_set():
    names = ["tee", "trouser", "shirt", "bag"]
    pred = np.array([0, 0, 2, 2, 2, 3, 0, 2])  # 3 of 8 judged the normal class 0
    f = judged_figures(pred, [0], names)
    assert f["n"] == 8 and f["normal_leak"] == pytest.approx(3 / 8)
    assert f["coverage"] == 2 and f["n_other_classes"] == 3  # shirt and bag, not trouser
    assert f["histogram"] == {"tee": 3, "shirt": 4, "bag": 1}
    two_normal = judged_figures(pred, [0, 2], names)
    assert two_normal["normal_leak"] == pytest.approx(7 / 8) and two_normal["coverage"] == 1
    empty = judged_figures(np.zeros(0, np.int64), [0], names)
    assert empty["normal_leak"] is None and empty["coverage"] == 0


def test_text_figures_count_normal_mentions():
    m = NormalTermMatcher(["t-shirt/top"])
    f = text_figures(["a photo of a t-shirt.", "a photo of a bag.", "two tops", "a photo of a shoe."], m)
    assert f["names_normal_share"] == pytest.approx(0.5)
    assert f["normal_terms_used"] == {"t-shirt": 1, "tops": 1}


def test_judge_false_normal_rate_from_its_confusion_matrix():
    from kka_ray.audit.judge import Judge

    # rows: true class, columns: judged class
    confusion = np.array([[90, 5, 5], [10, 80, 10], [0, 20, 80]])
    j = Judge("cnn", ["a", "b", "c"], confusion)
    assert j.false_normal_rate([0]) == pytest.approx(10 / 200)
    assert j.recall([0]) == pytest.approx(0.9)
    assert j.test_accuracy == pytest.approx(250 / 300)
