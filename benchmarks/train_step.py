"""Training-step benchmark: seconds a step, peak memory, FLOPs a step, MFU, and the memory plan's error.

Each row runs in its own process (its peak memory is its own):

- kind "train": dreamlora's real path, `train(config)` with prior preservation (batch 1 + 1 class image,
  rank 4, the 20 class images given with --class-dir so none are generated), on a built-in model or a
  benchmark model folder (benchmarks/models.py). Seconds a step are timed between progress events
  after the warm-up steps; the caches, the final validation grid and saving are outside that window
  but inside the peak-memory window.
- kind "unet": the SD 1.5 / SDXL architectures' UNet alone, without loading a model: the
  loop body of dreamlora.training (LoRA through dreamlora.lora, the same losses and noise schedule,
  autocast and fp32 adapters as under accelerate) on random latents and embeddings.
- kind "tensors": the "train" run with every tensor it creates counted (dreamlora.memory.LiveBytes):
  the peak of live tensor bytes, which is what the plan estimates (RSS adds the allocator's and the
  libraries' own memory); slower, so not timed.
- kind "plan": no run; FLOPs and the memory plan at full size, for rows this machine cannot run.

FLOPs come from torch.utils.flop_counter.FlopCounterMode over one step on the meta device
(recomputation included with checkpointing); MFU divides the achieved FLOP/s by the matmul rate
measured in the same process. Peak memory: on CUDA torch.cuda.max_memory_allocated(), on the CPU
the rise of peak RSS (VmHWM) over the RSS before train(), and the process's peak RSS (imports included)
as the reference figures count it. The estimate is dreamlora.memory.plan()'s peak for the same run.

    python benchmarks/train_step.py                  # the CPU table of benchmarks/README.md
    python benchmarks/train_step.py --preset gpu     # what gpu.sh runs
    python benchmarks/train_step.py --rows tiny,small --steps 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (append_json, emit, machine_load, matmul_rate, peak_rss, print_table, reset_peak_rss,  # noqa: E402
                    run_worker, step_flops)

import torch  # noqa: E402

REFERENCE = {  # diffusers' train_dreambooth_lora.py, 2 cores, fp32, prior preservation, batch 1+1, rank 4
    "tiny": {"step_s": 0.123, "rss_gb": 0.56},
    "small": {"step_s": 6.43, "rss_gb": 1.8},
}
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def row(kind: str, model: str, **settings) -> dict:
    base = {"kind": kind, "model": model, "resolution": None, "batch": 1, "mixed_precision": "no",
            "gradient_checkpointing": False, "optimizer": "adamw", "compile": False, "steps": 8, "warmup": 2,
            "device": "cpu", "rank": 4, "train_text_encoder": False}
    return {**base, **settings}


def preset_rows(preset: str, steps: int | None) -> list[dict]:
    if preset == "cpu":
        # Each model's dreamlora row next to its reference-style row, so both see the same machine load.
        rows = [row("train", "builtin:tiny-sd", steps=30, warmup=5), row("train", "builtin:tiny-sd2", steps=30, warmup=5),
                row("train", "tiny", steps=30, warmup=5), row("reference", "tiny", steps=30, warmup=5),
                row("train", "small", steps=6, warmup=2), row("reference", "small", steps=6, warmup=2),
                row("train", "small", steps=6, warmup=2, gradient_checkpointing=True),
                # bf16 frozen weights (adapters fp32): on a CPU with AVX512-BF16/AMX the matmuls run at about twice the rate
                row("train", "small", steps=6, warmup=2, mixed_precision="bf16"),
                row("tensors", "tiny", steps=2, warmup=1), row("tensors", "small", steps=2, warmup=1),
                row("tensors", "small", steps=2, warmup=1, mixed_precision="bf16", gradient_checkpointing=True),
                row("unet", "sd15", resolution=256, steps=3, warmup=1),
                row("unet", "sdxl", resolution=256, steps=3, warmup=1, mixed_precision="bf16",
                    gradient_checkpointing=True)]
        for arch in ("sd15", "sdxl"):
            for mp in ("fp16", "bf16"):
                for gc, opt in ((False, "adamw"), (True, "adamw"), (False, "adamw8bit"), (True, "adamw8bit")):
                    rows.append(row("plan", arch, mixed_precision=mp, gradient_checkpointing=gc, optimizer=opt,
                                    device="cuda"))
    elif preset == "gpu":
        rows = []
        for mp, gc, opt in (("bf16", False, "adamw"), ("bf16", True, "adamw"), ("bf16", False, "adamw8bit"),
                            ("bf16", True, "adamw8bit"), ("fp16", False, "adamw"), ("fp16", True, "adamw8bit")):
            rows.append(row("train", "sd15", mixed_precision=mp, gradient_checkpointing=gc, optimizer=opt,
                            device="cuda", steps=12, warmup=3))
        # SDXL through train() at 1024 px, batch 1 + 1 prior, rank 16: the UNet alone, then with both text encoders
        # (targets: <= 8 GB and <= 10 GB); the leanest settings first, then the faster ones.
        for te in (False, True):
            for mp, gc, opt in (("bf16", True, "adamw8bit"), ("bf16", False, "adamw"), ("fp16", True, "adamw8bit")):
                rows.append(row("train", "sdxl", mixed_precision=mp, gradient_checkpointing=gc, optimizer=opt,
                                device="cuda", steps=8, warmup=3, rank=16, train_text_encoder=te))
        if os.environ.get("DREAMLORA_BENCH_QUICK") == "1":  # gpu.sh --quick
            rows = [r for r in rows if r["mixed_precision"] == "bf16"]
        else:
            rows.append(row("train", "sd15", mixed_precision="bf16", compile=True, device="cuda", steps=25, warmup=10))
    elif preset == "gpu-flux":  # gpu.sh --flux: FLUX.1-dev's transformer at full size (the folder takes minutes)
        rows = flux_rows("flux-dev", device="cuda", steps=8, warmup=3)
    elif preset == "cpu-compile":  # torch.compile (inductor's C++ kernels) on the CPU; the first steps compile
        rows = [row("train", "tiny", steps=30, warmup=5), row("train", "tiny", steps=30, warmup=5, compile=True),
                row("train", "small", steps=6, warmup=2), row("train", "small", steps=6, warmup=2, compile=True),
                row("train", "small", steps=6, warmup=2, mixed_precision="bf16"),
                row("train", "small", steps=6, warmup=2, mixed_precision="bf16", compile=True)]
    elif preset == "cpu-smoke":  # gpu.sh --cpu-smoke: the GPU matrix's code paths at a tenth of the width
        from dreamlora.training import cpu_runs_bf16_natively

        # train() refuses bf16 on CPUs without bf16 kernels; there the lean row keeps fp32 (checkpointing, 8-bit AdamW)
        lean = "bf16" if cpu_runs_bf16_natively() else "no"
        rows = []
        for arch in ("sd15-mini", "sdxl-mini"):
            for mp, gc, opt, te in (("no", False, "adamw", False), (lean, True, "adamw8bit", arch == "sdxl-mini")):
                rows.append(row("train", arch, mixed_precision=mp, gradient_checkpointing=gc, optimizer=opt,
                                steps=3, warmup=1, rank=16 if arch == "sdxl-mini" else 4, train_text_encoder=te))
        rows += [dict(r, mixed_precision=lean) for r in flux_rows("flux-mini", device="cpu", steps=3, warmup=1)]
    else:
        raise SystemExit(f"unknown preset {preset!r}: cpu, cpu-compile, gpu, gpu-flux or cpu-smoke")
    if steps:
        for r in rows:
            r["steps"], r["warmup"] = steps, min(r["warmup"], steps // 2)
    return rows


def flux_rows(model: str, **settings) -> list[dict]:
    """The issue's Flux targets: 512 px, rank 16, batch 1 + 1 prior, cached latents and T5 states (T5 on the CPU),
    checkpointing and 8-bit AdamW, the transformer in NF4 (target <= 10 GB), int8 (<= 16 GB) and bf16 (reported)."""
    return [row("train", model, mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw8bit", rank=16,
                base_quantization=q, t5_on_cpu=True, **settings) for q in ("nf4", "int8", "none")]


# ----------------------------------------------------------------------------------------------
# Workers


def native_resolution(name: str, models) -> int:
    """The benchmark's resolution for a model: its entry in benchmarks/models.py, else the model's own."""
    from models import MODELS

    return MODELS[name]["resolution"] if name in MODELS else models.default_resolution


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): with one thread the CPU time hardly depends on what
    else the machine runs, so it is the steadier figure on a shared machine."""
    return time.perf_counter(), time.process_time()


