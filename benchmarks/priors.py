"""Class-image (prior) benchmark: images/s and s/image for the default sampler and the 50-step baseline.

Each row runs `dreamlora.make_class_images` (what `dreamlora priors` runs, and what training uses to fill
its class-image cache through generate_priors) in its own process: batched CFG, fp16 on a GPU,
one-image VAE decodes, PNG writing included. Timing runs from the first to the last progress event
of the generation, so model loading is outside it.

- default: DPM-Solver++ 2M, 20 steps, guidance 7.5 (dreamlora's prior.sampler / prior.steps);
- baseline: PNDM, 50 steps, guidance 7.5, as diffusers' train_dreambooth_lora.py makes class images.

Quality. Both samplers are deterministic ODE solvers started from the same noise (same seeds), so the
question when steps are cut is how far an image lands from where its solver converges. Each row gets
two PSNRs (uint8 images): against a --reference-steps (200) DPM-Solver++ 2M run, and against its own
sampler at 200 steps. The two 200-step references also differ from each other (PNDM stops at
t = 1 with a little noise left, DPM-Solver++ goes to sigma 0, and their grids start at different
timesteps), so "vs own reference" is the discretisation error. On random-weight models that is all
that can be judged; on the trained `builtin:toy` the toy oracle also reads the
images: the share it classifies as the prompt's class, and the cosine of its embeddings to the
DPM-Solver++ reference of the same seed.

Timing: wall seconds, and the process's CPU seconds, which with one thread (--threads 1) hardly depend
on what else the machine runs; the ratios use CPU seconds.

    python benchmarks/priors.py                      # the CPU table of benchmarks/README.md
    python benchmarks/priors.py --preset gpu         # what gpu.sh runs
    python benchmarks/priors.py --rows tiny --sweep  # PSNR of 10..50 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_json, emit, machine_load, peak_rss, print_table, reset_peak_rss, run_worker  # noqa: E402

import torch  # noqa: E402

REFERENCE_S_PER_IMAGE = {"tiny": 1.37, "small": 127.0}  # diffusers' script: PNDM 50 steps, guided, batch 4, 2 cores
DEFAULT = ("dpm++2m", 20)
BASELINE = ("pndm", 50)


def row(kind: str, model: str, sampler: str, steps: int, **extra) -> dict:
    return {"kind": kind, "model": model, "sampler": sampler, "steps": steps, "guidance": 7.5, "images": 8,
            "batch": 4, "device": "cpu", "resolution": None, **extra}


def preset_rows(preset: str, images: int | None, sweep: bool, reference_steps: int,
                extra: tuple[tuple[str, int], ...] = ()) -> list[dict]:
    rows: list[dict] = []
    if preset == "cpu":
        # builtin:toy first: a trained model, whose images the toy oracle also judges
        plan = [("builtin:toy", 16, True), ("builtin:tiny-sd", 12, True), ("tiny", 12, True), ("small", 4, "dpm++2m")]
    elif preset == "gpu":
        plan = [("sd15", 8, True)]
    elif preset == "cpu-smoke":
        plan = [("sd15-mini", 2, False)]
    else:
        raise SystemExit(f"unknown preset {preset!r}: cpu, gpu or cpu-smoke")
    device = "cuda" if preset == "gpu" else "cpu"
    for model, count, quality in plan:
        count = images or count
        for sampler, steps in (DEFAULT, BASELINE):
            rows.append(row("priors", model, sampler, steps, images=count, device=device))
        if preset == "cpu":  # the reference figures' own code path, measured in the same conditions
            rows.append(row("pipeline", model, "pndm", 50, images=count, device=device))
        if sweep:
            for sampler, steps in (("dpm++2m", 10), ("dpm++2m", 15), ("dpm++2m", 30), ("pndm", 20), ("pndm", 30)):
                rows.append(row("priors", model, sampler, steps, images=count, device=device))
        for sampler, steps in extra:
            rows.append(row("priors", model, sampler, steps, images=count, device=device))
        if quality:  # True: every sampler's reference; a sampler name: only that one, on 2 images (a slow model)
            samplers = dict.fromkeys(("dpm++2m", "pndm") + tuple(name for name, _ in extra))
            for sampler in samplers if quality is True else (quality,):
                rows.append(row("priors", model, sampler, reference_steps if quality is True else reference_steps // 2,
                                images=count if quality is True else min(count, 2), device=device, reference=True))
    if preset == "gpu":
        rows += [row("unet-sampling", "sdxl", s, n, images=4, batch=2, device=device) for s, n in (DEFAULT, BASELINE)]
    if preset == "cpu-smoke":
        rows += [row("unet-sampling", "sdxl-mini", s, n, images=2, batch=2) for s, n in (("dpm++2m", 3), ("pndm", 3))]
    return rows


# ----------------------------------------------------------------------------------------------
# Workers


def worker(spec: dict) -> dict:
    if spec["kind"] == "unet-sampling":
        return unet_sampling_worker(spec)
    if spec["kind"] == "pipeline":
        return pipeline_worker(spec)
    from models import MODELS, model_folder

    from dreamlora import make_class_images

    name = spec["model"]
    model = name if name.startswith("builtin:") else str(model_folder(name))
    out = Path(spec["out"])
    stamps: list[tuple[float, float]] = []

    def progress(event) -> None:
        if event.stage == "priors":
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), time.process_time()))

    rss_before = reset_peak_rss()
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    make_class_images("a photo of a ball", out, spec["images"], model=model, steps=spec["steps"],
                      guidance=spec["guidance"], batch_size=spec["batch"], sampler=spec["sampler"],
                      resolution=spec["resolution"] or MODELS.get(name, {}).get("resolution"), progress=progress)
    seconds, cpu = stamps[-1][0] - stamps[0][0], stamps[-1][1] - stamps[0][1]
    result = {**spec, "s_per_image": seconds / spec["images"], "images_per_s": spec["images"] / seconds,
              "cpu_s_per_image": cpu / spec["images"]}
    result["peak_gb"] = (torch.cuda.max_memory_allocated() if spec["device"] == "cuda"
                         else peak_rss() - rss_before) / 1e9
    return result


def pipeline_worker(spec: dict) -> dict:
    """What diffusers' train_dreambooth_lora.py does to make class images, on the same model here and now:
    DiffusionPipeline.from_pretrained(model, safety_checker=None), then pipeline(prompts).images with its
    defaults (the model's PNDM scheduler, 50 steps, guidance 7.5), batches of 4, each image saved."""
    from diffusers import DiffusionPipeline
    from models import model_folder

    from dreamlora.models.builtin import builtin_model_dir

    name = spec["model"]
    folder = builtin_model_dir(name.removeprefix("builtin:")) if name.startswith("builtin:") else model_folder(name)
    # The script's dtype: fp16 on CUDA, fp32 elsewhere.
    dtype = torch.float16 if spec["device"] == "cuda" else torch.float32
    pipeline = DiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                 dtype=dtype).to(spec["device"])
    pipeline.set_progress_bar_config(disable=True)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    rss_before = reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, spec["images"], spec["batch"]):
        count = min(spec["batch"], spec["images"] - first)
        images = pipeline(["a photo of a ball"] * count).images
        for i, image in enumerate(images):
            image.save(out / f"{first + i:05d}.png")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {**spec, "sampler": "pipeline default (pndm)", "steps": 50, "s_per_image": seconds / spec["images"],
            "images_per_s": spec["images"] / seconds, "cpu_s_per_image": cpu / spec["images"],
            "peak_gb": (peak_rss() - rss_before) / 1e9}


