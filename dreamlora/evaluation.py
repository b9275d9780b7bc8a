"""Measure a LoRA the way the DreamBooth paper does, beside its base model.

`evaluate(lora_path)` renders, with the LoRA (scale 1) and with the adapter off (the base model),
the same prompts from the same seeds:

- subject prompts, "a photo of {token} {class} on a {bg} background" for a few backgrounds;
- class prompts, "a photo of a {class}".

On `builtin:toy` a small classifier trained on the toy world (toyworld/oracle.py) reads the renders:

| metric | what it measures | paper's counterpart |
|---|---|---|
| subject_detected | subject renders in which the oracle finds the subject's polka dots | subject fidelity |
| subject_similarity | mean cosine of oracle embeddings, subject renders x instance photos | DINO |
| background_match | subject renders whose background is the one asked for | prompt fidelity (CLIP-T) |
| class_shows_subject | class renders in which the subject appears | PRES (prior preservation) |
| class_shift | 1 - mean cosine, class renders with vs without the LoRA, same seed | DIV's counterpart: drift of the class |

For any base model, local DINO (`dino`) and CLIP (`clip`) folders add the paper's own metrics:
DINO and CLIP-I (mean cosine, subject renders x instance photos) and CLIP-T (mean cosine, subject
render x its prompt without the token, which CLIP does not know). Models load from local folders
only and never run remote code.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .config import EvalSettings, fill_prompt, settings_from
from .errors import ConfigError, DreamLoraError, ModelLoadError
from .progress import ProgressCallback, ProgressEvent, ignore_progress

if TYPE_CHECKING:
    from .toyworld.oracle import Oracle

SUBJECT_PROMPT = "a photo of {token} {class} on {bg_article} {bg} background"
CLASS_PROMPT = "a photo of {class_article} {class}"
ORACLE_MODELS = ("builtin:toy",)  # base models the shipped oracle was trained to read
ADAPTER_NAME = "dreamlora_eval"


@dataclass
class Scores:
    """One model's scores; None where a metric was not computed (no oracle, no DINO/CLIP folder)."""

    subject_detected: float | None = None  # fraction of subject renders showing the subject
    subject_similarity: float | None = None  # mean oracle-embedding cosine, subject renders x instance photos
    background_match: float | None = None  # fraction of subject renders on the asked background
    class_shows_subject: float | None = None  # fraction of class renders showing the subject
    class_shift: float | None = None  # 1 - mean oracle cosine to the base model's class render of the same seed
    dino: float | None = None  # mean DINO CLS cosine, subject renders x instance photos
    clip_i: float | None = None  # mean CLIP image cosine, subject renders x instance photos
    clip_t: float | None = None  # mean CLIP cosine, subject render x its prompt (token removed)


