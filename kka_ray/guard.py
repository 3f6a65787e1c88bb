"""The normal-likeness guard: no generated "anomaly" that is really the normal class enters the
anomaly set (method.md step 3).

A description or image of the normal concept itself, labelled -1, is label noise that teaches
the detector to reject its own class. Follow-up work on synthetic outliers (negative-label
refinement, CLIP-screened text-to-image outliers, LLM-proposed confusable classes) removes such
items; the KKA paper is silent. Three rules, each switchable and each calibrated on the
*held-out* normals (never on test); an item is dropped for the first rule it fails:

``names_normal``
    the description names a normal class or a synonym of it: the class names (split at
    "/" and ","), the dataset's known synonyms, ``guard.normal_terms``, and words that appear
    in at least ``guard.caption_term_share`` of the normal captions (not counting the caption
    templates' and the domain's own words). Whole words, hyphens included ("t-shirt" does not
    name "shirt"), plurals allowed.
``text_like_normal``
    the description's all-MiniLM-L6-v2 embedding is as close to the normal training captions
    as held-out normal captions typically are: ``s(t)`` = mean of the ``k`` largest cosine
    similarities to the distinct training captions; dropped when ``s(t) >= tau_text``, the
    ``guard.text_quantile`` quantile of the held-out captions' ``s`` (an identical training
    caption is left out of a held-out caption's own score).
``image_like_normal``
    the image sits deeper inside the normal distribution than typical held-out normals:
    Eq. 1's Mahalanobis score on backbone features below ``tau_image``, the
    ``guard.image_quantile`` quantile of the held-out normals' scores.

Dropped items stay in the anomaly store with their reason (the report shows them); they never
reach the evaluator, the detector or DPO.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from kka_ray.config import GuardSection

logger = logging.getLogger(__name__)

NAMES_NORMAL = "names_normal"
TEXT_LIKE_NORMAL = "text_like_normal"
IMAGE_LIKE_NORMAL = "image_like_normal"
GUARD_REASONS = (NAMES_NORMAL, TEXT_LIKE_NORMAL, IMAGE_LIKE_NORMAL)
UNDECODABLE = "undecodable"  # an image the backbone could not read: dropped too, and counted
# Neighbours averaged in the text score: a description close to several normal captions, not
# to one odd caption, is normal-like.
TEXT_NEIGHBOURS = 5
_STOP = frozenset(
    "a an the of and or in on at to for with without from by is are was be this that these those its it "
    "there here some many one two three very of".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def term_variants(term: str) -> set[str]:
    """Lower-case spellings a term may take: parts of "a/b" and "a, b", and hyphen variants
    ("t-shirt" -> "t shirt", "tshirt")."""
    out: set[str] = set()
    for part in re.split(r"[/,;]", term.lower()):
        part = " ".join(part.replace("_", " ").split())
        if not part:
            continue
        out.add(part)
        if part.startswith("pair of "):  # "pair of jeans" also names the class as "jeans"
            out.add(part[len("pair of "):])
        if "-" in part:
            out.add(part.replace("-", " "))
            out.add(part.replace("-", ""))
    return out


class NormalTermMatcher:
    """Whole-word matching of normal-class terms (plurals allowed; a hyphenated word is one word)."""

    def __init__(self, terms: Iterable[str]):
        variants = sorted({v for t in terms for v in term_variants(t)}, key=len, reverse=True)
        self.terms = variants
        if variants:
            alts = "|".join(r"\s+".join(re.escape(w) for w in v.split()) for v in variants)
            self._re = re.compile(rf"(?<![\w-])(?:{alts})(?:e?s)?(?![\w-])", re.IGNORECASE)
        else:
            self._re = None

    def match(self, text: str) -> str | None:
        """The first normal term ``text`` names, or None."""
        if self._re is None or not text:
            return None
        m = self._re.search(text)
        return m.group(0).lower() if m else None


def caption_terms(captions: Sequence[Sequence[str]], share: float, exclude_text: str = "") -> list[str]:
    """Words in at least ``share`` of the images' captions, except stop words and the words of
    ``exclude_text`` (the caption templates and the domain): the normal concept's own words."""
    if share <= 0 or share > 1 or not captions:
        return []
    excluded = set(_WORD.findall(exclude_text.lower())) | _STOP
    counts: Counter = Counter()
    for caps in captions:
        words = {w for c in caps for w in _WORD.findall(c.lower())}
        counts.update(w for w in words if w not in excluded and len(w) >= 3 and not w.isdigit())
    n = len(captions)
    return sorted(w for w, c in counts.items() if c / n >= share)


