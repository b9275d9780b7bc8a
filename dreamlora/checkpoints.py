"""Step checkpoints in the run folder: adapter, optimiser, LR scheduler and step, all in safetensors + JSON.

A checkpoint is written into a temporary folder and renamed into place, so the latest complete
checkpoint is always usable. Randomness needs no stored generator state: every step's draws are
derived from (seed, step), so resuming at step k replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingError

PREFIX = "step-"


@dataclass
class Checkpoint:
    step: int
    path: Path


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    folder = checkpoint_dir(run_dir)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(PREFIX) and (path / "state.json").is_file():
                found.append(Checkpoint(int(path.name[len(PREFIX):]), path))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, adapter_state: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    config_json: str, keep: int, *, run: dict | None = None, scaler=None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`.

    Args:
        run: what the run is made of (model and image fingerprints, process count, schedule): a resume
            is refused when these differ (dreamlora.training.resume_problems).
        scaler: the fp16 loss scaler (torch GradScaler) whose state continues with the run, or None.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
        tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {"step": step, "optimizer": optimizer_meta, "lr_scheduler": lr_scheduler.state_dict(),
                 "config": json.loads(config_json), "run": run,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def read_state(checkpoint: Checkpoint) -> dict:
    """The checkpoint's state.json: step, config, run record ("run", None in checkpoints made before it existed).

    Raises:
        TrainingError: the file is unreadable.
    """
    try:
        return json.loads((checkpoint.path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"checkpoint '{checkpoint.path}' is damaged ({exc}); delete it to resume from an older one") from exc


def load_checkpoint(checkpoint: Checkpoint, optimizer, lr_scheduler, scaler=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimiser, scheduler (and the fp16 loss scaler) in place; return the adapter state and state.json."""
    try:
        state = json.loads((checkpoint.path / "state.json").read_text(encoding="utf-8"))
        adapter = load_file(checkpoint.path / "adapter.safetensors")
        tensors = load_file(checkpoint.path / "optimizer.safetensors")
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise TrainingError(f"checkpoint '{checkpoint.path}' is damaged ({exc}); delete it to resume from an older one") from exc
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return adapter, state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able everything else.

    Per-parameter state may nest (bitsandbytes keeps its quantisation state in a sub-dict), so keys
    are paths joined with '/'.
    """
    tensors, scalars = {}, {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(f"{prefix}/{name}", item)
        elif isinstance(value, torch.Tensor):
            tensors[prefix] = value.detach().contiguous().cpu()
        else:
            scalars[prefix] = value

    for param_id, param_state in state_dict["state"].items():
        walk(str(param_id), param_state)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, *path = key.split("/")
        node = state.setdefault(int(param_id), {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}
