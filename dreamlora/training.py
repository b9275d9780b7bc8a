"""DreamBooth-LoRA training: train(config) -> TrainResult.

The loop reads like the algorithm: draw a batch (instance rows, then class rows) from cached
latents and embeddings, add noise, predict, prior-preservation loss, step, log, checkpoint,
validate. Setup and bookkeeping live in small helpers below it and in sibling modules.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints
from .atomic import RunLock, as_os_error, check_writable, write_bytes_atomic, write_error, write_text_atomic
from .config import (DreamLoraConfig, ValidationConfig, describe, fill_prompt, format_problems, to_portable_json,
                     with_epochs)
from .config import validate as validate_config
from .data import (ImageSet, LatentCache, class_set, crop_origin, derive_seed, draw_latents_and_crops, encode_latents,
                   pick_indices, resize_for_training, step_caption, training_set)
from .buckets import assign_bucket, batch_at, bucket_sizes, group_by_bucket, resize_to_bucket
from .errors import ConfigError, DreamLoraError, NumericalError, TrainingError
from .losses import LossParts, offset_noise, prior_preservation_loss
from .memory import CACHE_BATCH, GIB, apply_memory_budget
from .lora import (add_lora_adapters, adapter_state_dict, load_adapter_state_dict, lora_metadata, save_lora_file,
                   trainable_parameters)
from .models import BaseModel, load_base_model
from .models.family import ImageGeometry, PromptEmbeddings
from .preflight import preflight_training_data, prompt_length_warnings, token_warnings
from .identity import ModelIdentity
from .priors import cached_prior_dir, generate_priors, training_prior_spec
from .position_jitter import draw_shifts, jittered_positions
from .quantization import quantize_denoiser
from .threads import cpu_threads
from .token_embedding import attach_learned_token, initial_vectors, learned_token_parameters, token_ids
from .tracking import log_grid, start_tracking, tracker_names
from .progress import ProgressCallback, ProgressEvent, ignore_progress, note
from .sampling import cache_t5_states, render_validation_grid
from .selection import CheckpointScorer

# Settings that may change between a run and its resume without changing what is learned.
RESUMABLE_CHANGES = {"train.steps", "train.epochs", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "output.overwrite", "output.path", "output.format", "output.save_dtype",
                     "validation.every", "validation.prompts", "validation.seeds", "validation.steps",
                     "validation.guidance", "validation.sampler", "validation.final", "validation.eval_every",
                     "validation.eval_seeds",
                     "validation.max_class_drift", "validation.eval_dino", "validation.eval_clip",
                     "train.run_dir", "data.instance_dir",
                     "prior.class_dir", "model.name", "model.single_file_config", "train.compile",
                     "train.memory_budget", "data.image_column", "data.caption_column"}  # DATA: by content


@dataclass
class TrainResult:
    output: Path  # the LoRA file
    run_dir: Path  # checkpoints and validation grids
    steps: int
    loss: float | None  # the last logged losses
    instance_loss: float | None
    prior_loss: float | None
    validation_grid: Path | None


def train(config: DreamLoraConfig, progress: ProgressCallback = ignore_progress) -> TrainResult:
    """Teach the base model the subject in `config.data.instance_dir` and write one LoRA file.

    The caller's global random state is as it was afterwards: a run draws from generators seeded from
    `train.seed` (LoRA dropout from the global one, which is put back).

    Raises:
        ConfigError, DataError, ModelLoadError, TrainingError: a message naming the file or flag.
    """
    # A config built in Python skips load_config: check it here, before anything loads or is written.
    problems = validate_config(config)
    if problems:
        raise ConfigError(format_problems(problems))
    with global_rng_restored(), stop_signals_interrupt(), contextlib.ExitStack() as held:
        try:
            return _run(config, progress, held)
        except KeyboardInterrupt as exc:  # the loop and the final save turn their interrupts into TrainingErrors
            raise TrainingError(f"{interruption(exc)} before the first training step: nothing was trained. Run "
                                "the same command again (class images made so far are kept).") from None


def _run(config: DreamLoraConfig, progress: ProgressCallback, held: contextlib.ExitStack) -> TrainResult:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    config = fit_memory_budget(config, progress)  # from the model's configs: before any weight is read
    output, run_dir = output_paths(config)
    images = preflight_training_data(config.data, config.prior)  # every image and caption before any model loads
    check_hardware(config, process_device())  # before accelerate fixes the precision for the process
    # Text encoders conditioned on a hidden layer below the last (SDXL's penultimate one) leave their last layer's
    # adapters without gradients, which DDP must be told to expect.
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.gradient_accumulation_steps,
                              log_with=tracker_names(config.train.report_to) or None, project_dir=str(run_dir / "logs"),
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=config.lora.train_text_encoder)])
    config = with_epochs(config, len(images.instance.usable), accelerator.num_processes)  # --epochs: the steps
    held.enter_context(run_locks(output, run_dir, accelerator))  # before anything in the run folder changes
    start_step = prepare_run_dir(config, run_dir, accelerator)
    started = run_started(run_dir, start_step, accelerator.is_main_process)
    start_tracking(accelerator, to_portable_json(config))
    held.callback(accelerator.end_training)  # closes the trackers' files, also after an error
    # CPU threads: the cores other jobs leave free, fixed for the run (a resumed run keeps its count, so it sums
    # in the same order and writes the same bytes).
    threads = held.enter_context(cpu_threads(config.train.threads or resumed_threads(run_dir, start_step)))

    # The main process loads first: it builds a missing built-in model, which other ranks could not
    # (transformers' save_pretrained writes nothing on non-main ranks of a process group).
    with accelerator.main_process_first():
        base = load_base_model(config.model.name, single_file_config=config.model.single_file_config,
                               vae=config.model.vae, dtype=frozen_dtype(config.train.mixed_precision))
    for message in base.notes:
        note(progress, message)
    base.objective = training_objective(base, config)
    resolution = config.data.resolution or base.default_resolution
    images.finish(resolution, progress)  # size checks need the resolution; warnings become notes
    for message in token_warnings(config.data.token, config.data.class_word, base.tokenizers[0]) \
            if config.data.job == "dreambooth" else []:
        note(progress, message)
    instances = training_set(config.data, images.instance)
    prompts = training_prompts(config, instances)
    for message in prompt_length_warnings(prompts, base.tokenizers[0]):
        note(progress, message)
    grid_prompts = validation_prompts(config, instances)
    encode_cached_prompts(base, config, [*prompts.values(), "", config.prior.negative_prompt], accelerator.device)
    place_frozen(base, accelerator.device, frozen_dtype(config.train.mixed_precision), config.train.base_quantization)
    use_channels_last(base, accelerator.device, config)
    classes = class_images(config, base, resolution, accelerator, progress,
                           images.classes.usable if images.classes else None) if config.prior.enabled else None
    record = {**run_record(base, config, instances, classes, accelerator.num_processes), "threads": threads}
    add_adapters(base, config, accelerator.device)
    batches = BatchSource(base, config, instances, classes, resolution, accelerator, progress)
    offload_encoders(base, config, accelerator.device)  # the caches hold what the VAE and text encoders made
    optimizer, lr_scheduler = make_optimizer(base, config)
    if start_step:
        restore(run_dir, start_step, base, optimizer, lr_scheduler, config, record, accelerator, progress)
    unet = accelerator.prepare(base.unet)
    adapted = adapted_encoders(base)
    text_encoders = [accelerator.prepare(te) if te in adapted else te for te in base.text_encoders] \
        if config.lora.train_text_encoder else base.text_encoders
    optimizer = accelerator.prepare(optimizer)
    forward = torch.compile(unet) if config.train.compile else unet  # same parameters; compiled on first call
    trained = [p for p in trainable_parameters(base.unet)] + \
        [p for te in base.text_encoders for p in trainable_parameters(te)]

    t, cfg, objective = config.train, config, base.objective
    scorer = CheckpointScorer(base, config, resolution, run_dir, start_step, accelerator.is_main_process) \
        if cfg.validation.eval_every and config.data.job == "dreambooth" else None  # scores a subject's renders
    logged: LossParts | None = None
    running = torch.zeros(3, device=accelerator.device)  # summed (total, instance, prior) since the last log
    step = last_log = completed = start_step
    updating = False  # True while the weights are ahead of `completed` (optimizer stepped, step not yet counted)
    try:
        for step in range(start_step, t.steps):
            for micro in range(t.gradient_accumulation_steps):
                batch = batches.draw(step, micro, text_encoders)
                with accelerator.accumulate(unet):
                    torch.manual_seed(derive_seed(t.seed, "dropout", step, micro, accelerator.process_index))
                    noisy = objective.noisy(batch.latents, batch.noise, batch.timesteps)
                    conditioning = base.family.denoiser_kwargs(batch.embeddings, batch.conditions)
                    pred = base.family.predict(forward, noisy, batch.timesteps, conditioning)
                    target = objective.target(batch.latents, batch.noise, batch.timesteps)
                    parts = prior_preservation_loss(pred, target, batch.num_instance, cfg.prior.loss_weight,
                                                    objective.loss_weights(batch.timesteps, t.snr_gamma))
                    accelerator.backward(parts.total)
                    if accelerator.sync_gradients:
                        updating = True
                        if t.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trained, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                running += torch.stack([p.detach().float() for p in parts]) / t.gradient_accumulation_steps
            lr_scheduler.step()
            done = completed = step + 1
            updating = False
            metrics = {}
            if done % t.log_every == 0 or done == t.steps:
                logged = LossParts(*mean_over_processes(running / (done - last_log), done, run_dir, config, accelerator))
                running.zero_()
                last_log = done
                metrics = {"loss": logged.total, "instance_loss": logged.instance, "prior_loss": logged.prior,
                           "lr": lr_scheduler.get_last_lr()[0]}
                accelerator.log(metrics, step=done)
            progress(ProgressEvent("train", done, t.steps, metrics))
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done < t.steps:
                mean_over_processes(running, done, run_dir, config, accelerator)  # never checkpoint a NaN step
                save_step(run_dir, done, base, optimizer, lr_scheduler, config, record, accelerator)
            if cfg.validation.every and done % cfg.validation.every == 0 and done < t.steps:
                validate(base, config, resolution, run_dir, done, accelerator, progress, grid_prompts)
            if scorer and (done % cfg.validation.eval_every == 0 or done == t.steps):
                scorer(done, progress)  # renders and scores the adapters; keeps them for `dreamlora export`
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (stop_signals_interrupt)
        # Save the last whole step, labelled with the steps the weights really hold: an interrupt during
        # logging, a checkpoint or a validation grid comes after step `completed`; one between the optimizer
        # update and the count cannot be labelled, so the last periodic checkpoint is kept instead.
        how = interruption(exc)
        if updating:
            raise TrainingError(f"{how} while applying step {completed + 1}; the last checkpoint in "
                                f"'{run_dir}' is kept. Run the same command with --resume to continue.") from None
        if completed > start_step:
            try:
                save_step(run_dir, completed, base, optimizer, lr_scheduler, config, record, accelerator)
            except KeyboardInterrupt:  # a second Ctrl-C: the checkpoint write is atomic, the older one stays
                raise TrainingError(f"{how}, and again while saving step {completed}; the last checkpoint in "
                                    f"'{run_dir}' is kept. Run the same command with --resume to continue.") from None
        raise TrainingError(f"{how} after step {completed}; a checkpoint is in '{run_dir}'. "
                            "Run the same command with --resume to continue.") from None

    if start_step < t.steps:  # resumed at the last step (its file was not written): the checkpoint is there
        save_step(run_dir, t.steps, base, optimizer, lr_scheduler, config, record, accelerator)
    kept = f"The trained weights are kept in '{run_dir}': run the same command with --resume to write the file."
    try:
        grid = validate(base, config, resolution, run_dir, t.steps, accelerator, progress, grid_prompts) \
            if config.validation.final else None
        if accelerator.is_main_process:
            with disk_errors(output, then=f" {kept}"):
                save_output(output, base, config, resolution, started, grid)
            progress(ProgressEvent("save", message=f"wrote {output}"))
    except KeyboardInterrupt as exc:  # the final grid and the file come after the last checkpoint: nothing is lost
        raise TrainingError(f"{interruption(exc)} after the last step, before '{output}' was written. {kept}") from None
    accelerator.wait_for_everyone()
    return TrainResult(output, run_dir, t.steps, *(logged or (None, None, None)), grid)


# ----------------------------------------------------------------------------------------------
# Setup


@contextlib.contextmanager
def global_rng_restored():
    """Put torch's global CPU (and initialised CUDA) random states back as they were."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def stop_signals_interrupt():
    """Treat SIGTERM and SIGHUP as Ctrl-C while training, so the last step is saved before the process ends.

    `docker stop`, Slurm and Kubernetes pre-emption send SIGTERM and wait a grace period (10-30 s) before
    SIGKILL; a closed terminal sends SIGHUP. Their default action ends the process at once and loses every
    step since the last checkpoint. After the first one the others are ignored, so a repeated signal does
    not break the checkpoint being written. Only the main thread can install handlers: elsewhere (a caller's
    worker thread) the signals keep their default action.
    """
    import threading

    if threading.current_thread() is not threading.main_thread() or not STOP_SIGNALS:
        yield
        return

    def stop(signum, frame):
        for number in STOP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number in STOP_SIGNALS:
        signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def interruption(exc: KeyboardInterrupt) -> str:
    """'interrupted (Ctrl-C)' or 'stopped by SIGTERM', for messages."""
    return f"stopped by {exc.signal_name}" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"


