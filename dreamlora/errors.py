"""Typed errors. Every message quotes the bad value and says what to do; the CLI prints it as one line."""

from __future__ import annotations


class DreamLoraError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(DreamLoraError):
    """An invalid configuration value, flag or TOML key."""


class DataError(DreamLoraError):
    """An instance or class image folder that cannot be used."""


class ModelLoadError(DreamLoraError):
    """A base model or LoRA file that cannot be found, read or matched."""


class TrainingError(DreamLoraError):
    """A run that cannot continue (non-finite loss, missing checkpoint, unsupported hardware setting)."""


class NumericalError(DreamLoraError):
    """A model produced NaN or inf (a latent, an image, a loss): never a black picture or a silent NaN file."""


class PushError(DreamLoraError):
    """An upload to the hub that did not happen (no network, no token, no permission); the local files stay."""
