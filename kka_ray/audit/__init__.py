"""The audit of what KKA generates (method.md step 3): an independent judge and the figures it
yields per iteration (``normal_leak``, ``coverage``, judged class histograms of the kept set and of
its hard and easy parts, and of what the guard dropped). An audit only: the loop reads nothing
from it."""

from kka_ray.audit.figures import judged_figures, text_figures
from kka_ray.audit.judge import Judge, load_or_train_judge

__all__ = ["Judge", "judged_figures", "load_or_train_judge", "text_figures"]