@contextlib.contextmanager
def run_locks(output: Path, run_dir: Path, accelerator):
    """Hold the output's and the run folder's locks (main process) for the whole run.

    Two runs writing the same --out, or sharing a run folder, would each report success while the file and
    the checkpoints hold only one of them. The second one stops here, naming the first; the locks die with
    their process. Under `accelerate launch` every process learns whether the main one got them.
    """
    locks, refusal = [], None
    if accelerator.is_main_process:
        try:
            locks.append(RunLock.acquire(output.parent / f".{output.name}.lock", f"output '{output}'",
                                         "choose another --out"))
            locks.append(RunLock.acquire(run_dir / ".lock", f"run folder '{run_dir}'", "pass another --run-dir"))
        except DreamLoraError as exc:
            refusal = exc
    message = str(refusal) if refusal else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    try:
        if refusal:
            raise refusal
        if message:
            raise TrainingError(message)
        yield
    finally:
        for lock in reversed([lock for lock in locks if lock is not None]):
            lock.release()
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when the run left it empty (a refused or failed start)


def training_prompts(config: DreamLoraConfig, instances: ImageSet) -> dict[str, str]:
    """Every prompt the run encodes, by where it comes from: captions, the instance, class and validation prompts."""
    data = config.data
    prompts = {}
    for path, prompt in zip(instances.paths, instances.prompts):
        caption = path.with_suffix(".txt")
        if instances.rows is not None:
            prompts[f"the caption of '{path.name}'"] = prompt
        else:
            prompts[f"the prompt of '{path.name}' (caption '{caption.name}')" if caption.is_file() else
                    describe("data.instance_prompt")] = prompt
    if config.prior.enabled:
        prompts[describe("data.class_prompt")] = fill_prompt(data.class_prompt, data.token, data.class_word)
    for i, prompt in enumerate(validation_prompts(config, instances)):
        prompts[f"{describe('validation.prompts')} {i + 1}"] = prompt
    return prompts


