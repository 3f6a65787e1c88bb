"""Tests of the preference stage (method.md Eq. 6 -> Eq. 7): pair building and DPO with LoRA.

Pair building is checked on hand-made anomaly-store rows whose expected pairs are worked out
below. DPO runs TRL's real DPOTrainer on a tiny random Llama with SmolLM2's tokenizer; the
continued-adapter run is checked against DPO rewards computed by hand from the saved adapter
and the base model (beta * [log pi(y|x) - log pi_ref(y|x)]).
"""

from __future__ import annotations

import logging
import os
import math

import pytest

from kka_ray.config import DeepSpeedSection, PreferenceSection
from kka_ray.preference import ADAPTER_FILES, PreferencePair, build_pairs, deepspeed_config

PFX = "a photo of a"


def _row(pid, text, dist, hard, prompt=None):
    return {"prompt_id": pid, "prompt": prompt or f"prompt {pid}", "text": text, "distance": dist, "is_hard": hard}


# prompt 0: hard a2 (0.2) < a1 (0.5) < a3 (0.9); easy e2 (5.0) > e1 (3.0)
# prompt 1: hard b1 (0.4) only; prompt 2: easy c1 (4.0) > c2 (2.0) only
RECORDS = [
    _row(0, f"{PFX} a1", 0.5, True),
    _row(0, f"{PFX} a2", 0.2, True),
    _row(0, f"{PFX} a3", 0.9, True),
    _row(0, f"{PFX} e1", 3.0, False),
    _row(0, f"{PFX} e2", 5.0, False),
    _row(1, f"{PFX} b1", 0.4, True),
    _row(2, f"{PFX} c1", 4.0, False),
    _row(2, f"{PFX} c2", 2.0, False),
]


def _triples(pairs):
    return [(p.prompt_id, p.chosen, p.rejected, p.same_prompt) for p in pairs]


# ----------------------------------------------------------------------------- pairs


def test_same_prompt_first_hardest_vs_easiest_then_cross_prompt_leftovers():
    pairs = build_pairs(RECORDS, max_pairs=10, seed=0, answer_prefix=PFX)
    assert _triples(pairs) == [
        (0, " a2", " e2", True),  # hardest of prompt 0 vs its easiest
        (0, " a1", " e1", True),
        (1, " b1", " c1", False),  # leftover hard (0.4 < 0.9) vs leftover easy (4.0 > 2.0)
        (0, " a3", " c2", False),  # uses the hard text's prompt
    ]
    assert pairs[2].prompt == "prompt 1" and pairs[3].prompt == "prompt 0"
    assert (pairs[0].chosen_distance, pairs[0].rejected_distance) == (0.2, 5.0)
    assert all(isinstance(p, PreferencePair) for p in pairs)


def test_cap_prefers_same_prompt_pairs():
    assert _triples(build_pairs(RECORDS, max_pairs=1, seed=0, answer_prefix=PFX)) == [(0, " a2", " e2", True)]
    assert [p.same_prompt for p in build_pairs(RECORDS, max_pairs=3, seed=0, answer_prefix=PFX)] == [True, True, False]


def test_cap_takes_each_prompts_best_pair_before_any_second():
    rows = [_row(pid, f"{pid}-{k}", d, hard) for pid in (0, 1) for k, (d, hard) in
            enumerate([(0.1, True), (0.2, True), (9.0, False), (8.0, False)])]
    full = build_pairs(rows, max_pairs=10, seed=3)
    assert len(full) == 4 and all(p.same_prompt for p in full)
    capped = build_pairs(rows, max_pairs=2, seed=3)
    assert sorted(_triples(capped)) == [(0, "0-0", "0-2", True), (1, "1-0", "1-2", True)]


def test_no_text_reused_on_either_side():
    rows = RECORDS + [_row(1, f"{PFX} a2", 0.3, True), _row(2, f"{PFX} e2", 6.0, False)]  # repeated texts
    pairs = build_pairs(rows, max_pairs=50, seed=1, answer_prefix=PFX)
    chosen = [p.chosen for p in pairs]
    rejected = [p.rejected for p in pairs]
    assert len(chosen) == len(set(chosen)) and len(rejected) == len(set(rejected))
    assert set(chosen).isdisjoint(rejected)


