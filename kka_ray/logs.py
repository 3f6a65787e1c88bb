"""Logging set-up for the entry points: warnings from every library, ``kka_ray``'s own at the
run's ``run.log_level``. Kept apart so that ``kka --help`` imports nothing heavy."""

from __future__ import annotations

import logging


def setup_logging(level: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kka_ray").setLevel(getattr(logging, level))
