"""Text generation backends for the describer: prompts in, n sampled texts out, LoRA hot-swap.

Implements the sampling side of Eq. 3 (textual anomalies from representative descriptions)
and Eq. 8 (the same prompts through the DPO-updated LLM). Sampling, not greedy decoding
(greedy repeats itself); the answer is started with the normal captions' own opening
(``answer_prefix``, e.g. "a photo of a"), which made SmolLM2's outputs usable (method.md). A
prompt goes through the tokenizer's chat template (``chat=True``) or is continued as plain text
(``chat=False``: few-shot list completions, base models); :func:`format_prompt` builds both, and
the DPO trainer uses it too.

``TransformersTextGenerator`` is the local default (CPU, batched ``generate``);
``kka_ray.generation.vllm_text.VLLMTextGenerator`` is the GPU-cluster backend with the same
interface. ``describer.make_text_generator`` picks one from the config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kka_ray.generation.resolve import resolve_model_path

if TYPE_CHECKING:
    from kka_ray.config import DescriberSection

logger = logging.getLogger(__name__)

# Adapter files are loaded from safetensors only: a pickled adapter_model.bin could run code.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

__all__ = [
    "TextGenerator",
    "TransformersTextGenerator",
    "format_chat_prompt",
    "format_prompt",
    "resolve_model_path",
    "check_adapter_dir",
]


@runtime_checkable
class TextGenerator(Protocol):
    """What the describer needs from a backend."""

    adapter_version: int  # 0 = the base model (L_ref), v >= 1 = the v-th DPO adapter

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        """``n`` sampled raw outputs (answer prefix included) per prompt, reproducible for ``seed``."""
        ...

    def load_adapter(self, path: str, version: int) -> None:
        """Switch to the LoRA adapter saved at ``path`` (version 0: back to the base model)."""
        ...

    def unload_adapter(self) -> None:
        """Back to the base model."""
        ...


def format_chat_prompt(tokenizer: Any, prompt: str, answer_prefix: str = "") -> str:
    """The chat-formatted text the LLM continues: user message, assistant turn, answer prefix.

    Also used by the DPO trainer (Eq. 7) so that training and sampling see the same text.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template: use an instruction-tuned model "
            "(e.g. the default smollm2-135m-instruct) for the describer"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text + answer_prefix


def format_prompt(tokenizer: Any, prompt: str, answer_prefix: str = "", chat: bool = True) -> str:
    """The text the LLM continues: the chat-formatted user turn (``chat``) or the prompt itself,
    then the answer prefix. A plain prompt starts with the BOS token when the tokenizer adds one
    by default (Gemma's base model writes nonsense without it); the text is always tokenized
    with ``add_special_tokens=False``."""
    if chat:
        return format_chat_prompt(tokenizer, prompt, answer_prefix)
    return _default_bos(tokenizer) + prompt + answer_prefix


def _default_bos(tokenizer: Any) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    added = tokenizer("a")["input_ids"]
    return bos if added and added[0] == tokenizer.bos_token_id and len(added) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) else ""


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a peft LoRA adapter saved as safetensors; return it as a Path."""
    p = Path(path).expanduser()
    if not (p / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a LoRA adapter directory (no {ADAPTER_CONFIG}); pass the directory "
            "the DPO trainer saved with save_pretrained"
        )
    if not (p / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no {ADAPTER_WEIGHTS}; adapters are loaded from safetensors only "
            "(re-save it with save_pretrained(safe_serialization=True))"
        )
    return p


def adapter_to_load(path: str | os.PathLike | None, version: int) -> Path | None:
    """The checked adapter directory for ``version``; None for version 0 (the base model)."""
    if version == 0:
        return None
    if version < 0:
        raise ValueError(f"adapter version must be >= 0, got {version}")
    return check_adapter_dir(path)


def _torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of float32, bfloat16, float16") from None


class TransformersTextGenerator:
    """Batched sampling with ``transformers`` ``generate`` on a resident model; peft LoRA hot-swap."""

    def __init__(self, model_path: str, cfg: "DescriberSection", *, device: str = "cpu", chat: bool = True) -> None:
        """``cfg`` (the ``describer`` section) sets dtype, sampling, batch size and answer prefix."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kka_ray.devices import resolve_device

        self.model_path, self.cfg, self.chat = str(model_path), cfg, chat
        self.device = resolve_device(device)
        self.adapter_version = 0
        self._adapter_name: str | None = None
        self._adapter_count = 0
        trust_remote_code = cfg.trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=_torch_dtype(cfg.dtype), trust_remote_code=trust_remote_code
            )
        except OSError as err:
            raise RuntimeError(f"could not load {self.model_path!r}: {err}") from err
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left so answers line up
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        self._torch = torch
        # One description per line: when only the first line is kept, stop sampling a sequence at
        # its first newline (saves most of max_new_tokens on CPU).
        # (tokenizers that have a token for a blank line, as Gemma's, stop there too)
        newlines = [self.tokenizer.encode(t, add_special_tokens=False) for t in ("\n", "\n\n")]
        self._stop_ids = sorted({ids[0] for ids in newlines if len(ids) == 1}) if cfg.first_sentence_only else []
        logger.info("text generator: %s on %s (%s)", self.model_path, self.device, cfg.dtype)

    # ------------------------------------------------------------------ sampling

    def chat_prompts(self, prompts: list[str]) -> list[str]:
        return [format_prompt(self.tokenizer, p, self.cfg.answer_prefix, self.chat) for p in prompts]

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[str]]:
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        torch = self._torch
        texts = self.chat_prompts(list(prompts))
        # batch_size counts generated sequences: each prompt contributes n of them.
        per_chunk = max(1, self.cfg.batch_size // n)
        torch.manual_seed(int(seed))
        out: list[list[str]] = []
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(texts), per_chunk):
            chunk = texts[start : start + per_chunk]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(
                    **enc,
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    top_k=0,  # nucleus sampling only, as vLLM does by default
                    max_new_tokens=self.cfg.max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=[eos, *self._stop_ids] if self._stop_ids else eos,
                )
            new = ids[:, enc["input_ids"].shape[1] :]  # rows: prompt-major, n per prompt
            decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i in range(len(chunk)):
                out.append([self.cfg.answer_prefix + d for d in decoded[i * n : (i + 1) * n]])
        return out

    # ------------------------------------------------------------------ LoRA hot-swap

    def load_adapter(self, path: str, version: int) -> None:
        """Activate the adapter at ``path`` on the resident base model; drop the previous one."""
        checked = adapter_to_load(path, version)
        if checked is None:
            self.unload_adapter()
            return
        adapter_dir = str(checked)
        from peft import PeftModel

        self._adapter_count += 1
        name = f"kka_v{version}_{self._adapter_count}"  # unique, so reloading a version works
        if self._adapter_name is None:
            self.model = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=name, is_trainable=False)
        else:
            old = self._adapter_name
            self.model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
            self.model.set_adapter(name)
            self.model.delete_adapter(old)
        self.model.to(self.device).eval()
        self._adapter_name = name
        self.adapter_version = int(version)
        logger.info("describer adapter v%d loaded from %s", version, adapter_dir)

    def unload_adapter(self) -> None:
        """Remove the LoRA layers (unmerged): the resident model is the base model again."""
        if self._adapter_name is not None:
            self.model = self.model.unload().eval()
            self._adapter_name = None
        self.adapter_version = 0
