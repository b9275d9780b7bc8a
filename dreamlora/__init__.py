"""dreamlora: DreamBooth + LoRA for Stable Diffusion. Photos in, one small .safetensors out.

    from dreamlora import load_config, train
    config = load_config("sample_instances/polkaball/dreamlora.toml", {"output.path": "ball.safetensors"})
    result = train(config)
"""

from .config import DreamLoraConfig, load_config
from .errors import ConfigError, DataError, DreamLoraError, ModelLoadError, TrainingError
from .info import describe_lora
from .priors import PriorSpec, generate_priors, make_class_images
from .progress import ProgressEvent
from .sampling import SampleSettings, sample
from .train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "DreamLoraConfig", "DreamLoraError", "ModelLoadError", "PriorSpec", "ProgressEvent",
    "SampleSettings", "TrainResult", "TrainingError", "describe_lora", "generate_priors", "load_config",
    "make_class_images", "sample", "train",
]
