"""The preference stage (method.md Eq. 6 -> Eq. 7): hard/easy anomalies become DPO pairs, and
TRL's DPOTrainer fine-tunes a LoRA adapter on the describer LLM (optionally under DeepSpeed ZeRO).

``pairs`` builds ``PreferencePair``s from anomaly-store rows; ``dpo`` trains and saves the
adapter. Importing this package loads no torch, TRL or DeepSpeed.
"""

from kka_ray.preference.dpo import ADAPTER_FILES, deepspeed_config, dpo_remote_entry, run_dpo, run_dpo_ray_train
from kka_ray.preference.pairs import PreferencePair, build_pairs

__all__ = [
    "ADAPTER_FILES",
    "PreferencePair",
    "build_pairs",
    "deepspeed_config",
    "dpo_remote_entry",
    "run_dpo",
    "run_dpo_ray_train",
]