def per_step(stamps: dict, spec: dict) -> dict:
    n = spec["steps"] - spec["warmup"]
    (wall0, cpu0), (wall1, cpu1) = stamps[spec["warmup"]], stamps[spec["steps"]]
    return {"step_s": (wall1 - wall0) / n, "step_cpu_s": (cpu1 - cpu0) / n}


def worker(spec: dict) -> dict:
    torch.manual_seed(0)
    if spec["kind"] in ("train", "tensors"):
        return train_worker(spec)
    if spec["kind"] == "unet":
        return unet_worker(spec)
    if spec["kind"] == "reference":
        return reference_worker(spec)
    return plan_worker(spec)


def _settings(spec: dict, models, resolution: int):
    from dreamlora.config import DreamLoraConfig
    from dreamlora.memory import MemorySettings

    config = DreamLoraConfig()
    t = config.train
    t.batch_size, t.mixed_precision = spec["batch"], spec["mixed_precision"]
    t.gradient_checkpointing, t.optimizer = spec["gradient_checkpointing"], spec["optimizer"]
    config.validation.seeds = [0]
    return MemorySettings.from_config(config, device_type=spec["device"], resolution=resolution,
                                      generate_class_images=False)


def plan_worker(spec: dict) -> dict:
    from models import model_configs

    from dreamlora.memory import estimate_memory

    models = model_configs(spec["model"])
    resolution = spec["resolution"] or native_resolution(spec["model"], models)
    settings = _settings(spec, models, resolution)
    estimate = estimate_memory(models, settings)
    training = estimate.training
    unet_only = sum(v for k, v in training.items() if k not in ("text encoders", "VAE", "cached embeddings"))
    sdxl = spec["model"].startswith("sdxl")
    return {**spec, "resolution": resolution, "flops": step_flops(models, settings),
            "estimate_gb": (unet_only if sdxl else estimate.peak) / 1e9,
            "estimate_phase": "training (UNet only)" if sdxl else estimate.peak_phase}