def test_prefix_stripping_keeps_the_boundary_space_and_leaves_other_texts():
    rows = [_row(0, f"{PFX} red boot.", 0.1, True), _row(0, "a drawing of a car.", 7.0, False)]
    (pair,) = build_pairs(rows, max_pairs=4, seed=0, answer_prefix=PFX)
    assert (pair.chosen, pair.rejected) == (" red boot.", "a drawing of a car.")
    (raw,) = build_pairs(rows, max_pairs=4, seed=0)  # no prefix: texts as they are
    assert raw.chosen == f"{PFX} red boot."


def test_no_hard_or_no_easy_gives_no_pairs():
    assert build_pairs([r for r in RECORDS if not r["is_hard"]], max_pairs=8, seed=0) == []
    assert build_pairs([r for r in RECORDS if r["is_hard"]], max_pairs=8, seed=0) == []
    assert build_pairs([], max_pairs=8, seed=0) == []


def test_malformed_rows_are_skipped_and_counted(caplog):
    import numpy as np

    bad = [
        {"prompt_id": 5, "text": "no prompt", "distance": 1.0, "is_hard": True},
        _row(5, "nan distance", float("nan"), True),
        _row(5, "string flag", 0.1, "yes"),
        _row(5, PFX, 0.1, True),  # nothing after the prefix
    ]
    good = [_row(6, "numpy flag", 0.3, np.bool_(True)), _row(6, "far", 4.0, np.bool_(False))]
    with caplog.at_level(logging.WARNING, logger="kka_ray.preference.pairs"):
        pairs = build_pairs(bad + good, max_pairs=8, seed=0, answer_prefix=PFX)
    assert _triples(pairs) == [(6, "numpy flag", "far", True)]
    assert "skipped 4 malformed records" in caplog.text
    with pytest.raises(ValueError, match="max_pairs"):
        build_pairs(RECORDS, max_pairs=0, seed=0)


def test_deterministic_for_a_seed_and_ties_broken_by_it():
    rows = [_row(i, f"h{i}", 0.5, True) for i in range(6)] + [_row(i, f"e{i}", 3.0, False) for i in range(6, 12)]
    runs = {seed: _triples(build_pairs(rows, max_pairs=3, seed=seed)) for seed in range(6)}
    assert runs[2] == _triples(build_pairs(rows, max_pairs=3, seed=2))
    assert len({tuple(v) for v in runs.values()}) > 1  # equal distances: the seed decides
    assert all(not same for v in runs.values() for *_, same in v)


# ----------------------------------------------------------------------------- DPO


def test_deepspeed_config_dict():
    cfg = deepspeed_config(DeepSpeedSection(enabled=True, zero_stage=2))
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in cfg
    off = deepspeed_config(DeepSpeedSection(enabled=True, zero_stage=3, offload_optimizer=True))
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert off["optimizer"]["type"] == "AdamW"
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(DeepSpeedSection(enabled=True, zero_stage=0, offload_optimizer=True))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch

    from kka_ray.testing.tiny_lm import make_tiny_causal_lm

    torch.set_num_threads(1)
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm")))


def _cfg(**kw) -> PreferenceSection:
    base = dict(max_steps=2, batch_size=2, learning_rate=1e-2, max_length=128)
    return PreferenceSection(**{**base, **kw})