def known_synonyms(dataset: str) -> dict[str, tuple[str, ...]]:
    """Synonyms per class name that the project knows for a dataset (empty for most)."""
    if dataset == "fashion_mnist":
        from kka_ray.data.fashion_mnist import CLASS_SYNONYMS

        return CLASS_SYNONYMS
    return {}


def normal_terms(
    normal_class_names: Sequence[str],
    dataset: str,
    extra: Sequence[str] = (),
    captions: Sequence[Sequence[str]] | None = None,
    caption_share: float = 0.0,
    exclude_text: str = "",
) -> list[str]:
    """Every term that names the normal concept: class names, known synonyms, ``extra`` and
    frequent caption words (:func:`caption_terms`)."""
    synonyms = known_synonyms(dataset)
    terms: list[str] = []
    for name in normal_class_names:
        terms += [name, *synonyms.get(name, ())]
    terms += list(extra)
    if captions:
        terms += caption_terms(captions, caption_share, exclude_text)
    return list(dict.fromkeys(t for t in terms if t and t.strip()))


def _top_k_mean(sim: np.ndarray, k: int) -> np.ndarray:
    if sim.shape[1] == 0:
        return np.full(sim.shape[0], -1.0)
    k = max(1, min(k, sim.shape[1]))
    return np.sort(sim, axis=1)[:, -k:].mean(1)


@dataclass
class TextSimilarityRule:
    """``s(t)``: mean of the k largest cosine similarities to the distinct normal training captions."""

    captions: list[str]
    embeddings: np.ndarray  # (n, d), L2-normalised
    k: int = TEXT_NEIGHBOURS
    threshold_: float = float("inf")
    heldout_scores_: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def score(self, emb: np.ndarray) -> np.ndarray:
        emb = np.asarray(emb, np.float32)
        return _top_k_mean(emb @ self.embeddings.T, min(self.k, max(1, len(self.captions) - 1))).astype(np.float64)

    def calibrate(self, heldout_captions: list[str], heldout_emb: np.ndarray, quantile: float) -> "TextSimilarityRule":
        """``tau_text`` = the ``quantile`` of the held-out captions' scores (a held-out caption's
        identical training caption is left out of its score)."""
        if not heldout_captions:
            raise ValueError("the text guard needs held-out normal captions to calibrate on")
        sim = np.asarray(heldout_emb, np.float32) @ self.embeddings.T
        index = {c: i for i, c in enumerate(self.captions)}
        for row, cap in enumerate(heldout_captions):
            if cap in index:
                sim[row, index[cap]] = -np.inf
        k = min(self.k, max(1, len(self.captions) - 1))
        sim = np.where(np.isfinite(sim), sim, -1.0)
        self.heldout_scores_ = np.sort(sim, axis=1)[:, -k:].mean(1).astype(np.float64)
        self.threshold_ = float(np.quantile(self.heldout_scores_, quantile))
        return self


@dataclass
class GuardVerdicts:
    """Per item: the reason it was dropped (None: kept) and the rules' scores."""

    reasons: list[str | None]
    matched_terms: list[str | None]
    text_scores: np.ndarray
    image_scores: np.ndarray
    thresholds: dict[str, float]

    @property
    def kept(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)

    def counts(self) -> dict[str, int]:
        c = Counter(r for r in self.reasons if r is not None)
        return {r: int(c.get(r, 0)) for r in GUARD_REASONS}


