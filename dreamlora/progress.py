"""Progress reporting: the library calls a callback; the CLI draws bars and prints notes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ProgressEvent:
    stage: str  # "priors" | "cache" | "train" | "validate" | "save" | "note"
    step: int = 0  # work done so far in this stage
    total: int = 0  # work in this stage (0: unknown)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. loss, instance_loss, prior_loss, lr
    message: str | None = None  # a note for the user (skipped files, a cache hit, where a file went)


ProgressCallback = Callable[[ProgressEvent], None]


def ignore_progress(event: ProgressEvent) -> None:
    """The default callback: report nothing."""


def note(progress: ProgressCallback, message: str) -> None:
    progress(ProgressEvent("note", message=message))
