"""A tiny causal LM with SmolLM2's real tokenizer and chat template, random weights.

Used by tests and smoke runs of the describer (Eq. 3, 8) and the DPO trainer (Eq. 7): the
same transformers/peft/TRL code paths as SmolLM2-135M-Instruct, at a size that trains in
seconds on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kka_ray.generation.smollm2 import smollm2_gguf_path
from kka_ray.testing import built_once

logger = logging.getLogger(__name__)

__all__ = ["smollm2_gguf_path", "load_smollm2_tokenizer", "make_tiny_causal_lm"]


def load_smollm2_tokenizer():
    """SmolLM2's tokenizer (with chat template), read from the package's GGUF."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@built_once("config.json")
def make_tiny_causal_lm(out: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> None:
    """Save a random-weight Llama-architecture LM with SmolLM2's tokenizer to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_smollm2_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    logger.info("tiny causal LM saved to %s", out)
