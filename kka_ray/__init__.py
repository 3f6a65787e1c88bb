"""kka_ray: Key Knowledge Augmentation (arXiv 2502.14880) as a Ray-distributed engine.

An LLM describes plausible anomalies for a set of normal images, a text-to-image model
draws them, a Deep SAD confusion evaluator splits them into easy and hard, DPO teaches the
LLM to write more hard ones, and a detector trained on normal + generated images improves
each iteration. Heavy libraries (torch, ray, transformers, diffusers, vllm) load lazily.
"""

__version__ = "0.1.0"
