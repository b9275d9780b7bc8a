"""Where dreamlora keeps things it can rebuild: built-in models and class-prior caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: $DREAMLORA_CACHE, else $XDG_CACHE_HOME/dreamlora, else ~/.cache/dreamlora."""
    if os.environ.get("DREAMLORA_CACHE"):
        return Path(os.environ["DREAMLORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dreamlora"