def train_worker(spec: dict) -> dict:
    from models import class_folder, instance_folder, model_folder

    from dreamlora import load_config, train
    from dreamlora.memory import LiveBytes, MemorySettings, plan, read_model_configs

    name = spec["model"]
    model = name if name.startswith("builtin:") else str(model_folder(name))
    models = read_model_configs(model)
    resolution = spec["resolution"] or native_resolution(spec["model"], models)
    device = spec["device"]
    out = Path(tempfile.mkdtemp(prefix="dreamlora-bench-")) / "bench.safetensors"
    config = load_config(None, {
        "model.name": model, "data.instance_dir": str(instance_folder(resolution)), "data.class_word": "ball",
        "data.resolution": resolution, "prior.class_dir": str(class_folder(resolution)), "output.path": str(out),
        "train.steps": spec["steps"], "train.batch_size": spec["batch"], "train.checkpoint_every": 0,
        "train.log_every": spec["steps"], "train.mixed_precision": spec["mixed_precision"],
        "train.gradient_checkpointing": spec["gradient_checkpointing"], "train.optimizer": spec["optimizer"],
        "train.compile": spec["compile"], "validation.steps": 2, "validation.seeds": [0],
        "lora.rank": spec.get("rank", 4), "lora.train_text_encoder": spec.get("train_text_encoder", False),
        "train.base_quantization": spec.get("base_quantization", "none"), "train.t5_on_cpu": spec.get("t5_on_cpu", False),
        **({"output.format": "diffusers", "prior.guidance": 3.5, "validation.guidance": 3.5}
           if spec["model"].startswith("flux") else {}),
        "validation.prompts": ["a photo of {token} {class}"]})
    start = time.perf_counter()
    planned = plan(config, device_type=device)
    plan_s = time.perf_counter() - start
    stamps: dict[int, float] = {}

    def progress(event) -> None:
        if event.stage == "train" and event.step in (spec["warmup"], spec["steps"]):
            if device == "cuda":
                torch.cuda.synchronize()  # the loop itself never waits for the GPU
            stamps[event.step] = clock()

    # kind "tensors": the same run with every tensor it creates counted (weights, caches, activations,
    # optimizer states): the quantity the plan estimates, without the allocator's and libraries' overhead.
    tracker = LiveBytes() if spec["kind"] == "tensors" else contextlib.nullcontext()
    rss_before = reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tracker:
        train(config, progress=progress)
    wall = time.perf_counter() - start
    settings = MemorySettings.from_config(config, device_type=device, resolution=resolution,
                                          generate_class_images=False)
    result = {**spec, "resolution": resolution, "wall_s": wall, "plan_s": plan_s,
              "flops": step_flops(models, settings), "estimate_gb": planned.memory.peak / 1e9,
              "estimate_phase": planned.memory.peak_phase}
    if spec["kind"] == "tensors":
        return {**result, "tensor_peak_gb": tracker.peak / 1e9,
                "estimate_error": planned.memory.peak / tracker.peak - 1}
    result.update(per_step(stamps, spec))
    result.update(_memory_and_rate(device, spec["mixed_precision"], rss_before))
    return _derived(result)