def validation_prompts(config: DreamLoraConfig, instances: ImageSet) -> list[str]:
    """The grids' prompts, filled. A fine-tune left with the DreamBooth defaults (which name a token and a class
    it does not have) renders its first two distinct captions instead."""
    data, given = config.data, config.validation.prompts
    if data.job == "finetune" and given == ValidationConfig().prompts:
        return list(dict.fromkeys(instances.prompts))[:2]
    return [fill_prompt(p, data.token, data.class_word) for p in given]


def output_paths(config: DreamLoraConfig) -> tuple[Path, Path]:
    """The output file and run folder; refuses to overwrite a finished file without --overwrite."""
    output = Path(config.output.path)
    if output.exists() and not config.output.overwrite:
        raise ConfigError(f"output '{output}' already exists. Pass --overwrite to replace it, or choose another --out.")
    run_dir = Path(config.train.run_dir) if config.train.run_dir else output.parent / f"{output.stem}-run"
    # A folder the file or the checkpoints cannot be written to is found now, not after the last step.
    try:
        check_writable(output, "--out")
        check_writable(run_dir / "run.json", "--run-dir" if config.train.run_dir else "--out")
    except DreamLoraError as exc:
        raise ConfigError(str(exc)) from None
    if output.parent and not output.parent.exists():
        with disk_errors(output.parent):
            output.parent.mkdir(parents=True, exist_ok=True)
    return output, run_dir


