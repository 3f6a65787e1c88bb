"""Template captions for datasets that have no descriptions (KKA, arXiv 2502.14880, Eq. 2).

Eq. 2 collects the descriptions of the most typical normal images to fill the describer's
prompts. Fashion-MNIST and CIFAR have none, so each image gets captions built from its class
name and templates such as ``"a photo of a {name}."`` (the CLIP-style wording the paper's
prompts imitate). Underscores in class names become spaces and "a" becomes "an" before a
vowel (``aquarium_fish`` -> "a photo of an aquarium fish.").
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {name}.", "a picture of a {name}.", "an image of a {name}."]


def readable_name(class_name: str) -> str:
    """A class name as it should read in a sentence (``aquarium_fish`` -> ``aquarium fish``)."""
    return " ".join(class_name.replace("_", " ").split())


_ARTICLE_BEFORE_NAME = re.compile(r"(^|\s)([Aa]) \{name\}")


def fill_template(template: str, class_name: str) -> str:
    """``template`` with ``{name}`` filled; "a {name}" becomes "an {name}" before a vowel sound."""
    name = readable_name(class_name)
    if name[:1].lower() in "aeio":  # not "u": "a unicycle" but "an umbrella" is too rare to guess
        template = _ARTICLE_BEFORE_NAME.sub(lambda m: f"{m.group(1)}{m.group(2)}n {{name}}", template)
    return template.format(name=name)


def check_templates(templates: Sequence[str]) -> list[str]:
    """Validate caption templates: a non-empty list of strings, each with one ``{name}`` field."""
    if isinstance(templates, str) or not templates:
        raise ValueError(f"caption templates must be a non-empty list of strings, got {templates!r}")
    out = []
    for t in templates:
        if not isinstance(t, str) or "{name}" not in t:
            raise ValueError(f"caption template {t!r} must contain '{{name}}', e.g. 'a photo of a {{name}}.'")
        try:
            t.format(name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"caption template {t!r} has a field other than {{name}} ({err}); write literal braces as {{{{ }}}}") from None
        out.append(t)
    return out


def template_captions(
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    seed: int = 0,
    per_image: int = 1,
) -> list[list[str]]:
    """Captions for each image from its class name: ``per_image`` distinct templates, drawn at random.

    Deterministic for a given ``seed``. ``per_image`` larger than the number of templates is
    capped at it.
    """
    templates = check_templates(templates)
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must index class_names (0..{len(class_names) - 1}), got range [{labels.min()}, {labels.max()}]")
    # Format every (class, template) once; images then only pick indices (60k images in ~50 ms).
    table = [[fill_template(t, n) for t in templates] for n in class_names]
    k = min(per_image, len(templates))
    rng = np.random.default_rng(seed)
    if k == 1:
        picks = rng.integers(0, len(templates), size=labels.size)
        return [[table[c][j]] for c, j in zip(labels.tolist(), picks.tolist())]
    # k distinct templates per image: argsort of uniform noise is a random permutation per row.
    perms = np.argsort(rng.random((labels.size, len(templates))), axis=1)[:, :k]
    return [[table[c][j] for j in row] for c, row in zip(labels.tolist(), perms.tolist())]


def fill_missing_captions(
    captions: list[list[str]] | None,
    labels: np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    seed: int = 0,
) -> list[list[str]]:
    """Keep real captions; give images with none (or a dataset with none) template captions."""
    generated = template_captions(labels, class_names, templates, seed)
    if captions is None:
        return generated
    filled = [list(c) if c else generated[i] for i, c in enumerate(captions)]
    n_missing = sum(1 for c in captions if not c)
    if n_missing:
        logger.info("%d of %d images had no caption and got a template caption", n_missing, len(captions))
    return filled
