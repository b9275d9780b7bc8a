"""The memory plan: peak accelerator memory of a training run, estimated before any weight is read.

`plan(config)` reads the base model's JSON configs (dreamlora.models.configs), builds the models on PyTorch's meta device
(`meta`), runs each phase of a run there and adds up the bytes of the tensors alive at each moment
(`estimate`); with `train.memory_budget` (flag --memory-budget) it then picks the settings that fit
(`plan`). One job a file:

- meta.py: modules on the meta device and the live-bytes counter, with the accelerator's attention
  and autocast modelled;
- estimate.py: each phase's peak for a model and a run's settings;
- plan.py: the `--dry-run` report and the budget ladder.
"""

from ..models.configs import ModelConfigs, read_model_configs
from .estimate import (BUDGET_RESERVE_GIB, BUDGET_SLACK, CACHE_BATCH, CACHE_PROMPTS, GIB, TEXT_TOKENS, MemoryEstimate,
                       MemorySettings, estimate_memory, unet_inputs)
from .meta import LiveBytes, meta_text_encoder, meta_unet, meta_vae, parameter_bytes
from .plan import TrainingPlan, accelerator_type, apply_memory_budget, fit_budget, format_bytes, plan

__all__ = ["BUDGET_RESERVE_GIB", "BUDGET_SLACK", "CACHE_BATCH", "CACHE_PROMPTS", "GIB", "TEXT_TOKENS", "LiveBytes",
           "MemoryEstimate", "MemorySettings", "ModelConfigs", "TrainingPlan", "accelerator_type", "apply_memory_budget",
           "estimate_memory", "fit_budget", "format_bytes", "meta_text_encoder", "meta_unet", "meta_vae",
           "parameter_bytes", "plan", "read_model_configs", "unet_inputs"]