def run_started(run_dir: Path, start_step: int, is_main: bool) -> str:
    """The file's modelspec.date: when the run began, kept across resumes in <run>/run.json.

    SOURCE_DATE_EPOCH (the reproducible-builds convention) overrides it, so two runs with the same
    settings, one of them interrupted and resumed, write byte-identical files.
    """
    record = run_dir / "run.json"
    started = None
    if start_step:
        try:
            started = str(json.loads(record.read_text(encoding="utf-8"))["started"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a run folder from before run.json: date the resumed run now
    if started is None:
        started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        if is_main:
            with disk_errors(record):
                write_text_atomic(record, json.dumps({"started": started}) + "\n")
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).isoformat()
        except (ValueError, OverflowError, OSError):
            raise ConfigError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970 (got {epoch!r})") from None
    return started


@contextlib.contextmanager
def disk_errors(target: Path, then: str = ""):
    """A failed write (no space, no permission, read-only disk) as one clear error naming the file.

    Args:
        target: the file or folder being written, for the message.
        then: what the user does next, appended to the message.
    """
    try:
        yield
    except DreamLoraError as exc:
        if then and isinstance(exc.__cause__, OSError):  # atomic.py's "disk full while writing ..."
            raise TrainingError(f"{exc}{then}") from exc
        raise
    except Exception as exc:
        error = as_os_error(exc, target)  # safetensors reports a full disk as its own SafetensorError
        if error is None:
            raise
        raise TrainingError(write_error(target, error, "Check that the folder is writable, or choose another "
                                                       "--out / --run-dir.") + then) from exc


def prepare_run_dir(config: DreamLoraConfig, run_dir: Path, accelerator) -> int:
    """The step to start from: 0 for a new run, the latest checkpoint's step with --resume.

    With --overwrite the main process deletes the old checkpoints while the others wait for it.
    """
    latest = checkpoints.latest_checkpoint(run_dir)
    if config.train.resume:
        if latest is None:
            raise TrainingError(f"--resume: no checkpoint in '{run_dir}'. Run without --resume to start.")
        if latest.step > config.train.steps:
            raise TrainingError(f"--resume: the run in '{run_dir}' already reached step {latest.step}; "
                                f"raise --steps above it to train further.")
        return latest.step  # equal to --steps: the file was not written (disk full, Ctrl-C); write it now
    if latest is not None:
        if not config.output.overwrite:
            raise TrainingError(f"run folder '{run_dir}' holds checkpoints of an earlier run. "
                                "Pass --resume to continue it or --overwrite to start over.")
        # Every process has read `latest` before the main one deletes: a process that looked after the deletion
        # would skip the barrier below, and the two would wait at different barriers for ever.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with disk_errors(run_dir):
                checkpoints.remove_run_files(run_dir)  # only what runs wrote: a user's notes stay
        accelerator.wait_for_everyone()
    return 0


def check_hardware(config: DreamLoraConfig, device: torch.device) -> None:
    if config.train.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"{describe('train.mixed_precision')}: fp16 needs a CUDA GPU; use bf16 or no on the CPU.")
    if config.train.mixed_precision == "bf16" and device.type == "cpu" and not cpu_runs_bf16_natively():
        raise ConfigError(f"{describe('train.mixed_precision')}: bf16 on this CPU (no AVX512 or AMX) runs tens of "
                          "times slower than fp32; use --mixed-precision no.")


def process_device() -> torch.device:
    """The device Accelerator will use, read before an Accelerator exists: AcceleratorState keeps the first
    run's mixed precision for the whole process. ACCELERATE_USE_CPU is read as AcceleratorState reads it, or
    the process group of a CPU launch would be set up without it and every rank would think it is the main one."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device


def cpu_runs_bf16_natively() -> bool:
    """oneDNN's bf16 kernels need AVX512 (or AMX, or Arm's bf16); without them bf16 falls back to a scalar path.
    Measured on an AVX2-only EPYC (2 cores, torch 2.13): bf16 matmuls 45x and convolutions 180x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # the probe is private: if it goes away, do not refuse bf16
        return True


def class_images(config: DreamLoraConfig, base: BaseModel, resolution: int, accelerator,
                 progress: ProgressCallback, checked: list[Path] | None = None) -> ImageSet:
    """The user's class folder (its `checked` preflight-usable files), or the cached generated set (made if missing)."""
    if config.prior.class_dir:
        return class_set(config.prior.class_dir, config.data, checked)
    p = config.prior
    spec = training_prior_spec(config, ModelIdentity(base.identity, base.fingerprint), resolution,
                               accelerator.device.type)
    folder = cached_prior_dir(spec)
    generate_priors(base, spec, folder, p.num_class_images, batch_size=p.batch_size, accelerator=accelerator,
                    progress=progress)
    images = class_set(folder, config.data)
    images.paths = images.paths[:p.num_class_images]
    images.prompts = images.prompts[:p.num_class_images]
    return images


def training_objective(base: BaseModel, config: DreamLoraConfig):
    """The family's objective with this run's flow-matching settings (DDPM families ignore them); the family
    takes the settings it runs the denoiser with (Flux dev's guidance).

    Raises:
        ConfigError: --snr-gamma on a flow-matching model (its weighting is --flow-weighting).
    """
    from .objectives import FlowSettings

    t = config.train
    settings = FlowSettings(sampling=t.timestep_sampling, logit_mean=t.logit_mean, logit_std=t.logit_std,
                            mode_scale=t.mode_scale, weighting=t.flow_weighting, shift=t.flow_shift,
                            guidance=t.flux_guidance)
    base.family = base.family.for_training(settings)
    objective = base.family.objective(base.scheduler_config, settings)
    if t.snr_gamma is not None and objective.prediction_type == "flow":
        raise ConfigError(f"{describe('train.snr_gamma')} is min-SNR weighting of DDPM models; "
                          f"'{base.identity}' is trained with flow matching: use --flow-weighting instead.")
    return objective


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def vae_dtype(base: BaseModel, mixed_precision: str) -> torch.dtype:
    """The VAE's dtype after caching: the frozen one, unless the VAE overflows in half precision (SDXL's own
    VAE says so with force_upcast; an fp16-fixed VAE does not)."""
    return torch.float32 if base.vae.config.get("force_upcast", False) else frozen_dtype(mixed_precision)


def encode_cached_prompts(base: BaseModel, config: DreamLoraConfig, prompts: list[str], device: torch.device) -> None:
    """SD3/Flux: T5 encodes every prompt the run knows of (the family caches its states), on the accelerator unless
    --t5-on-cpu, and then leaves it: T5-XXL (9 GB in bf16) and the transformer need not fit together. Prompts met
    later (--eval-every's) are encoded where T5 is. Shuffled tags make new prompts every step: T5 stays then."""
    index = base.family.cached_text_encoder
    if index is not None:  # frozen, in the run's dtype, before it encodes (place_frozen does the rest after)
        base.text_encoders[index].requires_grad_(False).to(dtype=frozen_dtype(config.train.mixed_precision))
    cache_t5_states(base, prompts, torch.device("cpu") if config.train.t5_on_cpu else device,
                    stay=config.data.shuffle_tags)


def stays_on_cpu(base: BaseModel, module: torch.nn.Module) -> bool:
    """Whether a frozen module lives on the CPU once prompts are cached: SD3's/Flux's T5 when it was moved there."""
    index = base.family.cached_text_encoder
    return index is not None and module is base.text_encoders[index] and module.device.type == "cpu"


