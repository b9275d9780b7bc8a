"""Step checkpoints in the run folder: adapter, optimiser, LR scheduler and step, all in safetensors + JSON.

A checkpoint is written into a temporary folder and renamed into place, so the latest complete
checkpoint is always usable. Randomness needs no stored generator state: every step's draws are
derived from (seed, step), so resuming at step k replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import as_os_error, new_file_mode
from .config import DreamLoraConfig
from .errors import TrainingError

PREFIX = "step-"
_NAME = re.compile(rf"{PREFIX}(\d+)")
# Everything a run writes in its folder, by name: `--overwrite` and pruning delete these and nothing else,
# so a user's notes in a --run-dir of their choosing survive.
CHECKPOINT_FILES = ("adapter.safetensors", "optimizer.safetensors", "state.json")
_OWN_TEMPORARY = re.compile(rf"\.{PREFIX}\d+\..+")  # a checkpoint folder or grid a killed run left half-written
_OWN_GRID = re.compile(rf"{PREFIX}\d+\.png")
# --eval-every's files in <run>/eval (dreamlora.selection): adapter weights and renders of scored steps, the scores
_OWN_SCORED = re.compile(rf"{PREFIX}\d+\.safetensors|scores\.json|scores\.png")


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
            match = _NAME.fullmatch(path.name)
            if match and (path / "state.json").is_file():
                found.append(Checkpoint(int(match.group(1)), path))
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
        os.chmod(tmp, new_file_mode(folder=True))  # mkdtemp makes 0700: a shared run folder could not read it
        _save(adapter_state, tmp / "adapter.safetensors")
        tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        _save(tensors, tmp / "optimizer.safetensors")
        state = {"step": step, "optimizer": optimizer_meta, "lr_scheduler": lr_scheduler.state_dict(),
                 "config": json.loads(config_json), "run": run,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_checkpoint(old.path)
    return final


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (disk full, file-size limit) raised as the OSError they are, and
    the file given the mode the umask gives new files."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
    except Exception as exc:
        error = as_os_error(exc, path)
        if error is None:
            raise
        raise error from exc
    os.chmod(path, new_file_mode())  # safetensors creates its files 0600, whatever the umask


def remove_checkpoint(path: Path) -> bool:
    """Delete the files a checkpoint folder holds, and the folder when nothing else is in it.

    Returns:
        False when the folder is kept because it holds files dreamlora did not write.
    """
    try:
        names = {p.name for p in path.iterdir()}
    except FileNotFoundError:
        return True
    if names <= set(CHECKPOINT_FILES):
        shutil.rmtree(path)
        return True
    for name in CHECKPOINT_FILES:
        (path / name).unlink(missing_ok=True)
    return False


def remove_run_files(run_dir: Path) -> list[Path]:
    """Delete what earlier runs wrote in `run_dir` (checkpoints, validation grids, scored steps, report.html, and
    their half-written temporaries).

    Anything else (a user's notes, other files in a --run-dir of the user's choosing) stays, and folders
    are removed only when that leaves them empty.

    Returns:
        The folders kept because they hold files dreamlora did not write.
    """
    kept = []
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            if _NAME.fullmatch(path.name) and path.is_dir():
                if not remove_checkpoint(path):
                    kept.append(path)
            elif _OWN_TEMPORARY.fullmatch(path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    grids, scored = run_dir / "validation", run_dir / "eval"
    for own in (grids, scored):
        if own.is_dir():
            for path in own.iterdir():
                if (_OWN_GRID.fullmatch(path.name) or _OWN_TEMPORARY.fullmatch(path.name)
                        or _OWN_SCORED.fullmatch(path.name)) and path.is_file():
                    path.unlink(missing_ok=True)
    (run_dir / "report.html").unlink(missing_ok=True)
    for empty in (folder, grids, scored):
        try:
            empty.rmdir()
        except OSError:
            pass  # missing, or holds other files
    return kept


def read_state(checkpoint: Checkpoint) -> dict:
    """The checkpoint's state.json: step, config, run record ("run", None in checkpoints made before it existed).

    Raises:
        TrainingError: the file is unreadable.
    """
    try:
        state = json.loads((checkpoint.path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise damaged(checkpoint, exc) from exc
    # The fields a resume reads before it loads any tensor (the run record, the settings to compare section by section).
    sections = [field.name for field in dataclasses.fields(DreamLoraConfig)]
    if not (isinstance(state, dict) and isinstance(state.get("run"), (dict, type(None)))
            and isinstance(state.get("config"), dict)
            and all(isinstance(state["config"].get(name, {}), dict) for name in sections)):
        raise damaged(checkpoint, "state.json is not a checkpoint record")
    return state


def load_checkpoint(checkpoint: Checkpoint, optimizer, lr_scheduler,
                    scaler=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimiser, scheduler (and the fp16 loss scaler) in place; return the adapter state and state.json.

    Raises:
        TrainingError: a file of the checkpoint is missing, truncated or not what a checkpoint holds.
    """
    state = read_state(checkpoint)
    try:
        adapter = load_file(checkpoint.path / "adapter.safetensors")
        tensors = load_file(checkpoint.path / "optimizer.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    # Whatever a damaged file makes safetensors (SafetensorError), json or torch's loaders raise, the remedy is
    # the same; none of these objects has been used yet, so a half-restored optimizer is never trained.
    except Exception as exc:  # noqa: BLE001
        raise damaged(checkpoint, exc) from exc
    return adapter, state


def damaged(checkpoint: Checkpoint, why: object) -> TrainingError:
    reason = str(why).splitlines()[0][:200] if str(why) else type(why).__name__
    return TrainingError(f"checkpoint '{checkpoint.path}' is damaged ({reason}); delete that folder to resume from "
                         "an older checkpoint, or start over with --overwrite.")


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
