"""Detectors by name, built from the ``detector`` config section (method.md "Detectors").

``sad`` (Deep SAD), ``ssd`` (SSD / few-shot SSD), ``simplenet`` (SimpleNet), ``recontrast``
(ReContrast) take KKA's generated anomalies; ``cmda`` is a baseline row (text-image feature
interpolation, no generated images). Modules load only when their detector is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kka_ray.detectors.base import DetectorContext, InputKind

if TYPE_CHECKING:
    from kka_ray.config import DetectorSection
    from kka_ray.detectors.base import Detector

INPUT_KINDS: dict[str, InputKind] = {
    "sad": "features", "ssd": "features", "cmda": "features", "simplenet": "images", "recontrast": "images",
}
# Detectors that use generated anomalies (the others are baseline rows only).
TAKES_ANOMALIES = ("sad", "ssd", "simplenet", "recontrast")


def input_kind(name: str) -> InputKind:
    if name not in INPUT_KINDS:
        raise ValueError(f"unknown detector {name!r}: choose one of {sorted(INPUT_KINDS)} (detector.name / kka eval --detectors)")
    return INPUT_KINDS[name]


def build_detector(name: str, section: "DetectorSection", context: DetectorContext,
                   normal_texts: list[str] | None = None, class_names: list[str] | None = None) -> "Detector":
    """A fresh, unfitted detector ``name`` with its settings from ``section``."""
    input_kind(name)
    if name == "sad":
        from kka_ray.detectors.deep_sad.model import DeepSAD

        return DeepSAD(section, context=context)
    if name == "ssd":
        from kka_ray.detectors.ssd import SSD

        return SSD(section.ssd, context)
    if name == "simplenet":
        from kka_ray.detectors.simplenet.model import SimpleNet

        return SimpleNet(section.simplenet, context)
    if name == "recontrast":
        from kka_ray.detectors.recontrast.model import ReContrast

        return ReContrast(section.recontrast, context)
    from kka_ray.detectors.cmda import CMDA

    return CMDA(section.cmda, section, context, normal_texts=normal_texts, class_names=class_names)