def place_frozen(base: BaseModel, device: torch.device, dtype: torch.dtype, quantization: str = "none") -> None:
    """Freeze the base model and move it to the device: UNet and text encoders in the frozen dtype, the denoiser's
    linear layers quantized on the way when asked (--base-quantization). A T5 whose prompts are cached stays where
    `encode_cached_prompts` left it.

    The VAE stays fp32 while it encodes the cache (fp16 VAEs can overflow); BatchSource casts it after.
    """
    if quantization != "none":
        quantize_denoiser(base.unet, quantization, device, dtype)
    for module in (base.unet, base.vae, *base.text_encoders):
        module.requires_grad_(False)
        wanted = dtype if module is not base.vae else torch.float32
        if not stays_on_cpu(base, module):
            module.to(device=device)
        if module.dtype != wanted:  # diffusers warns about every dtype cast of a model with fp32-kept modules
            module.to(dtype=wanted)


def fit_memory_budget(config: DreamLoraConfig, progress: ProgressCallback) -> DreamLoraConfig:
    """With --memory-budget: the config with the memory savers the plan picked (dreamlora.memory)."""
    if config.train.memory_budget is None:
        return config
    config, changes, estimate = apply_memory_budget(config)
    note(progress, f"memory budget {config.train.memory_budget:g} GiB: "
                   f"{'; '.join(changes) if changes else 'the settings fit as given'} "
                   f"(estimated peak {estimate.peak / GIB:.2f} GiB)")
    return config


def channels_last_helps(device: torch.device, mixed_precision: str) -> bool:
    """NHWC convolutions run on CUDA tensor cores in fp16/bf16 without layout transposes; on the CPU
    they measured slower (benchmark "small" model, bf16, 2 cores: 3.14 s a step against 2.88 s)."""
    return device.type == "cuda" and mixed_precision != "no"


def use_channels_last(base: BaseModel, device: torch.device, config: DreamLoraConfig) -> None:
    """Store the UNet's convolution weights channels-last where that is faster; its outputs follow."""
    if channels_last_helps(device, config.train.mixed_precision):
        base.unet.to(memory_format=torch.channels_last)


def offload_encoders(base: BaseModel, config: DreamLoraConfig, device: torch.device) -> None:
    """After caching, the VAE and the frozen text encoders leave the accelerator until a validation grid (T5 too when
    the CLIPs train: its states are cached in the family, and it is 9 GB in bf16)."""
    if device.type == "cpu":
        return
    # Frozen text encoders stay where shuffled tags are encoded every step; trained ones stay anyway.
    kept = base.text_encoders if config.data.shuffle_tags else \
        adapted_encoders(base) if config.lora.train_text_encoder else []
    for module in (base.vae, *[te for te in base.text_encoders if not any(te is t for t in kept)]):
        module.to("cpu")


@contextlib.contextmanager
def encoders_on(base: BaseModel, device: torch.device):
    """Bring the offloaded VAE and text encoders back for sampling, and send them away again after."""
    moved = [m for m in (base.vae, *base.text_encoders) if m.device != device and not stays_on_cpu(base, m)]
    for module in moved:
        module.to(device)
    try:
        yield
    finally:
        for module in moved:
            module.to("cpu")


def add_adapters(base: BaseModel, config: DreamLoraConfig, device: torch.device) -> None:
    """LoRA adapters through peft, trained in fp32 whatever the frozen dtype.

    peft draws the initial A matrices from the global RNG: seeded from --seed here, so the run is a
    function of its settings and not of what the process did before (the caller's RNG is left as it was).
    """
    lora = config.lora
    if config.output.format == "kohya" and not base.family.kohya_files:
        raise ConfigError(f"{describe('output.format')}: {base.family.name} LoRA files are written in diffusers "
                          "naming only (what its pipeline's load_lora_weights and ComfyUI read); pass --format diffusers.")
    for module in base.text_encoders:
        module.requires_grad_(False)  # T5 stays frozen; add_lora_adapters freezes the ones it is given
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(config.train.seed, "lora-init"))
        add_lora_adapters(base.unet, adapted_encoders(base), rank=lora.rank, alpha=lora.resolved_alpha,
                          dropout=lora.dropout, unet_targets=denoiser_targets(base, config),
                          train_text_encoder=lora.train_text_encoder, text_targets=lora.text_target_modules,
                          dora=lora.dora)
    if lora.train_token_embedding:  # pivotal tuning: the token's own vectors, from its base rows or --token-init
        for tokenizer, encoder in zip(base.tokenizers, adapted_encoders(base)):
            ids = token_ids(tokenizer, config.data.token)
            attach_learned_token(encoder, ids, initial_vectors(encoder, tokenizer, len(ids), lora.token_init),
                                 trainable=True)
    for module in (base.unet, *base.text_encoders):
        for param in trainable_parameters(module):
            param.data = param.data.to(device=device, dtype=torch.float32)
    base.unet.train()
    if config.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if lora.train_text_encoder:
        for te in adapted_encoders(base):
            te.train()
            if config.train.gradient_checkpointing:
                te.gradient_checkpointing_enable()


def adapted_encoders(base: BaseModel) -> list:
    """The text encoders --train-text-encoder gives adapters: all, or the family's first few (never T5)."""
    count = base.family.adapted_text_encoders
    return base.text_encoders if count is None else base.text_encoders[:count]


def denoiser_targets(base: BaseModel, config: DreamLoraConfig) -> list[str]:
    """--lora-targets, or the family's own targets when it is left at the (UNet) default: a transformer's
    attention has a second stream (add_q_proj, ..., to_add_out) that the UNet names do not reach."""
    from .config import LoraConfig

    if config.lora.target_modules == LoraConfig().target_modules:
        return list(base.family.default_targets)
    return list(config.lora.target_modules)