class NormalLikenessGuard:
    """The three rules of the module docstring, calibrated on held-out normals."""

    def __init__(self, cfg: "GuardSection", matcher: NormalTermMatcher, text_rule: TextSimilarityRule | None,
                 image_threshold: float | None, scorer=None):
        self.cfg = cfg
        self.matcher = matcher
        self.text_rule = text_rule
        self.image_threshold = image_threshold
        self.scorer = scorer  # Eq. 1 MahalanobisScorer fitted on the normal training features
        self.heldout_image_scores: np.ndarray | None = None

    def image_scores(self, z: np.ndarray) -> np.ndarray | None:
        """Eq. 1 scores of normalised backbone features (None without the image rule)."""
        if self.scorer is None or self.image_threshold is None:
            return None
        return self.scorer.score(np.asarray(z, np.float32)) if len(z) else np.zeros(0)

    @classmethod
    def calibrate(
        cls,
        cfg: "GuardSection",
        normal_terms: Iterable[str],
        *,
        train_captions: list[str] | None = None,
        heldout_captions: list[str] | None = None,
        embed=None,
        heldout_image_scores: np.ndarray | None = None,
    ) -> "NormalLikenessGuard":
        """Build the guard: ``embed(texts) -> (n, d)`` L2-normalised embeddings (text rule),
        Eq. 1 scores of held-out normal images (image rule)."""
        matcher = NormalTermMatcher(normal_terms if cfg.names_normal else [])
        text_rule = None
        if cfg.text_similarity:
            train = sorted(set(train_captions or []))
            held = sorted(set(heldout_captions or []))
            if not train or not held or embed is None:
                raise ValueError("guard.text_similarity needs normal training and held-out captions and a text encoder")
            text_rule = TextSimilarityRule(train, embed(train)).calibrate(held, embed(held), cfg.text_quantile)
        image_threshold = None
        if cfg.image_similarity:
            if heldout_image_scores is None or len(heldout_image_scores) == 0:
                raise ValueError("guard.image_similarity needs the held-out normals' Eq. 1 scores")
            image_threshold = float(np.quantile(np.asarray(heldout_image_scores, np.float64), cfg.image_quantile))
        guard = cls(cfg, matcher, text_rule, image_threshold)
        if heldout_image_scores is not None:
            guard.heldout_image_scores = np.asarray(heldout_image_scores, np.float64)
        return guard

    def calibration(self, quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95)) -> dict[str, dict[str, float]]:
        """The held-out scores at several quantiles (what another ``*_quantile`` would give)."""
        out: dict[str, dict[str, float]] = {}
        if self.text_rule is not None:
            out["text"] = {str(q): float(np.quantile(self.text_rule.heldout_scores_, q)) for q in quantiles}
        if self.heldout_image_scores is not None:
            out["image"] = {str(q): float(np.quantile(self.heldout_image_scores, q)) for q in quantiles}
        return out

    def thresholds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.text_rule is not None:
            out["text"] = self.text_rule.threshold_
        if self.image_threshold is not None:
            out["image"] = self.image_threshold
        return out

    def screen(self, texts: Sequence[str], text_emb: np.ndarray | None = None,
               image_scores: np.ndarray | None = None) -> GuardVerdicts:
        """Verdicts for generated items: their descriptions, the descriptions' embeddings (text
        rule) and their images' Eq. 1 scores (image rule)."""
        n = len(texts)
        matched = [self.matcher.match(t) for t in texts]
        t_scores = self.text_rule.score(text_emb) if self.text_rule is not None and n else np.full(n, np.nan)
        i_scores = np.asarray(image_scores, np.float64) if image_scores is not None else np.full(n, np.nan)
        if len(t_scores) != n or len(i_scores) != n:
            raise ValueError(f"guard.screen got {n} texts, {len(t_scores)} text scores and {len(i_scores)} image scores")
        reasons: list[str | None] = []
        for j in range(n):
            if matched[j] is not None:
                reasons.append(NAMES_NORMAL)
            elif self.text_rule is not None and t_scores[j] >= self.text_rule.threshold_:
                reasons.append(TEXT_LIKE_NORMAL)
            elif self.image_threshold is not None and np.isfinite(i_scores[j]) and i_scores[j] < self.image_threshold:
                reasons.append(IMAGE_LIKE_NORMAL)
            else:
                reasons.append(None)
        return GuardVerdicts(reasons, matched, t_scores, i_scores, self.thresholds())


def guard_for_run(cfg: Any, split: Any, features: dict[str, np.ndarray]) -> tuple[NormalLikenessGuard, Any]:
    """The guard of a run, calibrated on its held-out normals: ``(guard, embed)`` where
    ``embed(texts)`` gives the text rule's MiniLM embeddings. ``features``: the normalised
    backbone features of the normal ``train`` and ``holdout`` images (the prep stage's)."""
    from kka_ray.data.protocols import dataset_key
    from kka_ray.generation.minilm import SentenceEmbedder

    g = cfg.guard
    embed = SentenceEmbedder(cfg.paths.cache_dir()) if g.text_similarity else None
    scorer = held = None
    if g.image_similarity:
        from kka_ray.knowledge.mahalanobis import MahalanobisScorer

        scorer = MahalanobisScorer(cfg.knowledge.n_clusters, cfg.knowledge.covariance, seed=cfg.run.seed)
        scorer.fit(features["train"])
        held = scorer.score(features["holdout"])
    exclude = " ".join(cfg.data.caption_templates) + " " + split.domain
    terms = normal_terms(split.normal_class_names, dataset_key(cfg.data), g.normal_terms, split.train.captions,
                         g.caption_term_share, exclude)
    flat = lambda caps: [c for cs in (caps or []) for c in cs]  # noqa: E731
    guard = NormalLikenessGuard.calibrate(g, terms, train_captions=flat(split.train.captions),
                                          heldout_captions=flat(split.holdout.captions), embed=embed,
                                          heldout_image_scores=held)
    guard.scorer = scorer
    return guard, embed
