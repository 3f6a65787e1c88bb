"""The preference trainer: DPO with LoRA on the describer LLM (method.md Eq. 7).

Loss (Rafailov et al., 2023), computed by TRL's ``DPOTrainer`` (``loss_type="sigmoid"``):
``-log sigma(beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)])`` with
``y_w`` a hard description, ``y_l`` an easy one (pairs from ``pairs.build_pairs``) and
beta = 0.1.

- ``pi`` is the base LLM plus a LoRA adapter. The first iteration starts a fresh adapter
  (B = 0, so pi = pi_ref at step 0); later ones load the previous iteration's adapter with
  ``PeftModel.from_pretrained(..., is_trainable=True)`` and keep training it.
- ``pi_ref`` (``L_ref``) is the base LLM with the adapter disabled. TRL 1.16, given an
  already-adapted ``PeftModel`` and no ``ref_model``, instead copies the loaded adapter into
  a frozen "ref" adapter (reference = the previous iteration's policy); with
  ``preference.reference="base"`` (the default) that copy is deleted before training, so
  TRL falls back to ``disable_adapter()``, the base model. ``"previous_adapter"`` keeps it.
- The prompt is the exact string the describer generates from
  (``kka_ray.generation.text.format_prompt``: chat template + generation prompt, or the plain
  completion prompt, + ``answer_prefix``); TRL appends EOS to each completion.
- DeepSpeed ZeRO (stage 0-3, optional CPU optimizer offload) is switched on by
  ``preference.deepspeed.enabled``; a single process gets the rank/world/master env vars it
  needs, so the same path runs on a laptop CPU and on a GPU node.
- ``preference.num_workers > 1`` runs the same trainer on that many Ray Train workers
  (:func:`run_dpo_ray_train`: a ``TorchTrainer``, gloo on CPU and NCCL on GPU, each worker
  reserving ``preference.resources``): data parallel (DDP, or ZeRO sharding when DeepSpeed is
  on), ``preference.batch_size`` per worker. Rank 0 reports the adapter as the run's Ray Train
  checkpoint and the driver copies it into place, so the workers may sit on other nodes.

Only the adapter is saved (``adapter_model.safetensors`` + ``adapter_config.json``), written
to a temporary directory and renamed into place, so an interrupted run leaves no half
adapter behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kka_ray.config import DeepSpeedSection, PreferenceSection
from kka_ray.preference.pairs import PreferencePair

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# TRL's per-step log keys worth returning (the rest are logps/logits details).
_STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _as_trl_prompt(tokenizer: Any, text: str) -> str:
    """The prompt string whose TRL tokenization equals the describer's token ids.

    The describer tokenizes its chat text with ``add_special_tokens=False`` (the template
    already holds any BOS); TRL tokenizes with the tokenizer's defaults. For a tokenizer that
    adds a BOS by default, the template's leading BOS is dropped so that TRL's added one
    takes its place and the ids match.
    """
    probe = "a"
    added = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if added == plain:
        return text
    bos = tokenizer.bos_token
    if bos and added == [tokenizer.bos_token_id, *plain]:
        return text[len(bos) :] if text.startswith(bos) else text
    logger.warning(
        "the tokenizer adds special tokens other than a leading BOS (%s vs %s): DPO's token ids "
        "may differ from the describer's at the sequence ends", added, plain,
    )
    return text


def deepspeed_config(ds: DeepSpeedSection) -> dict[str, Any]:
    """A ZeRO config dict for ``DPOConfig(deepspeed=...)``; "auto" fields are filled by transformers."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ValueError("preference.deepspeed.offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        # With an optimizer in the DeepSpeed config, DeepSpeed builds its fast CPU Adam for offload.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _deepspeed_process_state(enabled: bool) -> Iterator[None]:
    """Give a one-process DeepSpeed run the launcher env it expects, and undo it after.

    Sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port) when no launcher
    did. Afterwards the whole environment is restored (accelerate sets
    ``ACCELERATE_USE_DEEPSPEED`` and friends for good, which would turn the next plain run in
    this process into a DeepSpeed one) and transformers' global DeepSpeed config is cleared.
    The process group stays up: DeepSpeed caches its groups, so a later DeepSpeed run in the
    same process must reuse it (checked: ZeRO-2, ZeRO-3, plain, ZeRO-2 + offload in a row).
    """
    if not enabled:
        yield
        return
    saved_env = dict(os.environ)
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key in _DIST_ENV:
        if key not in os.environ:
            os.environ[key] = defaults.get(key) or str(_free_port())
    try:
        yield
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        os.environ.clear()
        os.environ.update(saved_env)