@dataclass
class EvalReport:
    """Scores of the LoRA and of its base model, and how they were measured."""

    lora: Scores
    base: Scores
    lora_file: str
    model: str
    token: str
    class_word: str
    prompts: list[str]  # subject prompts, then class prompts
    subject_prompts: list[str]
    class_prompts: list[str]
    seeds: list[int]
    backgrounds: list[str]
    steps: int
    guidance: float
    sampler: str
    resolution: int
    instance_dir: str | None  # the instance photos compared with (None: not found)
    instance_images: int
    oracle: str | None  # which oracle read the renders (None: no oracle for this base model)
    dino_model: str | None
    clip_model: str | None
    grid: str | None  # the PNG of the renders, when asked for
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready data: {"lora": {...}, "base": {...}, "prompts": [...], "seeds": [...], ...}."""
        return asdict(self)


def evaluate(
    lora_path: str | Path,
    settings: EvalSettings | None = None,
    *,
    model: str | None = None,
    single_file_config: str | None = None,
    progress: ProgressCallback = ignore_progress,
    **overrides,
) -> EvalReport:
    """Render subject and class prompts with and without the LoRA and score both sets.

    Args:
        lora_path: A LoRA .safetensors file (dreamlora's, or any kohya/diffusers file).
        settings: Seeds, backgrounds, sampling and scorers (dreamlora.config.EvalSettings; its defaults when None).
        model: The base model (--model); None: the one the file was trained on.
        single_file_config: For a single-file base model: the folder or hub id with its configs.
        progress: Receives ("eval", renders done, renders in all) events.
        **overrides: Fields of EvalSettings to change, e.g. `seeds=[0, 1], steps=10`. The instance photos
            (`instance_dir`) default to the folder named in the file's config if it exists (as given, then
            under ./sample_instances/); the toy oracle (`oracle`) reads renders of the models it knows.

    Returns:
        The report; the base model's class_shift is 0 by definition.

    Raises:
        ConfigError: bad settings or a missing --instance-dir/--dino/--clip folder.
        ModelLoadError: the LoRA file, the base model, or a DINO/CLIP/oracle folder cannot be loaded.
    """
    from .lora import read_lora_file
    from .models import load_base_model
    from .atomic import check_writable
    from .sampling import attach_lora, model_for_lora

    started = time.time()
    try:
        settings = replace(settings or EvalSettings(), **overrides)
    except TypeError as exc:  # an override that is not a field of EvalSettings: a caller's bug
        raise ConfigError(f"evaluate(): {exc}") from None
    settings = settings_from(EvalSettings, {}, base=settings)  # validates and checks every value
    seeds, backgrounds = [int(s) for s in settings.seeds], [str(b).strip() for b in settings.backgrounds]
    steps, guidance, sampler, grid = settings.steps, settings.guidance, settings.sampler, settings.grid
    oracle, dino, clip, instance_dir = settings.oracle, settings.dino, settings.clip, settings.instance_dir
    if grid is not None:
        try:
            check_writable(grid, "--grid")  # refused now, not after every render
        except DreamLoraError as exc:
            raise ConfigError(str(exc)) from None
    lora = read_lora_file(lora_path)  # ModelLoadError when it is not a LoRA, is malformed or holds NaN
    metadata, info = lora.metadata, lora.config or {}
    data = info.get("data", {})
    token, class_word = data.get("token") or "sks", data.get("class_word") or ""
    if not class_word:
        raise ConfigError(f"'{Path(lora_path).name}' does not record its class word (not a dreamlora file?); "
                          "evaluation needs it for its prompts.")
    instances, instance_folder, notes = _instance_images(instance_dir, data.get("instance_dir"))
    dino_scorer = DinoScorer(dino) if dino is not None else None
    clip_scorer = ClipScorer(clip) if clip is not None else None

    model = model or model_for_lora(info, lora_path)
    base = load_base_model(model, single_file_config=single_file_config)
    use_oracle = base.identity in ORACLE_MODELS if oracle is None else oracle
    reader = _load_toy_oracle(backgrounds) if use_oracle else None
    if reader is None:
        notes.append(f"no oracle reads '{base.identity}' renders: oracle metrics are null "
                     "(pass --dino/--clip folders for model-independent ones)")
    pipe = base.pipeline(sampler)
    notes += attach_lora(pipe, base, lora_path, metadata, ADAPTER_NAME)

    subject_prompts = [subject_prompt(token, class_word, bg) for bg in backgrounds]
    class_prompts = [fill_prompt(CLASS_PROMPT.replace("{class_article}", _article(class_word)), token, class_word)]
    resolution = base.default_resolution
    renders = _render_all(pipe, subject_prompts + class_prompts, seeds, steps=steps, guidance=guidance,
                          resolution=resolution, progress=progress)

    if grid is not None:
        _save_grid(renders, subject_prompts + class_prompts, seeds, Path(grid), f"{Path(lora_path).name} on {base.identity}")

    n_subject = len(subject_prompts) * len(seeds)
    scores = {}
    for tag in ("lora", "base"):
        images = renders[tag]
        subject_images, class_images = images[:n_subject], images[n_subject:]
        asked = [bg for bg in backgrounds for _ in seeds]
        score = Scores()
        if reader is not None:
            # class_shift compares with the base model's class renders; the base itself is 0 by definition.
            base_class_images = renders["base"][n_subject:] if tag == "lora" else None
            score = _oracle_scores(reader, subject_images, class_images, asked, instances, base_class_images)
        if dino_scorer is not None and instances:
            score.dino = _mean_cosine(dino_scorer.embed(subject_images), dino_scorer.embed(instances))
        if clip_scorer is not None:
            rendered = clip_scorer.embed_images(subject_images)  # (N, D), prompt-major like `asked`
            if instances:
                score.clip_i = _mean_cosine(rendered, clip_scorer.embed_images(instances))
            texts = [strip_token(p, token) for p in subject_prompts for _ in seeds]
            score.clip_t = float((rendered * clip_scorer.embed_texts(texts)).sum(1).mean())
        scores[tag] = score
    if (dino_scorer or clip_scorer) and not instances:
        notes.append("no instance photos: DINO and CLIP-I are null (pass --instance-dir)")

    return EvalReport(
        lora=scores["lora"], base=scores["base"], lora_file=Path(lora_path).name, model=base.identity, token=token,
        class_word=class_word, prompts=subject_prompts + class_prompts, subject_prompts=subject_prompts,
        class_prompts=class_prompts, seeds=seeds, backgrounds=backgrounds, steps=steps, guidance=guidance,
        sampler=sampler, resolution=resolution, instance_dir=str(instance_folder) if instance_folder else None,
        instance_images=len(instances), oracle="toy oracle (dreamlora/builtin_models/toy_oracle)" if reader else None,
        dino_model=Path(dino).name if dino is not None else None, clip_model=Path(clip).name if clip is not None else None,
        grid=str(grid) if grid is not None else None, seconds=round(time.time() - started, 1), notes=notes,
    )


def subject_prompt(token: str, class_word: str, background: str) -> str:
    """'a photo of sks ball on an orange background'."""
    # Filled in one pass: a background (a flag value) is text, never a template, whatever braces it holds.
    values = {"{token}": token, "{class}": class_word, "{bg_article}": _article(background), "{bg}": background}
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], SUBJECT_PROMPT)


def strip_token(prompt: str, token: str) -> str:
    """The prompt without the identifier token, for CLIP-T: 'a photo of sks ball' -> 'a photo of ball'."""
    return " ".join(word for word in prompt.split() if word != token)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _instance_images(given: str | Path | None, recorded: str | None) -> tuple[list[Image.Image], Path | None, list[str]]:
    """The instance photos: --instance-dir, else the recorded folder as given, else ./sample_instances/<name>."""
    from .data import list_image_files, load_rgb

    if given is not None:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--instance-dir '{given}' does not exist or is not a folder. Check the path.")
    else:
        candidates = [Path(recorded), Path("sample_instances") / Path(recorded).name] if recorded else []
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            what = f"'{recorded}'" if recorded else "not recorded in the file"
            return [], None, [f"instance folder {what} not found: similarity metrics are null (pass --instance-dir)"]
    paths, _ = list_image_files(folder, "instance")
    return [load_rgb(p) for p in paths], folder, []


def _load_toy_oracle(backgrounds: list[str]) -> Oracle:
    from .toyworld.oracle import load_oracle

    reader = load_oracle()
    unknown = [b for b in backgrounds if b not in reader.config.backgrounds]
    if unknown:
        raise ConfigError(f"--backgrounds {unknown} are not backgrounds the toy oracle knows; "
                          f"use some of: {', '.join(reader.config.backgrounds)}")
    return reader


def _render_all(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, resolution: int,
                progress: ProgressCallback) -> dict[str, list[Image.Image]]:
    """{"lora": images, "base": images}, each prompt-major (all seeds of prompt 0, then prompt 1, ...)."""
    from .sampling import render_images

    total, done = 2 * len(prompts) * len(seeds), 0
    renders: dict[str, list[Image.Image]] = {"lora": [], "base": []}
    for tag in ("base", "lora"):
        if tag == "base":
            pipe.disable_lora()  # the adapter is skipped entirely: exactly the base model
        else:
            pipe.enable_lora()
            pipe.set_adapters([ADAPTER_NAME], adapter_weights=[1.0])
        for prompt in prompts:
            renders[tag] += render_images(pipe, prompt, seeds, steps=steps, guidance=guidance, resolution=resolution)
            done += len(seeds)
            progress(ProgressEvent("eval", done, total))
    return renders


def _save_grid(renders: dict[str, list[Image.Image]], prompts: list[str], seeds: list[int], path: Path,
               title: str) -> None:
    from .grid import make_grid
    from .sampling import save_png

    rows, labels = [], []
    for i, prompt in enumerate(prompts):
        for tag in ("lora", "base"):
            rows.append(renders[tag][i * len(seeds):(i + 1) * len(seeds)])
            labels.append(f"{prompt}\n({'LoRA' if tag == 'lora' else 'base'})")
    save_png(make_grid(rows, labels, [f"seed {s}" for s in seeds], title=title), path)


def _oracle_scores(reader: Oracle, subject_images: list[Image.Image], class_images: list[Image.Image],
                   asked_backgrounds: list[str], instances: list[Image.Image],
                   base_class_images: list[Image.Image] | None) -> Scores:
    """The oracle's scores of one model; `base_class_images` None means this is the base model."""
    subject, classes = reader.read(subject_images), reader.read(class_images)
    similarity = _mean_cosine(subject.embeddings, reader.embed(instances)) if instances else None
    shift = 0.0
    if base_class_images is not None:  # pairwise by seed: row i of both lists is the same prompt and seed
        base_embeddings = reader.embed(base_class_images)
        shift = max(0.0, 1.0 - float((classes.embeddings * base_embeddings).sum(1).mean()))
    return Scores(
        subject_detected=_fraction(subject.subject_detected),
        subject_similarity=similarity,
        background_match=_fraction([got == want for got, want in zip(subject.backgrounds, asked_backgrounds)]),
        class_shows_subject=_fraction(classes.subject_detected),
        class_shift=shift,
    )