def make_optimizer(base: BaseModel, config: DreamLoraConfig):
    """AdamW (or bitsandbytes' 8-bit AdamW) over the adapter parameters, and the LR schedule."""
    from diffusers.optimization import get_scheduler

    t, lora = config.train, config.lora
    groups = [{"params": trainable_parameters(base.unet), "lr": t.learning_rate}]
    token_vectors = learned_token_parameters(base.text_encoders)
    if lora.train_text_encoder:
        text_params = [p for te in base.text_encoders for p in trainable_parameters(te)
                       if not any(p is v for v in token_vectors)]
        groups.append({"params": text_params, "lr": lora.text_encoder_lr or t.learning_rate})
    if token_vectors:  # no weight decay: it would pull the vectors towards zero, not towards the base rows
        groups.append({"params": token_vectors, "lr": lora.token_embedding_lr, "weight_decay": 0.0})
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        except (ImportError, RuntimeError) as exc:
            raise TrainingError(f"--optimizer adamw8bit needs a working bitsandbytes ({exc}). "
                                "Install bitsandbytes for your platform or use --optimizer adamw.") from exc
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.steps)
    return optimizer, lr_scheduler


# ----------------------------------------------------------------------------------------------
# Batches from the caches


@dataclass
class Batch:
    latents: torch.Tensor  # (B_inst + B_class, C, h, w): instance rows first
    noise: torch.Tensor
    timesteps: torch.Tensor  # (rows,)
    embeddings: PromptEmbeddings
    num_instance: int
    conditions: dict[str, torch.Tensor]  # per-row conditions from the images (SDXL: time_ids), {} for SD