def reference_worker(spec: dict) -> dict:
    """What diffusers' train_dreambooth_lora.py does each step, on the same model in the same conditions:
    decode and transform the batch's images, VAE-encode them, run the text encoder, then the UNet step
    (LoRA rank 4 on to_q/k/v/out, AdamW, fp32, prior preservation with batch 1 + 1). The issue's reference
    figures come from that script on a quiet 2-core machine; this row measures the same work here and now."""
    from models import INSTANCES, class_folder, model_folder

    from dreamlora.data import list_image_files, load_rgb, resize_for_training
    from dreamlora.lora import add_lora_adapters, trainable_parameters
    from dreamlora.models import load_base_model

    name = spec["model"]
    base = load_base_model(name if name.startswith("builtin:") else str(model_folder(name)))
    resolution = spec["resolution"] or native_resolution(name, base)
    rss_before = reset_peak_rss()
    instances = list_image_files(INSTANCES, "instance")[0]
    classes = list_image_files(class_folder(resolution), "class")[0]
    for module in (base.unet, base.vae, *base.text_encoders):
        module.requires_grad_(False)
    add_lora_adapters(base.unet, base.text_encoders, rank=4, alpha=4.0, dropout=0.0,
                      unet_targets=["to_k", "to_q", "to_v", "to_out.0"], train_text_encoder=False, text_targets=[])
    params = trainable_parameters(base.unet)
    base.unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    tokenizer, text_encoder = base.tokenizers[0], base.text_encoders[0]
    ids = tokenizer(["a photo of sks ball", "a photo of ball"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    scaling = base.vae.config.scaling_factor
    stamps = {}
    for step in range(1, spec["steps"] + 1):
        paths = [instances[step % len(instances)], classes[step % len(classes)]]
        pixels = torch.stack([resize_for_training(load_rgb(p), resolution, "center", base.vae_scale_factor)
                              for p in paths])
        latents = base.vae.encode(pixels).latent_dist.sample() * scaling
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (2,))
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        pred = base.unet(noisy, timesteps, hidden).sample
        pred, prior_pred = pred.chunk(2)
        target, prior_target = noise.chunk(2)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float()) + \
            torch.nn.functional.mse_loss(prior_pred.float(), prior_target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step in (spec["warmup"], spec["steps"]):
            stamps[step] = clock()
    result = {**spec, "resolution": resolution, **per_step(stamps, spec)}
    result.update(_memory_and_rate(spec["device"], "no", rss_before))
    return result


def unet_worker(spec: dict) -> dict:
    """The training loop body of dreamlora.training on the UNet alone (for architectures dreamlora cannot load)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from models import SD_SCHEDULER, model_configs

    from dreamlora.lora import add_lora_adapters, trainable_parameters
    from dreamlora.losses import diffusion_target, prior_preservation_loss
    from dreamlora.memory import estimate_memory, unet_inputs
    from dreamlora.training import channels_last_helps

    device, mp = spec["device"], spec["mixed_precision"]
    models = model_configs(spec["model"])
    resolution = spec["resolution"] or native_resolution(spec["model"], models)
    dtype = DTYPES[mp]
    with torch.device(device):
        unet = UNet2DConditionModel(**models.unet)
    unet.requires_grad_(False).to(dtype)
    add_lora_adapters(unet, [], rank=4, alpha=4.0, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                      train_text_encoder=False, text_targets=[])
    params = trainable_parameters(unet)
    for p in params:
        p.data = p.data.float()
    if spec["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    if channels_last_helps(torch.device(device), mp):
        unet.to(memory_format=torch.channels_last)
    unet.train()
    if spec["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device) if mp == "fp16" else None
    autocast = torch.autocast(device, dtype=dtype) if mp != "no" else contextlib.nullcontext()
    scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k in ("beta_start", "beta_end",
                                                                                   "beta_schedule",
                                                                                   "num_train_timesteps")})
    latent = resolution // models.vae_scale_factor
    rows = 2 * spec["batch"]
    resident = sum(t.numel() * t.element_size() for t in unet.parameters())  # built before the window opens
    rss_before = reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = {}
    for step in range(1, spec["steps"] + 1):
        # What BatchSource.draw hands the loop: cached latents, noise, timesteps, cached embeddings.
        (latents, _), kwargs = unet_inputs(models, rows, latent, dtype)
        latents = torch.randn(latents.shape, device=device, dtype=dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (rows,), device=device)
        kwargs = {k: (torch.randn(v.shape, device=device, dtype=dtype) if isinstance(v, torch.Tensor) else
                      {kk: torch.randn(vv.shape, device=device, dtype=dtype) for kk, vv in v.items()})
                  for k, v in kwargs.items()}
        with autocast:
            noisy = scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, **kwargs).sample.float()
        target = diffusion_target("epsilon", latents, noise, scheduler.alphas_cumprod, timesteps)
        parts = prior_preservation_loss(pred, target, spec["batch"], 1.0)
        if scaler:
            scaler.scale(parts.total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (spec["warmup"], spec["steps"]):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps[step] = clock()
    settings = _settings(spec, models, resolution)
    estimate = estimate_memory(models, settings).training
    unet_only = sum(v for k, v in estimate.items() if k not in ("text encoders", "VAE", "cached embeddings"))
    result = {**spec, "resolution": resolution, **per_step(stamps, spec), "flops": step_flops(models, settings),
              "estimate_gb": unet_only / 1e9, "estimate_phase": "training (UNet only)"}
    result.update(_memory_and_rate(device, mp, rss_before, resident if device == "cpu" else 0))
    return _derived(result)


def _memory_and_rate(device: str, mixed_precision: str, rss_before: int, resident: int = 0) -> dict:
    """Peak memory (CUDA: allocated; CPU: rise of peak RSS, plus `resident` bytes that were already in
    memory when the window opened) and the matmul rate."""
    import resource

    out = {"process_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_gb"] = (peak_rss() - rss_before + resident) / 1e9
    rate_dtype = torch.float32 if mixed_precision == "no" else DTYPES[mixed_precision]
    out["matmul_tflops"] = matmul_rate(device, rate_dtype) / 1e12
    return out


def _derived(result: dict) -> dict:
    result["achieved_tflops"] = result["flops"] / result["step_s"] / 1e12
    result["mfu"] = result["achieved_tflops"] / result["matmul_tflops"]
    result["estimate_error"] = result["estimate_gb"] / result["peak_gb"] - 1 if result.get("peak_gb") else None
    reference = REFERENCE.get(result["model"])
    if reference and result["mixed_precision"] == "no" and not result["gradient_checkpointing"]:
        result["step_vs_ref"] = result["step_s"] / reference["step_s"]
        result["rss_vs_ref"] = result["process_rss_gb"] / reference["rss_gb"]
    return result


# ----------------------------------------------------------------------------------------------
# Driver

COLUMNS = [("kind", "kind"), ("model", "model"), ("resolution", "px"), ("device", "device"),
           ("mixed_precision", "precision"), ("gradient_checkpointing", "ckpt"), ("optimizer", "optimizer"),
           ("compile", "compile"), ("step_s", "s/step"), ("step_cpu_s", "CPU s/step"),
           ("step_vs_run_ref", "x run ref"), ("cpu_vs_run_ref", "x run ref (CPU s)"), ("step_vs_ref", "x ref fig"),
           ("process_rss_gb", "proc RSS GB"), ("rss_vs_run_ref", "x run ref"), ("rss_vs_ref", "x ref fig"), ("peak_gb", "peak GB"), ("tensor_peak_gb", "tensor peak GB"), ("estimate_gb", "plan GB"), ("estimate_error", "plan err"),
           ("flops", "GFLOP/step"), ("achieved_tflops", "TFLOP/s"), ("matmul_tflops", "matmul TFLOP/s"),
           ("mfu", "MFU")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="cpu (default), cpu-compile, gpu, gpu-flux or cpu-smoke")
    parser.add_argument("--rows", help="only rows whose model is in this comma list (e.g. tiny,small,sd15)")
    parser.add_argument("--kinds", help="only these kinds (train,tensors,unet,plan)")
    parser.add_argument("--steps", type=int, help="steps a row (default: the preset's)")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a row may take")
    parser.add_argument("--threads", type=int, help="CPU threads a worker uses (default: all cores; 1 is steadier "
                                                     "when other jobs share the cores)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        emit(worker(spec))
        return
    rows = preset_rows(args.preset, args.steps)
    threads = args.threads or (None if "OMP_NUM_THREADS" not in os.environ else int(os.environ["OMP_NUM_THREADS"]))
    rows = [{**r, "threads": threads or os.cpu_count()} for r in rows]
    if args.rows:
        rows = [r for r in rows if r["model"] in args.rows.split(",")]
    if args.kinds:
        rows = [r for r in rows if r["kind"] in args.kinds.split(",")]
    _prepare(rows)
    results = []
    for spec in rows:
        load = machine_load()
        result = run_worker(Path(__file__), spec, timeout=args.timeout)
        result["load"] = f"{load} -> {machine_load()}"
        if result.get("flops"):
            result["flops"] = result["flops"] / 1e9
        results.append(result)
        append_json(args.json, [{"bench": "train_step", **result}])
        status = result.get("error") or (f"{result['step_s']:.3f} s/step" if "step_s" in result else "planned")
        print(f"[{len(results)}/{len(rows)}] {spec['kind']} {spec['model']}: {status} ({result['load']})",
              file=sys.stderr, flush=True)
    _pair(results)
    print_table(results, COLUMNS, title=f"Training step ({machine_load()} at the end)")
    for r in results:
        if r.get("error"):
            print(f"- {r['kind']} {r['model']}: ERROR {r['error']}")


def _pair(results: list[dict]) -> None:
    """dreamlora's rows against the reference-style row of the same model measured in this run."""
    for r in results:
        if r["kind"] != "train" or r.get("error") or r["mixed_precision"] != "no" or r["gradient_checkpointing"]:
            continue
        ref = next((x for x in results if x["kind"] == "reference" and x["model"] == r["model"] and not x.get("error")),
                   None)
        if ref:
            r["step_vs_run_ref"] = r["step_s"] / ref["step_s"]
            r["cpu_vs_run_ref"] = r["step_cpu_s"] / ref["step_cpu_s"]
            r["rss_vs_run_ref"] = r["process_rss_gb"] / ref["process_rss_gb"]


def _prepare(rows: list[dict]) -> None:
    """Build the model folders and class images once, outside the timed workers."""
    from models import MODELS, class_folder, model_folder

    for spec in rows:
        if spec["kind"] not in ("train", "tensors", "reference"):
            continue
        if spec["model"].startswith("builtin:"):
            class_folder(spec["resolution"] or 64)
            continue
        model_folder(spec["model"], device=spec["device"])  # random init on the GPU is much faster
        class_folder(spec["resolution"] or MODELS[spec["model"]]["resolution"])


if __name__ == "__main__":
    main()