def _fraction(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of rows of a (N, D) and b (M, D)."""
    a, b = torch.nn.functional.normalize(a.float(), dim=1), torch.nn.functional.normalize(b.float(), dim=1)
    return float((a @ b.T).mean())


# --- the paper's own metrics, from local transformers folders --------------------------------------


def _local_folder(folder: str | Path, flag: str, what: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"{flag} '{folder}' is not a local transformers model folder (no config.json). "
                          f"Pass a folder holding a {what} saved with save_pretrained.")
    return path


class DinoScorer:
    """CLS embeddings of a local DINO/ViT folder (transformers AutoModel + AutoImageProcessor)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoImageProcessor, AutoModel

        path = _local_folder(folder, "--dino", "DINO/ViT model and its image processor")
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False).eval()
        except Exception as exc:  # any library failure: the folder is unusable
            raise ModelLoadError(f"cannot load --dino '{folder}': {str(exc).splitlines()[0][:240]}") from exc

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised CLS embeddings (the last hidden state's first token, as in the paper)."""
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        hidden = self.model(pixel_values=inputs["pixel_values"]).last_hidden_state  # (N, tokens, D)
        return torch.nn.functional.normalize(hidden[:, 0].float(), dim=1)


class ClipScorer:
    """Image and text embeddings of a local CLIP folder (CLIPModel + CLIPProcessor)."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPProcessor

        path = _local_folder(folder, "--clip", "CLIPModel and its CLIPProcessor")
        try:
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
        except Exception as exc:  # any library failure: the folder is unusable
            raise ModelLoadError(f"cannot load --clip '{folder}': {str(exc).splitlines()[0][:240]}") from exc

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised projected image embeddings."""
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return _normalized_features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised projected text embeddings."""
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return _normalized_features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                                 attention_mask=inputs["attention_mask"]))


def _normalized_features(output) -> torch.Tensor:
    # transformers 4.x returns the projected features; 5.x returns an output whose pooler_output holds them.
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(features.float(), dim=1)


# --- how well the oracle reads the base model itself ----------------------------------------------


def base_model_accuracy(model: str = "builtin:toy", *, n: int = 64, seed: int = 0, steps: int = 20,
                        guidance: float = 7.5, sampler: str = "dpm++2m", batch_size: int = 16,
                        oracle_dir: str | Path | None = None, progress: ProgressCallback = ignore_progress) -> dict:
    """Render `n` full toy-world captions (one seed each) and let the oracle read them back.

    "a photo of a red ball on a blue background" should come out as a red ball on blue: the oracle's
    class, colour and background accuracy on the renders measures the base model and the oracle
    together. The same scenes drawn by world.py measure the oracle alone, so a low score can be
    blamed on the right one.

    Args:
        model: A base model of the toy world (--model).
        n: How many random scenes (world.random_scene, seeded) to caption and render.
        seed: Seeds the scenes; render i uses seed `seed + i`.
        steps, guidance, sampler: Sampling settings.
        batch_size: Captions rendered together.
        oracle_dir: The oracle that reads the renders (a train_oracle.py folder); None: the shipped one.
        progress: Receives ("eval", renders done, n) events.

    Returns:
        {"rendered": {"class", "color", "background", "subject_detected"}, "drawn": {...}, "n", "captions"}.
    """
    import numpy as np

    from .models import load_base_model
    from .sampling import decode_latents, initial_latents, unpacked_latents
    from .toyworld.oracle import load_oracle
    from .toyworld.world import draw_scene, random_scene

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    captions = [f"a photo of {_article(s.color)} {s.color} {s.cls} on {_article(s.background)} {s.background} background"
                for s in scenes]
    base = load_base_model(model)
    pipe = base.pipeline(sampler)
    resolution = base.default_resolution
    renders: list[Image.Image] = []
    for start in range(0, n, batch_size):
        prompts = captions[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(prompts))]
        with torch.no_grad():
            latents = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                           width=resolution, generator=generators,
                           latents=initial_latents(pipe, generators, resolution), output_type="latent").images
            renders += decode_latents(pipe.vae, pipe.image_processor, unpacked_latents(pipe, latents, resolution))
        progress(ProgressEvent("eval", len(renders), n))
    reader = load_oracle(oracle_dir)

    def accuracy(images: list[Image.Image]) -> dict:
        reading = reader.read(images)
        return {
            "class": _fraction([got == s.cls for got, s in zip(reading.classes, scenes)]),
            "color": _fraction([got == s.color for got, s in zip(reading.colors, scenes)]),
            "background": _fraction([got == s.background for got, s in zip(reading.backgrounds, scenes)]),
            "subject_detected": _fraction(reading.subject_detected),
        }

    return {"model": base.identity, "n": n, "rendered": accuracy(renders),
            "drawn": accuracy([draw_scene(s, 64) for s in scenes]), "captions": captions, "images": renders}