class BatchSource:
    """Cached latents and prompt embeddings, and the per-step draws derived from (seed, step)."""

    def __init__(self, base: BaseModel, config: DreamLoraConfig, instances: ImageSet, classes: ImageSet | None,
                 resolution: int, accelerator, progress: ProgressCallback):
        self.base, self.config, self.accelerator, self.resolution = base, config, accelerator, resolution
        data = config.data
        factor = base.vae_scale_factor
        size = resolution // factor
        self.groups: tuple[tuple[int, ...], ...] | None = None  # aspect buckets: the images of each
        self.buckets: list[tuple[int, int]] = []  # (width, height) of each instance image's bucket
        progress(ProgressEvent("cache", 0, 1, message="encoding images and prompts once"))
        self.instance = self._encode(instances, resolution, data.crop, size)
        self.classes = self._encode(classes, resolution, "center", size) if classes else None
        self.prompts = instances.prompts + (classes.prompts if classes else [])
        self.train_text = config.lora.train_text_encoder
        # Dropped captions are the empty prompt; shuffled tag orders are encoded when drawn (_frozen_embedding).
        unique = sorted(set(self.prompts) | ({""} if data.caption_dropout else set()))
        with torch.no_grad():
            # With trained encoders this still runs once: it fills what the family caches of its frozen encoders
            # (SD3's and Flux's T5 states), so T5 can leave the accelerator (offload_encoders).
            embedded = base.family.encode_prompts(base.tokenizers, base.text_encoders, unique)
        if not self.train_text:
            self.cached = {p: embedded.index([i]) for i, p in enumerate(unique)}
        if base.vae.dtype != vae_dtype(base, config.train.mixed_precision):
            base.vae.to(dtype=vae_dtype(base, config.train.mixed_precision))
        progress(ProgressEvent("cache", 1, 1))

    def _encode(self, images: ImageSet, resolution: int, crop: str, size: int) -> LatentCache:
        factor = self.base.vae_scale_factor
        loaded = [images.open(i) for i in range(len(images.paths))]
        data = self.config.data
        if data.buckets:  # each image at its aspect bucket's size, whole: no crop is cut from the latents
            self.buckets = [assign_bucket(image.size, bucket_sizes(resolution, data.bucket_step), data.bucket_step,
                                          data.bucket_max_upscale) for image in loaded]
            self.groups = tuple(tuple(members) for members in group_by_bucket(self.buckets).values())
            pixels, origins = map(list, zip(*(resize_to_bucket(image, bucket)
                                              for image, bucket in zip(loaded, self.buckets))))
            size = None
        else:
            pixels = [resize_for_training(image, resolution, crop, factor) for image in loaded]
            origins = [crop_origin(image.size, resolution, crop, factor) for image in loaded]
        # One image a VAE call: the fp32 VAE at 512 px needs ~0.6 GiB of activations an image (dreamlora.memory).
        cache = encode_latents(self.base.vae, pixels, size=size, with_flips=self.config.data.random_flip,
                               batch_size=CACHE_BATCH)
        for path, mean in zip(images.paths, cache.means):
            if not bool(torch.isfinite(mean).all()):
                raise NumericalError(f"the VAE turned '{path.name}' into non-finite latents (NaN or inf): a VAE that "
                                     "overflows in half precision? Use an fp32 VAE or pass --vae with an "
                                     "fp16-fixed one.")
        cache.original_sizes = [(image.height, image.width) for image in loaded]
        cache.origins = origins
        cache.factor = factor
        return cache

    def _frozen_embedding(self, prompt: str) -> PromptEmbeddings:
        """A prompt's embedding from the frozen text encoders: cached, or (a shuffled tag order) encoded now."""
        if prompt not in self.cached:
            with torch.no_grad():
                return self.base.family.encode_prompts(self.base.tokenizers, self.base.text_encoders, [prompt])
        return self.cached[prompt]

    def draw(self, step: int, micro: int, text_encoders) -> Batch:
        t, data = self.config.train, self.config.data
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        first = ((step * t.gradient_accumulation_steps + micro) * world + rank) * t.batch_size
        generator = torch.Generator().manual_seed(derive_seed(t.seed, "step", step, micro, rank))
        if self.groups is not None:  # a batch of one aspect bucket; its size is the training target
            inst_idx = list(batch_at(self.groups, t.batch_size, derive_seed(t.seed, "instance"), first // t.batch_size))
            width, height = self.buckets[inst_idx[0]]
        else:
            inst_idx = pick_indices(len(self.instance), derive_seed(t.seed, "instance"), first, t.batch_size)
            width = height = self.resolution
        latents, crops = draw_latents_and_crops(self.instance, inst_idx, generator, random_crop=data.crop == "random",
                                                random_flip=data.random_flip)
        rows, sizes = [latents], [self.instance.original_sizes[i] for i in inst_idx]
        # Caption dropout and tag shuffling: drawn per row from (seed, step, micro, rank, row): a resume redraws them.
        prompts = [step_caption(self.prompts[i], derive_seed(t.seed, "caption", step, micro, rank, row),
                                dropout=data.caption_dropout, shuffle=data.shuffle_tags, keep=data.keep_tags)
                   for row, i in enumerate(inst_idx)]
        if self.classes is not None:
            class_idx = pick_indices(len(self.classes), derive_seed(t.seed, "class"), first, t.batch_size)
            class_latents, class_crops = draw_latents_and_crops(self.classes, class_idx, generator, random_crop=False,
                                                                random_flip=data.random_flip)
            rows.append(class_latents)
            crops, sizes = crops + class_crops, sizes + [self.classes.original_sizes[i] for i in class_idx]
            prompts += [self.prompts[len(self.instance) + i] for i in class_idx]
        x0 = torch.cat(rows)
        noise = offset_noise(torch.randn(x0.shape, generator=generator), t.noise_offset, generator)
        timesteps = self.base.objective.sample_timesteps(x0.shape[0], generator, tuple(x0.shape[-2:]))
        device, dtype = self.accelerator.device, frozen_dtype(self.config.train.mixed_precision)
        if self.train_text:
            shifts = draw_shifts(len(prompts), self.config.lora.position_jitter,
                                 derive_seed(t.seed, "positions", step, micro, rank))
            with jittered_positions(text_encoders, shifts):
                embeddings = self.base.family.encode_prompts(self.base.tokenizers, text_encoders, prompts)
        else:
            embeddings = PromptEmbeddings.cat([self._frozen_embedding(p) for p in prompts])
        geometry = ImageGeometry(sizes, crops, (height, width))
        conditions = {k: to_device(v, device, dtype) for k, v in self.base.family.image_conditions(geometry).items()}
        return Batch(to_device(x0, device, dtype), to_device(noise, device, dtype), to_device(timesteps, device),
                     embeddings.to(device, dtype), len(inst_idx), conditions)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host-to-GPU copy that does not make the host wait for the GPU's queue (pinned, non-blocking)."""
    tensor = tensor.to(dtype) if dtype is not None else tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ----------------------------------------------------------------------------------------------
# Checkpoints, numerics, validation and the output file


def save_step(run_dir: Path, step: int, base: BaseModel, optimizer, lr_scheduler, config: DreamLoraConfig,
              record: dict, accelerator) -> None:
    state = adapter_state_dict(base.unet, base.text_encoders)
    if not bool(torch.stack([torch.isfinite(v).all() for v in state.values()]).all()):
        raise non_finite("the LoRA weights", step, run_dir, config)  # the last good checkpoint stays the latest
    if accelerator.is_main_process:
        with disk_errors(checkpoints.checkpoint_dir(run_dir)):
            checkpoints.save_checkpoint(run_dir, step, state, optimizer, lr_scheduler, to_portable_json(config),
                                        config.train.keep_checkpoints, run=record, scaler=accelerator.scaler)
    accelerator.wait_for_everyone()


def run_record(base: BaseModel, config: DreamLoraConfig, instances: ImageSet, classes: ImageSet | None,
               processes: int) -> dict:
    """What a checkpoint must match to be continued: the weights and images it was trained on, the number of
    processes (it decides which images each step draws) and the learning-rate schedule's length."""
    t = config.train
    return {"model": base.fingerprint, "instances": instances.fingerprint(),
            "classes": classes.fingerprint() if classes else None,
            "processes": processes, "schedule": {"name": t.lr_scheduler, "steps": t.steps}}


def resumed_threads(run_dir: Path, start_step: int) -> int | None:
    """The CPU thread count a resumed run's checkpoint recorded (None for a new run or an older checkpoint)."""
    if not start_step:
        return None
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    return ((checkpoints.read_state(checkpoint).get("run") or {}).get("threads")) if checkpoint else None


# Schedules whose learning rate at a step does not depend on the run's length: --steps may grow on resume.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def resume_problems(stored: dict | None, current: dict) -> list[str]:
    """Why a checkpoint's run cannot be continued by this one ([] when it can; also for checkpoints made
    before runs were recorded, which carry no record)."""
    if not stored:
        return []
    problems = []
    if stored.get("model") != current["model"]:
        problems.append(f"the base model's weights differ ({describe('model.name')})")
    if stored.get("instances") != current["instances"]:
        problems.append(f"the instance photos or their captions differ ({describe('data.instance_dir')})")
    if stored.get("classes") != current["classes"]:
        problems.append(f"the class images differ ({describe('prior.class_dir')} or the class-image settings)")
    if stored.get("processes") != current["processes"]:
        problems.append(f"it ran on {stored.get('processes')} process(es), this run on {current['processes']} "
                        "(the process count decides which images each step draws)")
    before, now = stored.get("schedule") or {}, current["schedule"]
    if before.get("steps") != now["steps"] and now["name"] not in LENGTH_FREE_SCHEDULES:
        problems.append(f"{describe('train.steps')} changed from {before.get('steps')} to {now['steps']}, which "
                        f"reshapes the {now['name']} learning-rate schedule")
    return problems


def restore(run_dir: Path, step: int, base: BaseModel, optimizer, lr_scheduler, config: DreamLoraConfig,
            record: dict, accelerator, progress: ProgressCallback) -> None:
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    problems = resume_problems(checkpoints.read_state(checkpoint).get("run"), record)
    if problems:
        raise TrainingError(f"--resume: the run in '{run_dir}' cannot be continued: {'; '.join(problems)}. "
                            "Resume with what it was trained on, or start over with --overwrite.")
    adapter, state = checkpoints.load_checkpoint(checkpoint, optimizer, lr_scheduler, accelerator.scaler)
    changed = changed_settings(state["config"], json.loads(to_portable_json(config)))
    if changed:
        raise TrainingError(f"--resume: the run in '{run_dir}' was made with other settings ({', '.join(changed)}). "
                            "Resume with the same settings, or start over with --overwrite.")
    load_adapter_state_dict(base.unet, base.text_encoders, adapter)
    note(progress, f"resuming from step {step} ({checkpoint.path.name})")


def changed_settings(stored: dict, current: dict) -> list[str]:
    changed = []
    for section, values in current.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted not in RESUMABLE_CHANGES and stored.get(section, {}).get(key) != value:
                changed.append(f"{dotted}: {stored.get(section, {}).get(key)!r} -> {value!r}")
    return changed


def mean_over_processes(losses: torch.Tensor, step: int, run_dir: Path, config: DreamLoraConfig,
                        accelerator) -> list[float]:
    """The (total, instance, prior) losses averaged over the processes; every process stops on a NaN in any.

    A collective: every process calls it at the same steps, so one process's NaN stops them all with the
    same message instead of leaving the others waiting in their next all-reduce.
    """
    everywhere = accelerator.gather(losses.detach().float()[None])  # (processes, 3)
    finite = torch.isfinite(everywhere).all(dim=1)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        where = f" on process {', '.join(map(str, bad))}" if accelerator.num_processes > 1 else ""
        raise non_finite(f"the loss{where}", step, run_dir, config)
    return everywhere.mean(0).tolist()


def non_finite(what: str, step: int, run_dir: Path, config: DreamLoraConfig) -> TrainingError:
    """The error for NaN/inf: the likely causes among the settings this run had, and which checkpoint is still good."""
    latest = checkpoints.latest_checkpoint(run_dir)
    # --resume replays a run exactly, so it refuses changed settings: the fix means starting over.
    kept = (f"The last good checkpoint is '{latest.path}' (step {latest.step}); a changed setting starts the run over "
            "with --overwrite" if latest else "No checkpoint was written yet")
    return TrainingError(f"{what} became non-finite (NaN or inf) by step {step}; likely cause: {likely_causes(config)}. "
                         f"{kept}.")


# A LoRA's output is scaled by alpha / rank; sd-scripts and diffusers use at most about 1 (alpha = rank) to 2.
MAX_USUAL_LORA_SCALE = 4.0
# Above this a rate is unusual for LoRA on SD (1e-4 is the default, 1e-3 builtin:toy's).
MAX_USUAL_LR = 2e-3


def likely_causes(config: DreamLoraConfig) -> str:
    """What in this run's settings most likely made the loss or weights non-finite, most likely first, each with
    the setting's value and the change to make."""
    t, lora = config.train, config.lora
    causes = []
    if t.mixed_precision == "fp16":
        causes.append("the fp16 UNet or VAE overflowed (--mixed-precision fp16): use bf16 or no")
    scale = lora.resolved_alpha / lora.rank
    if scale > MAX_USUAL_LORA_SCALE:
        causes.append(f"--alpha {lora.resolved_alpha:g} at --rank {lora.rank} multiplies the adapters' output by "
                      f"{scale:g}: lower --alpha (the default, the rank, gives 1)")
    rates = [("--lr", t.learning_rate)] + ([("--text-encoder-lr", lora.text_encoder_lr)]
                                           if lora.train_text_encoder and lora.text_encoder_lr else [])
    high = [f"{flag} {value:g}" for flag, value in rates if value > MAX_USUAL_LR]
    if high:
        causes.append(f"a high learning rate ({', '.join(high)}): lower it")
    if t.max_grad_norm == 0:
        causes.append("gradient clipping is off (--max-grad-norm 0): set --max-grad-norm 1")
    if not causes:
        causes.append(f"the learning rate (--lr {t.learning_rate:g}): lower it")
    return "; or ".join(causes)


def validate(base: BaseModel, config: DreamLoraConfig, resolution: int, run_dir: Path, step: int, accelerator,
             progress: ProgressCallback, prompts: list[str]) -> Path | None:
    """A small base-vs-LoRA grid in the run folder, written by the main process.

    Every process renders it (the same pictures): the others would otherwise wait for the main one inside
    the next collective, which times out on a slow grid.
    """
    v = config.validation
    path = run_dir / "validation" / f"step-{step:06d}.png"
    progress(ProgressEvent("validate", 0, 1, message=f"validation grid at step {step}"))
    with encoders_on(base, accelerator.device):
        render_validation_grid(base, prompts, v.seeds, path, steps=v.steps, guidance=v.guidance, sampler=v.sampler,
                               resolution=resolution, title=f"step {step}", write=accelerator.is_main_process)
    log_grid(accelerator, path, step)
    progress(ProgressEvent("validate", 1, 1, message=f"validation grid: {path}"))
    return path if accelerator.is_main_process else None


def save_output(output: Path, base: BaseModel, config: DreamLoraConfig, resolution: int, started: str,
                grid: Path | None = None) -> None:
    """Write the LoRA file (after the compatibility check), with the final validation grid as its thumbnail."""
    from .interop.check import CompatibilityError
    from .interop.thumbnail import thumbnail_data_url

    config_json = to_portable_json(config)
    metadata = lora_metadata(family=base.family, rank=config.lora.rank, alpha=config.lora.resolved_alpha,
                             resolution=resolution, output_name=output.stem,
                             trigger_phrase=trigger_phrase(config.data), title=output.stem,
                             config_json=config_json, train_text_encoder=config.lora.train_text_encoder,
                             date=started, thumbnail=thumbnail_data_url(grid) if grid else None)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.output.save_dtype]
    try:
        save_lora_file(output, base.unet, base.text_encoders, base.family, format=config.output.format,
                       alpha=config.lora.resolved_alpha, dtype=dtype, metadata=metadata, token=config.data.token)
    except CompatibilityError as exc:
        raise CompatibilityError(f"{exc}. '{output}' was not written; the trained weights are kept in the run folder: "
                                 "run the same command with --resume and another --format to write them") from None
    sort_safetensors_header(output)


def trigger_phrase(data) -> str:
    """What a prompt names to call the LoRA up: 'sks dog' for a subject, the caption prefix (if any) for a fine-tune."""
    if data.job == "dreambooth":
        return f"{data.token} {data.class_word}"
    return data.caption_prefix.strip().rstrip(",").strip()


def sort_safetensors_header(path: Path) -> None:
    """Rewrite the file's JSON header with sorted keys, atomically, if it is not sorted already.

    safetensors writes its metadata in hash-map order, which changes from process to process; sorted,
    equal runs give byte-equal files. Readers find tensors by their stored offsets, so order is free.
    """
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    canonical = len(text).to_bytes(8, "little") + text + data[8 + length:]
    if canonical != data:
        write_bytes_atomic(path, canonical)