def _load_policy(base_model: str, cfg: PreferenceSection, prev_adapter: str | None, trust_remote_code: bool):
    """Base LLM + tokenizer + a trainable LoRA adapter (fresh, or continued from ``prev_adapter``)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=getattr(torch, cfg.dtype), trust_remote_code=trust_remote_code
    )
    if prev_adapter is None:
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora), tokenizer
    prev = Path(prev_adapter)
    if not (prev / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"prev_adapter {str(prev)!r} has no adapter_config.json: pass the directory a previous "
            "run_dpo wrote, or prev_adapter=None to start a fresh adapter"
        )
    model = PeftModel.from_pretrained(model, str(prev), is_trainable=True)
    saved_r = model.peft_config["default"].r
    if saved_r != cfg.lora_r:
        logger.warning("continuing an adapter with r=%d; preference.lora_r=%d is ignored", saved_r, cfg.lora_r)
    return model, tokenizer


def _summarise(trainer: Any, train_output: Any, n_pairs: int, wall: float) -> dict[str, Any]:
    history = [
        {"step": e["step"], **{k: float(e[k]) for k in _STEP_KEYS if k in e}}
        for e in trainer.state.log_history
        if "loss" in e and "step" in e
    ]
    metrics: dict[str, Any] = {
        "steps": int(trainer.state.global_step),
        "train_loss": float(train_output.training_loss),
        "n_pairs": n_pairs,
        "wall_seconds": wall,
        "history": history,
    }
    if history:
        metrics["first_loss"] = history[0].get("loss", math.nan)
        metrics["last_loss"] = history[-1].get("loss", math.nan)
        for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
            values = [h[key] for h in history if key in h]
            if values:
                metrics[key] = values[-1]  # the last step's value
    return metrics


def _dpo_args(cfg: PreferenceSection, output_dir: Path, device: str, seed: int) -> Any:
    from dataclasses import fields

    from trl import DPOConfig

    # TRL turns checkpointing on by default; recent transformers renamed the field.
    names = {f.name for f in fields(DPOConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return DPOConfig(
        output_dir=str(output_dir),
        **{ckpt: cfg.gradient_checkpointing},
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        max_length=cfg.max_length,
        bf16=cfg.dtype == "bfloat16",
        fp16=cfg.dtype == "float16",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=device == "cpu",
        seed=seed,
        data_seed=seed,
        deepspeed=deepspeed_config(cfg.deepspeed) if cfg.deepspeed.enabled else None,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _save_adapter(trainer: Any, cfg: PreferenceSection, save_dir: Path) -> None:
    """Write only the trained "default" adapter (ZeRO-3 parameters are gathered first: every
    process takes part in that; only the main one writes)."""
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state_dict = None
    if trainer.is_deepspeed_enabled and cfg.deepspeed.zero_stage == 3:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    if not trainer.accelerator.is_main_process:
        return
    unwrapped.save_pretrained(
        str(save_dir), selected_adapters=["default"], safe_serialization=True, state_dict=state_dict
    )
    missing = [f for f in ADAPTER_FILES if not (save_dir / f).is_file()]
    if missing:
        raise RuntimeError(f"PEFT did not write {missing} to {save_dir}")
    for extra in save_dir.iterdir():  # PEFT also writes a model card (README.md)
        if extra.name not in ADAPTER_FILES:
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()


def _dpo_trainer(base_model: str, pairs: list[PreferencePair], cfg: PreferenceSection, trainer_dir: Path, *,
                 prev_adapter: str | None, answer_prefix: str, seed: int, device: str, trust_remote_code: bool,
                 chat: bool) -> tuple[Any, int]:
    """TRL's DPOTrainer on ``pairs`` with the LoRA policy (the reference as Eq. 7 asks), and the
    number of pairs it dropped for a prompt that fills ``preference.max_length``."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer

    from kka_ray.generation.text import format_prompt  # the describer's exact generation string

    set_seed(seed)  # the fresh LoRA A matrices are drawn here
    model, tokenizer = _load_policy(base_model, cfg, prev_adapter, trust_remote_code)
    rows = [{"prompt": _as_trl_prompt(tokenizer, format_prompt(tokenizer, p.prompt, answer_prefix, chat)),
             "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    trainer = DPOTrainer(model=model, ref_model=None, args=_dpo_args(cfg, trainer_dir, device, seed),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    # TRL drops pairs whose prompt alone fills max_length; count them.
    too_long = len(pairs) - len(trainer.train_dataset)
    if too_long == len(pairs):
        raise ValueError(
            f"all {len(pairs)} prompts are at least preference.max_length={cfg.max_length} "
            "tokens long: raise preference.max_length"
        )
    if too_long:
        logger.warning("DPO dropped %d of %d pairs whose prompt fills max_length", too_long, len(pairs))
    policy = trainer.model
    if cfg.reference == "base" and "ref" in policy.peft_config:
        # TRL copied the loaded adapter as the reference; Eq. 7's L_ref is the base model.
        policy.delete_adapter("ref")
        policy.set_adapter("default")
    return trainer, too_long


def run_dpo(
    base_model: str,
    pairs: list[PreferencePair],
    out_dir: str,
    cfg: PreferenceSection,
    *,
    prev_adapter: str | None = None,
    answer_prefix: str = "",
    seed: int = 0,
    device: str = "cpu",
    trust_remote_code: bool = False,
    chat: bool = True,
) -> dict[str, Any]:
    """Train the LoRA adapter with DPO on ``pairs`` and save it (adapter only) to ``out_dir``.

    ``base_model`` is a local directory (or hub id) of the describer's LLM; ``prev_adapter``
    the directory of the previous iteration's adapter, or None for a fresh one. Returns
    ``{steps, train_loss, n_pairs, n_pairs_too_long, wall_seconds, history, first_loss,
    last_loss, rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected,
    deepspeed_zero_stage, world_size}`` (the rewards are the last logged step's values; ``history`` has
    one entry per step).
    """
    if not pairs:
        raise ValueError("run_dpo got no preference pairs; skip DPO for this iteration instead")
    from kka_ray.devices import resolve_device

    device = resolve_device(device)
    t0 = time.perf_counter()

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _deepspeed_process_state(cfg.deepspeed.enabled):
            trainer, too_long = _dpo_trainer(base_model, pairs, cfg, tmp / "trainer", prev_adapter=prev_adapter,
                                             answer_prefix=answer_prefix, seed=seed, device=device,
                                             trust_remote_code=trust_remote_code, chat=chat)
            train_output = trainer.train()
            zero_stage = trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
            _save_adapter(trainer, cfg, tmp / "adapter")
            main, world = trainer.accelerator.is_main_process, trainer.accelerator.num_processes
        if main:  # in a multi-process run the other ranks write nothing
            if out.exists():
                logger.warning("replacing the existing adapter at %s", out)
                os.rename(out, tmp / "replaced")
            os.rename(tmp / "adapter", out)  # same filesystem: the adapter appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metrics = _summarise(trainer, train_output, len(pairs), time.perf_counter() - t0)
    metrics["n_pairs_too_long"] = too_long
    metrics["deepspeed_zero_stage"] = zero_stage  # None when DeepSpeed is off
    metrics["world_size"] = world
    logger.info(
        "DPO: %d steps on %d pairs, loss %.4f, %.1f s -> %s",
        metrics["steps"], len(pairs), metrics["train_loss"], metrics["wall_seconds"], out,
    )
    return metrics


def dpo_remote_entry(**kwargs: Any) -> dict[str, Any]:
    """``run_dpo`` as a plain function for a Ray task: sets torch threads, accepts ``cfg`` as a dict.

    Back-to-back runs in one worker process work (a DeepSpeed run restores the environment
    and leaves its process group for the next one); ``max_calls=1`` still gives each DPO job
    a clean process, which is the safer default on a cluster.
    """
    cfg = kwargs.pop("cfg")
    if not isinstance(cfg, PreferenceSection):
        cfg = PreferenceSection.model_validate(cfg)
    _apply_threads(cfg)
    return run_dpo(cfg=cfg, **kwargs)


METRICS_FILE = "dpo_metrics.json"  # beside the adapter in the Ray Train checkpoint


def _apply_threads(cfg: PreferenceSection) -> None:
    if cfg.resources.torch_threads:
        import torch

        torch.set_num_threads(cfg.resources.torch_threads)


def dpo_train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of :func:`run_dpo_ray_train`: Ray Train has set RANK, WORLD_SIZE,
    LOCAL_RANK and MASTER_* and started the process group, so ``run_dpo`` trains data parallel.
    Every worker reports once; rank 0's report carries the adapter and the metrics."""
    import json

    import ray.train

    kwargs = dict(config["kwargs"])
    cfg = PreferenceSection.model_validate(kwargs.pop("cfg"))
    _apply_threads(cfg)
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter"
        metrics = run_dpo(cfg=cfg, out_dir=str(out), **kwargs)
        checkpoint = None
        if rank == 0:
            (out / METRICS_FILE).write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(str(out))
        ray.train.report({"loss": metrics["train_loss"]}, checkpoint=checkpoint)


def run_dpo_ray_train(base_model: str, pairs: list[PreferencePair], out_dir: str, cfg: PreferenceSection, *,
                      storage_path: str, name: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_dpo` on ``cfg.num_workers`` Ray Train workers, each reserving ``cfg.resources``
    (a GPU each when ``num_gpus > 0``: NCCL, else gloo); the adapter lands in ``out_dir`` as
    :func:`run_dpo` leaves it. ``kwargs``: ``run_dpo``'s keyword arguments."""
    import json

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kka_ray.training.ray_fit import TRAIN_MAX_FAILURES

    if not pairs:
        raise ValueError("run_dpo got no preference pairs; skip DPO for this iteration instead")
    res = cfg.resources
    use_gpu = res.num_gpus > 0
    per_worker = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if use_gpu else {}), **res.resources}
    shutil.rmtree(Path(storage_path) / name, ignore_errors=True)  # a killed stage restarts clean
    trainer = TorchTrainer(
        dpo_train_worker,
        train_loop_config={"kwargs": {"base_model": base_model, "pairs": list(pairs),
                                      "cfg": cfg.model_dump(mode="json"), **kwargs}},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        # a dead worker: the job restarts from the same seed (the adapter appears only at the end)
        run_config=RunConfig(storage_path=str(storage_path), name=name,
                             failure_config=FailureConfig(max_failures=TRAIN_MAX_FAILURES)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the DPO job {name!r} finished without an adapter (see the logs under {storage_path})")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        result.checkpoint.to_directory(str(tmp / "ckpt"))
        metrics = json.loads((tmp / "ckpt" / METRICS_FILE).read_text())
        (tmp / "adapter").mkdir()
        for f in ADAPTER_FILES:
            shutil.copy2(tmp / "ckpt" / f, tmp / "adapter" / f)
        if out.exists():
            logger.warning("replacing the existing adapter at %s", out)
            os.rename(out, tmp / "replaced")
        os.rename(tmp / "adapter", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics
