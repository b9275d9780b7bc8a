"""Shared benchmark helpers: worker processes, memory readings, FLOP counts, the matmul rate, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_worker(script: Path, spec: dict, timeout: float = 3600) -> dict:
    """Run `script --worker <spec>` in a fresh process (so its peak RSS is its own); its last RESULT line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {**spec, "error": " | ".join(tail) or f"exit code {done.returncode}"}


def emit(result: dict) -> None:
    """A worker's answer to run_worker."""
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Memory


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> int:
    """Reset the peak-RSS counter (VmHWM) to the current RSS; returns the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def peak_rss() -> int:
    """Peak resident set size (VmHWM) since the start or the last reset, in bytes."""
    return _status("VmHWM")


def machine_load() -> str:
    """'load 1.52/1.40/1.33 on 2 CPUs': how busy the machine was (timings are inflated when load > CPUs)."""
    try:
        one, five, fifteen = os.getloadavg()
        return f"load {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} CPUs"
    except OSError:
        return "load unknown"


# ----------------------------------------------------------------------------------------------
# Compute


def matmul_rate(device: str, dtype: torch.dtype, size: int | None = None, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, measured now: the denominator of MFU."""
    size = size or (8192 if device == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    burst = 10 if device == "cuda" else 1  # queue several GPU matmuls between host waits
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(burst):
            a @ b
        reps += burst
        sync()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def step_flops(models, settings) -> int:
    """FLOPs of one training micro-step (UNet forward + backward, recomputation included) on meta tensors.

    Args:
        models: dreamlora.memory.ModelConfigs.
        settings: dreamlora.memory.MemorySettings (rows, resolution, checkpointing, LoRA targets).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from dreamlora.lora import add_lora_adapters
    from dreamlora.memory import meta_text_encoder, meta_unet, unet_inputs
    from dreamlora.memory.estimate import meta_conditions
    from dreamlora.models import detect_family

    from dreamlora.config import LoraConfig

    family = detect_family(models)
    unet = meta_unet(models.unet)
    texts = [meta_text_encoder(c) for c in models.text_encoders] if settings.train_text_encoder else []
    # the targets training adapts: the family's own when --lora-targets is left at its default (training.py)
    targets = family.default_targets if list(settings.unet_targets) == LoraConfig().target_modules \
        else settings.unet_targets
    add_lora_adapters(unet, texts, rank=settings.rank, alpha=float(settings.rank), dropout=0.0,
                      unet_targets=list(targets), train_text_encoder=settings.train_text_encoder,
                      text_targets=list(settings.text_targets))
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    latent = settings.resolution // models.vae_scale_factor
    with FlopCounterMode(display=False) as counter:
        args, kwargs = unet_inputs(models, settings.rows, latent, torch.float32)
        if texts:  # the encoders run in the step, as the model's family runs them
            ids = [torch.zeros(settings.rows, tokens, dtype=torch.long, device="meta") for tokens in family.text_tokens]
            kwargs = family.denoiser_kwargs(family.encode_ids(texts, ids), meta_conditions(kwargs))
        pred = family.predict(unet, *args, kwargs)
        torch.nn.functional.mse_loss(pred, args[0]).backward()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# Output


def print_table(rows: list[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    """A Markdown table of `rows` with (key, header) `columns`; missing values print as '-'."""
    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(h for _, h in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    sys.stdout.flush()


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def append_json(path: str | None, rows: list[dict]) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
