"""Detectors by name (method.md "Detectors"): the one table that maps a name to its class, the
config section holding its settings, what it reads and where it trains.

``sad`` (Deep SAD), ``ssd`` (SSD / few-shot SSD), ``simplenet`` (SimpleNet), ``recontrast``
(ReContrast) take KKA's generated anomalies; ``cmda`` is a baseline row (text-image feature
interpolation, no generated images). Modules load only when their detector is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kka_ray.detectors.base import DetectorContext, InputKind

if TYPE_CHECKING:
    from pydantic import BaseModel

    from kka_ray.config import DetectorSection
    from kka_ray.detectors.base import Detector


@dataclass(frozen=True)
class DetectorSpec:
    module: str  # where the class lives
    cls: str
    input_kind: InputKind
    takes_anomalies: bool  # False: a baseline row only
    section: str | None  # its sub-section of ``detector``; None: the ``detector`` section itself (Deep SAD's fields)
    ray_train: bool  # trained by Ray Train workers (placed by its section's use_gpu / resources_per_worker)


# In the order of the paper's tables.
DETECTORS: dict[str, DetectorSpec] = {
    "ssd": DetectorSpec("kka_ray.detectors.ssd", "SSD", "features", True, "ssd", ray_train=False),
    "sad": DetectorSpec("kka_ray.detectors.deep_sad.model", "DeepSAD", "features", True, None, ray_train=True),
    "simplenet": DetectorSpec("kka_ray.detectors.simplenet.model", "SimpleNet", "images", True, "simplenet", ray_train=True),
    "recontrast": DetectorSpec("kka_ray.detectors.recontrast.model", "ReContrast", "images", True, "recontrast",
                               ray_train=True),
    # CMDA trains a Deep SAD head with the detector section's Deep SAD fields
    "cmda": DetectorSpec("kka_ray.detectors.cmda", "CMDA", "features", False, "cmda", ray_train=True),
}
INPUT_KINDS: dict[str, InputKind] = {name: spec.input_kind for name, spec in DETECTORS.items()}
# Detectors that use generated anomalies (the others are baseline rows only).
TAKES_ANOMALIES = tuple(name for name, spec in DETECTORS.items() if spec.takes_anomalies)


def spec(name: str) -> DetectorSpec:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}: choose one of {sorted(DETECTORS)} (detector.name / kka eval --detectors)")
    return DETECTORS[name]


def input_kind(name: str) -> InputKind:
    return spec(name).input_kind


def own_section(name: str, section: "DetectorSection") -> "BaseModel":
    """The config section that holds detector ``name``'s own settings."""
    s = spec(name)
    return section if s.section is None else getattr(section, s.section)


def placement_section(name: str, section: "DetectorSection") -> "BaseModel | None":
    """The section whose ``use_gpu`` / ``resources_per_worker`` place ``name``'s Ray Train
    workers (None: fitted by the driver itself). CMDA's Deep SAD head is placed as Deep SAD is."""
    s = spec(name)
    if not s.ray_train:
        return None
    return section if name == "cmda" else own_section(name, section)


def settings_of(name: str, section: "DetectorSection") -> dict[str, Any]:
    """The settings ``name`` trains with, as JSON values (CMDA: its own and Deep SAD's)."""
    from kka_ray.config import DeepSADSection

    dump = section.model_dump(mode="json")
    sad = {k: dump[k] for k in DeepSADSection.model_fields}
    if name == "sad":
        return sad
    own = own_section(name, section).model_dump(mode="json")
    return {**sad, "cmda": own} if name == "cmda" else own


def build_detector(name: str, section: "DetectorSection", context: DetectorContext,
                   normal_texts: list[str] | None = None, class_names: list[str] | None = None) -> "Detector":
    """A fresh, unfitted detector ``name`` with its settings from ``section``."""
    s = spec(name)
    cls = getattr(importlib.import_module(s.module), s.cls)
    own = own_section(name, section)
    if name == "cmda":
        return cls(own, section, context, normal_texts=normal_texts, class_names=class_names)
    return cls(own, context=context)
