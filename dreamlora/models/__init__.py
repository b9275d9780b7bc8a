"""Base models: loading (hub id, folder, single file, built-in), families, single-file export."""

from .builtin import BUILDER_VERSION, BUILTIN_MODELS, builtin_model_dir
from .family import ImageGeometry, ModelFamily, PromptEmbeddings
from .loading import SAMPLERS, BaseModel, load_base_model, make_scheduler
from .registry import FAMILIES, detect_family
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily
from .single_file import export_single_file

__all__ = [
    "BUILDER_VERSION",
    "BUILTIN_MODELS",
    "FAMILIES",
    "SAMPLERS",
    "BaseModel",
    "ImageGeometry",
    "ModelFamily",
    "PromptEmbeddings",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "builtin_model_dir",
    "detect_family",
    "export_single_file",
    "load_base_model",
    "make_scheduler",
]
