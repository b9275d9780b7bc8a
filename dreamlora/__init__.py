"""dreamlora: DreamBooth + LoRA for Stable Diffusion. Photos in, one small .safetensors out.

    from dreamlora import load_config, train
    config = load_config("sample_instances/polkaball/dreamlora.toml", {"output.path": "ball.safetensors"})
    result = train(config)

Importing the package is instant: the names below are loaded on first use (PEP 562), so `import dreamlora`
and the command line's `--help` never import torch, diffusers or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DreamLoraConfig": "config", "load_config": "config",
    "ConfigError": "errors", "DataError": "errors", "DreamLoraError": "errors", "ModelLoadError": "errors",
    "TrainingError": "errors",
    "describe_lora": "info",
    "PriorSpec": "priors", "generate_priors": "priors", "make_class_images": "priors",
    "ProgressEvent": "progress",
    "SampleSettings": "sampling", "sample": "sampling",
    "TrainResult": "training", "train": "training",
    "EvalSettings": "evaluation", "evaluate": "evaluation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'dreamlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs; nothing of this runs
    from .config import DreamLoraConfig, load_config
    from .errors import ConfigError, DataError, DreamLoraError, ModelLoadError, TrainingError
    from .evaluation import EvalSettings, evaluate
    from .info import describe_lora
    from .priors import PriorSpec, generate_priors, make_class_images
    from .progress import ProgressEvent
    from .sampling import SampleSettings, sample
    from .training import TrainResult, train