def unet_sampling_worker(spec: dict) -> dict:
    """SDXL-size sampling without an SDXL pipeline: CFG batch through the UNet with the sampler, then
    dreamlora.sampling.decode_latents one image at a time (random weights, half precision on a GPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from models import MODELS, SD_SCHEDULER, model_configs

    from dreamlora.memory import unet_inputs
    from dreamlora.models.loading import make_scheduler
    from dreamlora.sampling import decode_latents

    device = spec["device"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    models = model_configs(spec["model"])
    resolution = spec["resolution"] or MODELS[spec["model"]]["resolution"]
    with torch.device(device):
        unet = UNet2DConditionModel(**models.unet).to(dtype).eval()
        vae = AutoencoderKL(**models.vae).to(dtype).eval()
    processor = VaeImageProcessor(vae_scale_factor=models.vae_scale_factor)
    scheduler = make_scheduler({**SD_SCHEDULER, "_class_name": "PNDMScheduler"}, spec["sampler"])
    latent = resolution // models.vae_scale_factor
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, spec["images"], spec["batch"]):
            rows = min(spec["batch"], spec["images"] - first)
            (sample, _), cond = unet_inputs(models, 2 * rows, latent, dtype)  # CFG: uncond + cond rows
            cond = {k: (torch.randn(v.shape, device=device, dtype=dtype) if isinstance(v, torch.Tensor) else
                        {kk: torch.randn(vv.shape, device=device, dtype=dtype) for kk, vv in v.items()})
                    for k, v in cond.items()}
            latents = torch.randn((rows, *sample.shape[1:]), device=device, dtype=dtype)
            scheduler.set_timesteps(spec["steps"], device=device)
            latents = latents * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                both = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                uncond, text = unet(both, t, **cond).sample.chunk(2)
                latents = scheduler.step(uncond + spec["guidance"] * (text - uncond), t, latents).prev_sample
            decode_latents(vae, processor, latents)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {**spec, "resolution": resolution, "s_per_image": seconds / spec["images"],
              "images_per_s": spec["images"] / seconds}
    if device == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


# ----------------------------------------------------------------------------------------------
# Quality


def psnr(folder: Path, reference: Path, count: int) -> float:
    """PSNR in dB of the images in `folder` against the same-named images in `reference` (uint8 RGB)."""
    import numpy as np
    from PIL import Image

    errors = []
    for i in range(count):
        a = np.asarray(Image.open(folder / f"{i:05d}.png").convert("RGB"), dtype=np.float64)
        b = np.asarray(Image.open(reference / f"{i:05d}.png").convert("RGB"), dtype=np.float64)
        errors.append(((a - b) ** 2).mean())
    mse = sum(errors) / len(errors)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pixel_std(folder: Path, count: int) -> float:
    """Mean per-image standard deviation of the pixels: a saturated or flat image would make PSNR meaningless."""
    import numpy as np
    from PIL import Image

    return float(np.mean([np.asarray(Image.open(folder / f"{i:05d}.png"), dtype=np.float64).std()
                          for i in range(count)]))


# ----------------------------------------------------------------------------------------------
# Driver

COLUMNS = [("kind", "kind"), ("model", "model"), ("device", "device"), ("sampler", "sampler"), ("steps", "steps"),
           ("images", "images"), ("batch", "batch"), ("s_per_image", "s/image"), ("images_per_s", "images/s"),
           ("cpu_s_per_image", "CPU s/image"),
           ("vs_baseline", "x baseline"), ("vs_pipeline", "x diffusers pipeline"), ("vs_reference", "x ref figure"),
           ("psnr", "PSNR dB vs DPM++ ref"), ("psnr_own", "PSNR dB vs own ref"), ("oracle_ball", "oracle: ball"),
           ("oracle_cos", "oracle cos to ref"), ("pixel_std", "pixel std"), ("peak_gb", "peak GB")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="cpu (default), gpu or cpu-smoke")
    parser.add_argument("--rows", help="only these models (comma list)")
    parser.add_argument("--images", type=int, help="images a row (default: the preset's)")
    parser.add_argument("--sweep", action="store_true", help="also 10/15/30-step DPM++ 2M and 20/30-step PNDM")
    parser.add_argument("--extra", default="", help="more sampler:steps rows, e.g. unipc:10,unipc:15 (each sampler "
                                                       "also gets its own converged reference)")
    parser.add_argument("--reference-steps", type=int, default=200, help="steps of the converged reference")
    parser.add_argument("--no-quality", action="store_true", help="skip the reference runs")
    parser.add_argument("--batch", type=int, help="images a pipeline call for dreamlora's rows (default 4, as "
                                                   "--num-class-images' batch; the diffusers pipeline row stays at 4)")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    parser.add_argument("--timeout", type=float, default=7200)
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
    extra = tuple((name, int(steps)) for name, steps in (item.split(":") for item in args.extra.split(",") if item))
    rows = preset_rows(args.preset, args.images, args.sweep, args.reference_steps, extra)
    threads = args.threads or (None if "OMP_NUM_THREADS" not in os.environ else int(os.environ["OMP_NUM_THREADS"]))
    rows = [{**r, "threads": threads or os.cpu_count()} for r in rows]
    if args.rows:
        rows = [r for r in rows if r["model"] in args.rows.split(",")]
    if args.batch:
        rows = [{**r, "batch": args.batch} if r["kind"] == "priors" else r for r in rows]
    if args.no_quality:
        rows = [r for r in rows if not r.get("reference")]
    from models import model_folder

    for name in {r["model"] for r in rows if r["kind"] == "priors" and not r["model"].startswith("builtin:")}:
        model_folder(name, device=rows[0]["device"])
    work = Path(tempfile.mkdtemp(prefix="dreamlora-priors-bench-"))
    results = []
    for i, spec in enumerate(rows):
        spec = {**spec, "out": str(work / f"{i:02d}-{spec['model'].replace(':', '-')}-{spec['sampler']}-{spec['steps']}")}
        load = machine_load()
        result = run_worker(Path(__file__), spec, timeout=args.timeout)
        result["load"] = f"{load} -> {machine_load()}"
        results.append(result)
        print(f"[{i + 1}/{len(rows)}] {spec['model']} {spec['sampler']} {spec['steps']}: "
              f"{result.get('error') or format(result['s_per_image'], '.3f') + ' s/image'} ({result['load']})",
              file=sys.stderr, flush=True)
    _compare(results)
    append_json(args.json, [{"bench": "priors", **r} for r in results])
    print_table(results, COLUMNS, title=f"Class images ({machine_load()} at the end)")
    for r in results:
        if r.get("error"):
            print(f"- {r['model']} {r['sampler']} {r['steps']}: ERROR {r['error']}")
    shutil.rmtree(work, ignore_errors=True)


def _compare(results: list[dict]) -> None:
    """Speed against the baseline row and the reference figure; PSNR against the converged reference."""
    ok = [r for r in results if not r.get("error")]
    for r in ok:
        same = [b for b in ok if b["model"] == r["model"] and b["kind"] == r["kind"]]
        baseline = next((b for b in same if (b["sampler"], b["steps"]) == BASELINE), None)
        # Ratios of CPU seconds where both rows have them (steadier than wall time on a shared machine).
        time_key = "cpu_s_per_image" if "cpu_s_per_image" in r else "s_per_image"
        if baseline and time_key in baseline:
            r["vs_baseline"] = r[time_key] / baseline[time_key]
        pipeline = next((b for b in ok if b["kind"] == "pipeline" and b["model"] == r["model"]), None)
        if pipeline and r["kind"] == "priors":
            r["vs_pipeline"] = r[time_key] / pipeline[time_key]
        if r["model"] in REFERENCE_S_PER_IMAGE and r["device"] == "cpu":
            r["vs_reference"] = r["s_per_image"] / REFERENCE_S_PER_IMAGE[r["model"]]
        if r["kind"] != "priors":
            continue
        for key, sampler in (("psnr", "dpm++2m"), ("psnr_own", r["sampler"])):
            reference = next((b for b in same if b.get("reference") and b["sampler"] == sampler), None)
            if reference and r is not reference:
                r[key] = psnr(Path(r["out"]), Path(reference["out"]), min(r["images"], reference["images"]))
        r["pixel_std"] = pixel_std(Path(r["out"]), r["images"])
        if r["model"] in oracle_models():
            _oracle_scores(r, next((b for b in same if b.get("reference") and b["sampler"] == "dpm++2m"), None))


def oracle_models() -> tuple[str, ...]:
    """The trained models the toy oracle can read: dreamlora eval's own list."""
    from dreamlora.config import ORACLE_MODELS

    return ORACLE_MODELS


def _oracle_scores(row: dict, reference: dict | None) -> None:
    """On the trained toy model: the share of class images the oracle reads as the prompt's class ("ball"),
    and the mean cosine of oracle embeddings to the reference image of the same seed."""
    from PIL import Image

    from dreamlora.toyworld.oracle import load_oracle

    oracle = load_oracle()
    images = [Image.open(Path(row["out"]) / f"{i:05d}.png").convert("RGB") for i in range(row["images"])]
    reading = oracle.read(images)
    row["oracle_ball"] = sum(c == "ball" for c in reading.classes) / len(images)
    if reference and reference is not row:
        count = min(row["images"], reference["images"])
        ref = oracle.embed([Image.open(Path(reference["out"]) / f"{i:05d}.png").convert("RGB") for i in range(count)])
        row["oracle_cos"] = float((reading.embeddings[:count] * ref).sum(1).mean())


if __name__ == "__main__":
    main()
