"""Prompts for Eq. 3 of KKA (arXiv 2502.14880): the describer is asked for new, anomalous
descriptions in the structure and style of a representative normal description (Eq. 2).

A template holds ``{description}`` (required) and optionally ``{domain}`` and ``{normal}`` (the
normal class names, "t-shirt/top" or "airplane or beach"); e.g. the paper's "Please generate new
sentences that describe {domain}. The sentences should follow the exact structure and style of
the example below: {description}", sent through the chat template, or the default few-shot list
completion "Captions of {domain}, a different kind of item on each line:\n- {description}\n- ",
which the answer prefix continues without a chat template. Prompts cycle over the clusters
(round robin) so every mode of the normal data is represented.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Sequence

from kka_ray.knowledge.selection import Representative

logger = logging.getLogger(__name__)

DESCRIPTION_FIELD = "{description}"
DOMAIN_FIELD = "{domain}"
NORMAL_FIELD = "{normal}"


def check_template(template: str) -> str:
    """Return ``template`` if it can be filled; raise a clear error otherwise."""
    if not isinstance(template, str) or DESCRIPTION_FIELD not in template:
        raise ValueError(
            f"prompt template must contain {DESCRIPTION_FIELD} (where the representative description goes), "
            f"got {template!r}; set describer.template to a name in describer.templates or to such a text"
        )
    return template


def fill_template(template: str, domain: str, description: str, normal: str = "") -> str:
    """Replace ``{domain}``, ``{normal}`` and ``{description}``; other braces are left as they are."""
    return (check_template(template).replace(DOMAIN_FIELD, domain).replace(NORMAL_FIELD, normal)
            .replace(DESCRIPTION_FIELD, description))


def normal_concept(class_names: Sequence[str]) -> str:
    """The normal classes as the ``{normal}`` field reads them ("t-shirt/top", "a or b")."""
    from kka_ray.data.captions import readable_name

    return " or ".join(readable_name(n) for n in class_names)


def resolve_template(describer: Any) -> Any:
    """The :class:`~kka_ray.config.PromptTemplate` of a ``DescriberSection``: ``describer.template``
    names an entry of ``describer.templates`` or is itself a chat template's text."""
    from kka_ray.config import PromptTemplate

    name = describer.template
    template = describer.templates.get(name)
    if template is None:
        template = PromptTemplate(text=check_template(name))
    return template


def build_prompts(
    template: str,
    domain: str,
    representatives: Sequence[Representative],
    num_prompts: int,
    seed: int,
    normal: str = "",
) -> list[dict[str, Any]]:
    """Eq. 3 prompts: ``num_prompts`` dicts with ``prompt_id``, ``prompt``, ``description``, ``cluster``.

    Clusters take turns in increasing id (round robin), so every cluster appears once
    ``num_prompts`` >= the number of clusters. Within a cluster the descriptions are used in an
    order shuffled with ``seed``; once all are used they are reshuffled and reused. The same
    inputs and seed give the same prompts.
    """
    check_template(template)
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts} (describer.num_prompts)")
    if not representatives:
        raise ValueError("no representative descriptions to build prompts from (Eq. 2 selected none: are captions empty?)")
    by_cluster: dict[int, list[str]] = {}
    for rep in representatives:
        by_cluster.setdefault(int(rep.cluster), []).append(rep.description)
    clusters = sorted(by_cluster)
    if num_prompts < len(clusters):
        logger.warning("%d prompts cannot cover %d clusters: clusters %s get none", num_prompts, len(clusters), clusters[num_prompts:])

    rng = random.Random(seed)
    queues: dict[int, list[str]] = {c: [] for c in clusters}
    prompts: list[dict[str, Any]] = []
    for prompt_id in range(num_prompts):
        cluster = clusters[prompt_id % len(clusters)]
        if not queues[cluster]:
            order = list(by_cluster[cluster])
            rng.shuffle(order)
            queues[cluster] = order
        description = queues[cluster].pop(0)
        prompts.append(
            {
                "prompt_id": prompt_id,
                "prompt": fill_template(template, domain, description, normal),
                "description": description,
                "cluster": cluster,
            }
        )
    return prompts