def _lora_weights(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{adapter_dir}/adapter_model.safetensors")


@pytest.fixture(scope="module")
def first_run(tiny_lm, tmp_path_factory):
    from kka_ray.preference import run_dpo

    pairs = build_pairs(RECORDS, max_pairs=4, seed=0, answer_prefix=PFX)
    out = tmp_path_factory.mktemp("dpo") / "adapter_v1"
    metrics = run_dpo(tiny_lm, pairs, str(out), _cfg(), answer_prefix=PFX, seed=0)
    return out, metrics


def test_run_dpo_trains_and_saves_only_the_adapter(tiny_lm, first_run):
    import torch

    from kka_ray.preference.dpo import _load_policy

    out, metrics = first_run
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    saved = _lora_weights(out)
    assert saved and all("lora_" in k for k in saved)
    # Init: B = 0, A drawn after set_seed(0); training moved both.
    torch.manual_seed(0)
    from transformers import set_seed

    set_seed(0)
    init, _ = _load_policy(tiny_lm, _cfg(), None, False)
    init_sd = {k: v for k, v in init.state_dict().items() if "lora_" in k}
    for key, value in saved.items():
        start = next(v for k, v in init_sd.items() if k.replace(".default", "") == key)
        assert not torch.equal(start, value), key
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    # Metrics: a fresh adapter starts at pi = pi_ref, so step 1's DPO loss is -log sigma(0) = log 2.
    assert metrics["steps"] == 2 and metrics["n_pairs"] == 4 and metrics["n_pairs_too_long"] == 0
    assert math.isfinite(metrics["train_loss"]) and len(metrics["history"]) == 2
    assert metrics["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert 0.0 <= metrics["rewards/accuracies"] <= 1.0 and math.isfinite(metrics["rewards/margins"])
    assert metrics["deepspeed_zero_stage"] is None and metrics["wall_seconds"] > 0


def test_trl_prompt_gives_the_describers_token_ids(tiny_lm):
    from transformers import AutoTokenizer

    from kka_ray.generation.text import format_chat_prompt
    from kka_ray.preference.dpo import _as_trl_prompt

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = format_chat_prompt(tok, "Describe an odd item.", PFX)
    describer_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert _as_trl_prompt(tok, text) == text  # SmolLM2 adds no special tokens
    tok.add_bos_token = True  # a tokenizer that prepends BOS (the template starts with it too)
    assert text.startswith(tok.bos_token)
    assert tok(_as_trl_prompt(tok, text))["input_ids"] == describer_ids
    assert tok(text)["input_ids"] != describer_ids  # what TRL would have seen: a doubled BOS


def _completion_logp(model, tok, prompt_text: str, completion: str) -> float:
    """Sum of log-probs of ``completion + EOS`` after ``prompt_text`` (TRL's tokenization)."""
    import torch

    p_ids = tok(prompt_text)["input_ids"]
    full = tok(prompt_text + completion + tok.eos_token)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    tok_logp = logp.gather(1, ids[0, 1:, None])[:, 0]
    return tok_logp[len(p_ids) - 1 :].sum().item()


def test_second_run_continues_from_previous_adapter_with_base_as_reference(tiny_lm, first_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kka_ray.preference import run_dpo
    from kka_ray.generation.text import format_chat_prompt
    from kka_ray.preference.dpo import _load_policy

    out1, _ = first_run
    saved1 = _lora_weights(out1)
    # Loading for continuation gives exactly the saved weights, trainable.
    policy, _ = _load_policy(tiny_lm, _cfg(), str(out1), False)
    loaded = {k.replace(".default", ""): v for k, v in policy.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved1.keys() and all(torch.equal(loaded[k], saved1[k]) for k in saved1)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)

    # Step 1 of the continued run, worked out by hand: reward = beta * (log pi_v1 - log pi_base).
    pair = PreferencePair("Describe an odd item.", " boot made of glass.", " car on a road.", True, 0)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    prompt_text = format_chat_prompt(tok, pair.prompt, PFX)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), str(out1)).eval()
    lp = {side: _completion_logp(model, tok, prompt_text, getattr(pair, side)) for side in ("chosen", "rejected")}
    with model.disable_adapter():
        lp_ref = {side: _completion_logp(model, tok, prompt_text, getattr(pair, side)) for side in lp}
    beta = 0.1
    r_c, r_r = beta * (lp["chosen"] - lp_ref["chosen"]), beta * (lp["rejected"] - lp_ref["rejected"])
    assert abs(r_c - r_r) > 1e-4  # the first run moved the policy away from the base

    out2 = tmp_path / "adapter_v2"
    m2 = run_dpo(tiny_lm, [pair, pair], str(out2), _cfg(max_steps=1), prev_adapter=str(out1), answer_prefix=PFX)
    step1 = m2["history"][0]
    assert step1["rewards/chosen"] == pytest.approx(r_c, rel=1e-3, abs=1e-5)
    assert step1["rewards/rejected"] == pytest.approx(r_r, rel=1e-3, abs=1e-5)
    assert step1["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-(r_c - r_r)))), rel=1e-3)
    saved2 = _lora_weights(out2)
    assert saved2.keys() == saved1.keys() and any(not torch.equal(saved1[k], saved2[k]) for k in saved1)


def test_previous_adapter_as_reference_via_remote_entry(tiny_lm, first_run, tmp_path):
    from kka_ray.preference import dpo_remote_entry

    out1, _ = first_run
    pair = PreferencePair("Describe an odd item.", " boot made of glass.", " car on a road.", True, 0)
    cfg = _cfg(max_steps=1, reference="previous_adapter").model_dump()
    cfg["resources"]["torch_threads"] = 1
    m = dpo_remote_entry(
        base_model=tiny_lm, pairs=[pair, pair], out_dir=str(tmp_path / "v2"), cfg=cfg,
        prev_adapter=str(out1), answer_prefix=PFX,
    )
    # Reference = the starting adapter: pi = pi_ref at step 1, so the loss is log 2.
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "v2" / "adapter_model.safetensors").is_file()


def test_run_dpo_rejects_bad_input(tiny_lm, tmp_path):
    from kka_ray.preference import run_dpo

    pair = PreferencePair("p", " a", " b", True, 0)
    with pytest.raises(ValueError, match="no preference pairs"):
        run_dpo(tiny_lm, [], str(tmp_path / "x"), _cfg())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        run_dpo(tiny_lm, [pair], str(tmp_path / "x"), _cfg(), prev_adapter=str(tmp_path))
    with pytest.raises(ValueError, match="raise preference.max_length"):  # the chat template alone is > 16
        run_dpo(tiny_lm, [pair], str(tmp_path / "x"), _cfg(max_length=16))
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_deepspeed_zero2_cpu_single_process_matches_plain_run(tiny_lm, tmp_path):
    """ZeRO-2 in one CPU process (first use compiles DeepSpeed's shm comm op: minutes)."""
    import torch

    from kka_ray.preference import run_dpo

    pairs = build_pairs(RECORDS, max_pairs=4, seed=0, answer_prefix=PFX)
    ds_cfg = _cfg(max_steps=1, deepspeed={"enabled": True, "zero_stage": 2})
    m_ds = run_dpo(tiny_lm, pairs, str(tmp_path / "ds"), ds_cfg, answer_prefix=PFX, seed=0)
    assert m_ds["deepspeed_zero_stage"] == 2 and m_ds["steps"] == 1
    assert m_ds["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    m_plain = run_dpo(tiny_lm, pairs, str(tmp_path / "plain"), _cfg(max_steps=1), answer_prefix=PFX, seed=0)
    assert m_plain["deepspeed_zero_stage"] is None
    ds_w, plain_w = _lora_weights(tmp_path / "ds"), _lora_weights(tmp_path / "plain")
    assert ds_w.keys() == plain_w.keys()
    for k in ds_w:  # same seed, same data, same AdamW step: ZeRO-2 on one rank changes nothing
        torch.testing.assert_close(ds_w[k], plain_w[k], rtol=1e-4, atol=1e-6)


def test_dpo_widens_the_chosen_rejected_margin_on_a_list_completion_prompt(tiny_lm, tmp_path):
    """What DPO is for: after training, the policy prefers the hard (chosen) completions over the easy
    and normal-like (rejected) ones by a wider log-probability margin than the base model does, on
    the describer's exact completion-prompt text (no chat template)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kka_ray.generation.text import format_prompt
    from kka_ray.preference import run_dpo

    prompt = "Captions of photos of fashion products, a different kind of item on each line:\n- a photo of a t-shirt.\n- "
    rows = [_row(i, f"{PFX} {w}", d, h, prompt=prompt) for i, (w, d, h) in enumerate([
        ("shirt with buttons.", 0.1, True), ("hooded pullover.", 0.2, True), ("long coat.", 0.3, True),
        ("pair of sneakers.", 9.0, False), ("leather bag.", 8.0, False), ("sandal.", 7.0, False)])]
    rows.append({**_row(9, f"{PFX} t-shirt.", float("inf"), False, prompt=prompt)})  # normal-like: rejected first
    pairs = build_pairs(rows, max_pairs=8, seed=0, answer_prefix=PFX)
    assert len(pairs) == 3 and pairs[0].rejected == " t-shirt." and pairs[0].rejected_distance == math.inf
    out = tmp_path / "adapter"
    m = run_dpo(tiny_lm, pairs, str(out), _cfg(max_steps=12, batch_size=3, learning_rate=2e-2), answer_prefix=PFX,
                seed=0, chat=False)
    assert m["last_loss"] < 0.6 < m["first_loss"]  # log 2 at step 1, learned by the last
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    text = format_prompt(tok, prompt, PFX, chat=False)
    assert text == prompt + PFX
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), str(out)).eval()

    def margin():
        return sum(_completion_logp(model, tok, text, p.chosen) - _completion_logp(model, tok, text, p.rejected)
                   for p in pairs) / len(pairs)

    after = margin()
    with model.disable_adapter():
        before = margin()
    assert after - before > 1.0, (before, after)
    torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 2], ids=["ddp", "zero2"])
def test_dpo_on_two_ray_train_workers_matches_one_process(tiny_lm, tmp_path, ray_two_cpus, zero_stage):
    """The DPO job as a Ray Train TorchTrainer with two gloo workers (DDP, or DeepSpeed ZeRO-2
    sharding the optimizer state), two pairs per worker, against one process with all four pairs
    per step: each step's gradient is the mean over the same four pairs, so the per-step losses and
    the saved LoRA weights agree up to float summation order (tolerance 1e-4 on the loss)."""
    import torch

    from kka_ray.preference import run_dpo, run_dpo_ray_train

    pairs = build_pairs(RECORDS, max_pairs=4, seed=0, answer_prefix=PFX)
    assert len(pairs) == 4
    one = run_dpo(tiny_lm, pairs, str(tmp_path / "one"), _cfg(max_steps=3, batch_size=4), answer_prefix=PFX, seed=0)
    ds = {"enabled": zero_stage is not None, "zero_stage": zero_stage or 2}
    two_cfg = _cfg(max_steps=3, batch_size=2, num_workers=2, deepspeed=ds,
                   resources={"num_cpus": 1, "torch_threads": 1})
    two = run_dpo_ray_train(tiny_lm, pairs, str(tmp_path / "two"), two_cfg, storage_path=str(tmp_path / "ray_train"),
                            name="dpo", answer_prefix=PFX, seed=0)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["deepspeed_zero_stage"] == zero_stage and two["steps"] == one["steps"] == 3
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(ADAPTER_FILES)
    l1, l2 = ([h["loss"] for h in m["history"]] for m in (one, two))
    assert l1[0] == pytest.approx(math.log(2), abs=1e-6) and l1[-1] < l1[0]  # it learned, on both
    assert l2 == pytest.approx(l1, abs=1e-4)
    w1, w2 = _lora_weights(tmp_path / "one"), _lora_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_the_dpo_job_replaces_a_killed_worker_and_finishes(tiny_lm, tmp_path, ray_two_cpus):
    """A Ray Train DPO worker killed (SIGKILL) mid-job: FailureConfig starts a new worker group, the
    job runs again from the same seed and leaves a whole adapter with every step done."""
    import signal
    import time

    from kka_ray.preference import run_dpo_ray_train

    from conftest import own_ray_pids, start_background

    def workers() -> set[int]:  # this test's own Ray cluster only
        return own_ray_pids("RayTrainWorker")

    pairs = build_pairs(RECORDS, max_pairs=4, seed=0, answer_prefix=PFX)
    cfg = _cfg(max_steps=40, batch_size=2, num_workers=2, resources={"num_cpus": 1, "torch_threads": 1})
    before = workers()
    thread, result = start_background(lambda: run_dpo_ray_train(
        tiny_lm, pairs, str(tmp_path / "adapter"), cfg, storage_path=str(tmp_path / "rt"), name="dpo",
        answer_prefix=PFX, seed=0))
    deadline, victim = time.monotonic() + 300, None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        new = workers() - before
        if len(new) == 2:
            time.sleep(8.0)  # into the job: model loaded, training
            victim = max(new)
        time.sleep(0.2)
    assert victim is not None and thread.is_alive(), "no DPO worker to kill while the job ran"
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=900)
    assert "error" not in result, result.get("error")
    assert result["value"]["steps"] == 40 and result["value"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(ADAPTER_FILES)
    assert victim not in workers()
