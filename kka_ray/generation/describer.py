"""The describer: the LLM ``L`` that writes textual anomalies (Eq. 3) and, after DPO, more hard ones (Eq. 8).

A plain class that the engine runs as a resident Ray actor (``ray.remote(Describer)``) or
as a Ray Data ``map_batches`` actor pool: the model is loaded once per actor, stays resident
across iterations, and takes each new DPO adapter without a restart. Every kept
description records the adapter version that wrote it.

Input batch (columns of equal length): ``prompt_id``, ``prompt`` (the filled prompt
template), ``description`` (the representative normal description it was built from),
``cluster``, ``seed`` (the batch seed; rows with different seeds are sampled separately).
Output batch: one row per kept description with ``prompt_id``, ``sample_idx`` (position
among the prompt's n samples, stable when others are dropped), ``prompt``, ``description``,
``cluster``, ``text``, ``adapter_version``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kka_ray.generation.parsing import DROP_REASONS, description_key, parse_descriptions

if TYPE_CHECKING:
    from kka_ray.config import DescriberSection
    from kka_ray.generation.text import TextGenerator

logger = logging.getLogger(__name__)

INPUT_COLUMNS = ("prompt_id", "prompt", "description", "cluster", "seed")
OUTPUT_COLUMNS = ("prompt_id", "sample_idx", "prompt", "description", "cluster", "text", "adapter_version")
_COUNT_KEYS = ("generated", "kept", *(f"dropped_{r}" for r in DROP_REASONS))


def _zero_counts() -> dict[str, float]:
    counts: dict[str, float] = {k: 0 for k in _COUNT_KEYS}
    counts["generate_seconds"] = 0.0
    return counts


class Describer:
    """Resident LLM + current LoRA adapter: prompts in, parsed anomaly descriptions out."""

    def __init__(self, cfg: "DescriberSection", cache_dir: str | os.PathLike, device: str = "cpu") -> None:
        threads = cfg.resources.torch_threads
        if threads is not None:
            import torch

            torch.set_num_threads(int(threads))
        self.cfg = cfg
        self.generator = make_text_generator(cfg, cache_dir, device)
        self.iteration = 0
        self._seen: set[str] = set()
        self._total = _zero_counts()
        self._iter = _zero_counts()
        self._fresh = True  # no batch described yet: a restarted actor takes its filter from the ledger

    # ------------------------------------------------------------------ actor API

    def ready(self) -> bool:
        return True

    def adapter_version(self) -> int:
        return int(self.generator.adapter_version)

    def load_adapter(self, path: str | None, version: int) -> int:
        """Hot-swap to the adapter at ``path`` (``version`` 0: back to the base model)."""
        if version == 0 or path is None:
            self.generator.unload_adapter()
        else:
            self.generator.load_adapter(str(path), int(version))
        return self.adapter_version()

    def unload_adapter(self) -> int:
        self.generator.unload_adapter()
        return 0

    def reset(self, iteration: int) -> None:
        """Start iteration ``iteration``: forget the kept descriptions and the per-iteration counts."""
        self.iteration = int(iteration)
        self._seen.clear()
        self._iter = _zero_counts()

    def stats(self) -> dict[str, Any]:
        """Cumulative counts at the top level (numbers only, so replicas' stats can be summed);
        the current iteration's under ``"iteration_counts"``."""
        out: dict[str, Any] = dict(self._total)
        out["iteration_counts"] = dict(self._iter)
        return out

    # ------------------------------------------------------------------ generation

    def describe(self, batch: dict[str, np.ndarray], adapter: tuple[str | None, int] | None = None,
                 ledger: Any = None) -> dict[str, np.ndarray]:
        """Descriptions for a batch of prompt rows. ``adapter`` (path, version): the adapter the
        pool holds, loaded first if this actor lacks it (after a restart it has the base model);
        ``ledger``: a GenerationLedger actor that gets this batch's counts."""
        if adapter is not None and int(adapter[1]) != self.adapter_version():
            self.load_adapter(adapter[0], int(adapter[1]))
        if self._fresh and ledger is not None:
            import ray

            self._seen.update(description_key(t) for t in ray.get(ledger.kept_texts.remote("describer")))
        self._fresh = False
        cols = _input_columns(batch)
        version = self.adapter_version()
        rows, counts, seconds = self._sample(cols)
        self._record(cols, rows, counts, seconds, version, ledger)
        src = np.array([r[0] for r in rows], dtype=np.int64)
        return {
            "prompt_id": cols["prompt_id"][src],
            "sample_idx": np.array([r[1] for r in rows], dtype=np.int64),
            "prompt": cols["prompt"][src].astype(object),
            "description": cols["description"][src].astype(object),
            "cluster": cols["cluster"][src],
            "text": np.array([r[2] for r in rows], dtype=object),
            "adapter_version": np.full(len(rows), version, dtype=np.int64),
        }

    __call__ = describe  # so Ray Data can use the class directly in map_batches

    def _sample(self, cols: dict[str, np.ndarray]) -> tuple[list[tuple[int, int, str]], Counter, float]:
        """``samples_per_prompt`` samples per row, parsed: (input row, sample_idx, text) of the kept
        ones, the drop counts, and the seconds it took. Rows sharing a seed are sampled in one
        call, in input order."""
        n, n_rows = self.cfg.samples_per_prompt, len(cols["prompt"])
        rows: list[tuple[int, int, str]] = []
        counts: Counter = Counter()
        start = time.perf_counter()
        for seed in dict.fromkeys(int(s) for s in cols["seed"]):
            idx = [i for i in range(n_rows) if int(cols["seed"][i]) == seed]
            raw = self.generator.generate([str(cols["prompt"][i]) for i in idx], n, seed)
            for i, outputs in zip(idx, raw):
                if len(outputs) != n:
                    raise RuntimeError(f"text backend returned {len(outputs)} samples for a prompt, expected {n}")
                parsed, drops = parse_descriptions(outputs, max_chars=self.cfg.max_chars,
                                                   first_sentence_only=self.cfg.first_sentence_only,
                                                   answer_prefix=self.cfg.answer_prefix, seen=self._seen)
                counts.update(drops)
                counts["generated"] += len(outputs)
                rows.extend((i, k, text) for k, text in enumerate(parsed) if text is not None)
        counts["kept"] = len(rows)
        return rows, counts, time.perf_counter() - start

    def _record(self, cols: dict[str, np.ndarray], rows: list[tuple[int, int, str]], counts: Counter,
                seconds: float, version: int, ledger: Any) -> None:
        """Add a batch's counts to this actor's totals and, keyed by the batch's rows (a retried
        batch overwrites its record), to the ledger."""
        batch_counts = {"generated": counts["generated"], "kept": counts["kept"], "generate_seconds": seconds,
                        **{f"dropped_{r}": counts[r] for r in DROP_REASONS}}
        if ledger is not None:
            import ray

            key = (int(cols["seed"][0]), *sorted(int(x) for x in cols["prompt_id"])) if len(cols["seed"]) else ()
            ray.get(ledger.record.remote("describer", str(key), batch_counts, [r[2] for r in rows]))
        for target in (self._total, self._iter):
            for name, value in batch_counts.items():
                target[name] += value
        if counts["generated"]:
            logger.debug(
                "describer: %d generated, %d kept, drops %s (adapter v%d, %.1fs)",
                counts["generated"], counts["kept"], {r: counts[r] for r in DROP_REASONS if counts[r]}, version, seconds,
            )


def _input_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's input columns as arrays of one length, or an error naming what is wrong."""
    missing = [c for c in INPUT_COLUMNS if c not in batch]
    if missing:
        raise KeyError(f"describer batch lacks columns {missing}; it needs {list(INPUT_COLUMNS)} (got {sorted(batch)})")
    cols = {c: np.asarray(batch[c]) for c in INPUT_COLUMNS}
    n_rows = len(cols["prompt"])
    if any(len(v) != n_rows for v in cols.values()):
        raise ValueError(f"describer batch columns differ in length: { {c: len(v) for c, v in cols.items()} }")
    return cols


def make_text_generator(cfg: "DescriberSection", cache_dir: str | os.PathLike, device: str = "cpu") -> "TextGenerator":
    """Build the backend ``cfg.backend`` names, with the model resolved against ``cache_dir``."""
    from kka_ray.generation.resolve import missing_model_message, resolve_model_path
    from kka_ray.generation.text import TransformersTextGenerator
    from kka_ray.knowledge.prompts import resolve_template

    model_path = resolve_model_path(cfg.model, cache_dir)
    chat = resolve_template(cfg).chat
    if cfg.backend == "vllm":
        from kka_ray.generation.vllm_text import VLLMTextGenerator

        return VLLMTextGenerator(model_path, cfg, chat=chat)
    if cfg.backend == "transformers":
        try:
            return TransformersTextGenerator(model_path, cfg, device=device, chat=chat)
        except RuntimeError as err:
            if "could not load" in str(err) and not Path(model_path).is_dir():
                raise RuntimeError(missing_model_message(cfg.model, cache_dir) + f" ({err})") from err
            raise
    raise ValueError(f"describer.backend {cfg.backend!r} is not one of transformers, vllm")
