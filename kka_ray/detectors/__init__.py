"""Anomaly detectors KKA plugs into (method.md "Detectors"): torch models + a PyOD-like API.

``deep_sad`` holds Deep SAD (Eq. 5), used both as the confusion evaluator and as the SAD
detector. Each subpackage keeps its ``torch_model.py`` (plain ``nn.Module``) beside the
code that trains it; importing this package loads no torch or ray.
"""
