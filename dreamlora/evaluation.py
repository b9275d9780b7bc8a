"""Measure a LoRA the way the DreamBooth paper does, beside its base model.

`evaluate(lora_path)` renders, with the LoRA (at `lora_scale`, 1 by default) and with the adapter off (the base
model), the same prompts from the same seeds, in two prompt sets that keep choices apart from reports:

- `tuning`: "a photo of sks ball on a {blue, gray, pink, orange} background", seeds 0-7. Defaults were
  chosen on it, and a run's best checkpoint (`--eval-every`) is chosen on it;
- `report`: other phrasings ("a sks ball on a ... background", "sks ball on a ... background"), the
  backgrounds none of the sample photos shows (white, pink, orange) and seeds 1000-1007. Nothing is
  chosen on it; the README reports it.

Each set also renders its class prompt, "a photo of a {class}".

On `builtin:toy` a small classifier trained on the toy world (toyworld/oracle.py) reads the renders:

| metric | what it measures | paper's counterpart |
|---|---|---|
| subject_detected | subject renders showing the subject: the dot head on a red ball, round with separate white dots in the pixels (toyworld/shapes.py) | subject fidelity |
| dots_detected | subject renders in which the oracle's dot detector alone fires (a looser reading) | |
| subject_similarity | mean cosine of oracle embeddings, subject renders x instance photos | DINO |
| background_match | subject renders whose background is the one asked for | prompt fidelity (CLIP-T) |
| class_shows_subject | class renders in which the subject appears | PRES (prior preservation) |
| class_shift | 1 - mean cosine, class renders with vs without the LoRA, same seed | DIV's counterpart: drift of the class |

and, in the report set, what prior preservation does not cover (bleed):

| metric | what it measures |
|---|---|
| other_classes_color_shift, other_classes_background_shift | total-variation distance between the colours (backgrounds) the oracle reads in renders of the world's other classes ("a photo of a cube"), LoRA vs base |
| base_color_spread, base_background_spread | the same distance between two sets of the base model's own renders (other seeds): the noise floor the shifts are read against |
| attributes_obeyed | class prompts with an asked colour and background ("a photo of a blue ball on a yellow background") rendered with both |
| other_classes_show_subject | renders of other classes showing the subject's dots |

For any base model, local DINO (`dino`) and CLIP (`clip`) folders add the paper's own metrics: DINO and
CLIP-I (mean cosine, subject renders x instance photos) and CLIP-T (mean cosine, subject render x its
prompt without the token, which CLIP does not know); with them, class_shift is read from DINO (else CLIP)
embeddings where no oracle reads the model. Models load from local folders only and never run remote code.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .config import EvalSettings, fill_prompt, oracle_reads, settings_from
from .errors import ConfigError, DreamLoraError, ModelLoadError
from .progress import ProgressCallback, ProgressEvent, ignore_progress

if TYPE_CHECKING:
    from .toyworld.oracle import Oracle

CLASS_PROMPT = "a photo of {class_article} {class}"

ADAPTER_NAME = "dreamlora_eval"
# Class prompts with asked attributes, (colour, background): each pair is one the toy world draws (contrast).
ATTRIBUTE_PROMPTS = (("blue", "yellow"), ("green", "white"), ("yellow", "purple"))
SPREAD_SEED_OFFSET = 10_000  # the base model's second seed set, for the noise floor of the bleed shifts


@dataclass(frozen=True)
class PromptSet:
    """Subject prompts (each phrasing x each background) and the seeds they are rendered from."""

    name: str
    phrasings: tuple[str, ...]  # templates: {token} {token_article} {class} {bg} {bg_article}
    backgrounds: tuple[str, ...]
    seeds: tuple[int, ...]
    bleed: bool = False  # also render other classes and asked attributes (oracle only)


TUNING_SET = PromptSet("tuning", ("a photo of {token} {class} on {bg_article} {bg} background",),
                       ("blue", "gray", "pink", "orange"), tuple(range(8)))
PROMPT_SETS = {
    "tuning": TUNING_SET,
    "report": PromptSet("report", ("{token_article} {token} {class} on {bg_article} {bg} background",
                                   "{token} {class} on {bg_article} {bg} background"),
                        ("white", "pink", "orange"), tuple(range(1000, 1008)), bleed=True),
    # The tuning set with phrasings one word off its own, neither set's: how far the token carries beyond the
    # training prompt, measured without spending the report set
    "phrasings": replace(TUNING_SET, name="phrasings",
                         phrasings=("a photo of a {token} {class} on {bg_article} {bg} background",
                                    "photo of {token} {class} on {bg_article} {bg} background")),
}


@dataclass
class Scores:
    """One model's scores; None where a metric was not computed (no oracle, no DINO/CLIP folder, no bleed prompts)."""

    subject_detected: float | None = None  # subject renders showing a red ball with white dots
    dots_detected: float | None = None  # subject renders in which the dot detector alone fires
    subject_similarity: float | None = None  # mean oracle-embedding cosine, subject renders x instance photos
    background_match: float | None = None  # fraction of subject renders on the asked background
    class_shows_subject: float | None = None  # fraction of class renders showing the subject
    class_shift: float | None = None  # 1 - mean cosine to the base model's class render of the same seed
    other_classes_color_shift: float | None = None  # TV distance of read colours, other classes, vs base
    other_classes_background_shift: float | None = None  # the same for backgrounds
    other_classes_show_subject: float | None = None  # other-class renders with the subject's dots
    attributes_obeyed: float | None = None  # asked colour and background both rendered
    base_color_spread: float | None = None  # base vs base (other seeds): the floor of the colour shift
    base_background_spread: float | None = None  # the same for backgrounds
    dino: float | None = None  # mean DINO CLS cosine, subject renders x instance photos
    clip_i: float | None = None  # mean CLIP image cosine, subject renders x instance photos
    clip_t: float | None = None  # mean CLIP cosine, subject render x its prompt (token removed)


@dataclass
class SetReport:
    """One prompt set's prompts and the scores of the LoRA and of the base model on them."""

    name: str
    subject_prompts: list[str]
    class_prompts: list[str]
    bleed_prompts: list[str]
    seeds: list[int]
    backgrounds: list[str]
    lora: Scores
    base: Scores
    per_background: dict[str, dict[str, float | None]]  # background -> {"lora": detected, "base": detected}


@dataclass
class EvalReport:
    """Scores of the LoRA and of its base model, per prompt set, and how they were measured.

    `lora`, `base`, `prompts`, `seeds` and `backgrounds` are those of the report set when it was rendered
    (else of the one set rendered); `sets` holds every set.
    """

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
    lora_scale: float  # the LoRA's renders; the base model's are at 0
    resolution: int
    instance_dir: str | None  # the instance photos compared with (None: not found)
    instance_images: int
    oracle: str | None  # which oracle read the renders (None: no oracle for this base model)
    dino_model: str | None
    clip_model: str | None
    grid: str | None  # the PNG of the renders, when asked for
    seconds: float
    sets: list[SetReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready data: {"lora": {...}, "base": {...}, "sets": [...], "prompts": [...], ...}."""
        return asdict(self)


@dataclass
class Scorers:
    """What reads the renders: the toy oracle, DINO, CLIP (each optional), and the instance photos."""

    oracle: Oracle | None = None
    dino: DinoScorer | None = None
    clip: ClipScorer | None = None
    instances: list[Image.Image] = field(default_factory=list)
    subject_class: str = "ball"  # what a person requires to call a render the subject (toy oracle only)
    subject_color: str = "red"


# render(prompts, seeds, adapter_on) -> one image per prompt and seed, prompt-major (all seeds of prompt 0, ...)
Render = Callable[[list[str], list[int], bool], list[Image.Image]]


def evaluate(
    lora_path: str | Path,
    settings: EvalSettings | None = None,
    *,
    model: str | None = None,
    single_file_config: str | None = None,
    progress: ProgressCallback = ignore_progress,
    **overrides,
) -> EvalReport:
    """Render the prompt sets with and without the LoRA and score both.

    Args:
        lora_path: A LoRA .safetensors file (dreamlora's, or any kohya/diffusers file).
        settings: Prompt sets, seeds, backgrounds, sampling and scorers (dreamlora.config.EvalSettings; its
            defaults when None).
        model: The base model (--model); None: the one the file was trained on.
        single_file_config: For a single-file base model: the folder or hub id with its configs.
        progress: Receives ("eval", renders done, renders in all) events.
        **overrides: Fields of EvalSettings to change, e.g. `seeds=[0, 1], steps=10`. `seeds` and `backgrounds`
            replace those of every chosen set. The instance photos (`instance_dir`) default to the folder
            named in the file's config if it exists (as given, then under ./sample_instances/); the toy
            oracle (`oracle`) reads renders of the models it knows.

    Returns:
        The report; the base model's class_shift is 0 by definition.

    Raises:
        ConfigError: bad settings or a missing --instance-dir/--dino/--clip folder.
        ModelLoadError: the LoRA file, the base model, or a DINO/CLIP/oracle folder cannot be loaded.
    """
    from .atomic import check_writable
    from .lora import read_lora_file
    from .models import load_base_model
    from .sampling import (attach_lora, model_for_lora, place_for_sampling, render_images, sampling_device,
                           set_lora_scale)

    started = time.time()
    try:
        settings = replace(settings or EvalSettings(), **overrides)
    except TypeError as exc:  # an override that is not a field of EvalSettings: a caller's bug
        raise ConfigError(f"evaluate(): {exc}") from None
    settings = settings_from(EvalSettings, {}, base=settings)  # validates and checks every value
    if settings.grid is not None:
        try:
            check_writable(settings.grid, "--grid")  # refused now, not after every render
        except DreamLoraError as exc:
            raise ConfigError(str(exc)) from None
    lora = read_lora_file(lora_path)  # ModelLoadError when it is not a LoRA, is malformed or holds NaN
    metadata, info = lora.metadata, lora.config or {}
    data = info.get("data", {})
    token, class_word = data.get("token") or "sks", data.get("class_word") or ""
    if not class_word:
        raise ConfigError(f"'{Path(lora_path).name}' does not record its class word (not a dreamlora file?); "
                          "evaluation needs it for its prompts.")
    instances, instance_folder, notes = _instance_images(settings.instance_dir, data.get("instance_dir"))
    sets = chosen_sets(settings)
    model = model or model_for_lora(info, lora_path)
    device, dtype = sampling_device()
    base = load_base_model(model, single_file_config=single_file_config, dtype=dtype)
    place_for_sampling(base, device)
    use_oracle = oracle_reads(base.identity, settings.oracle)
    scorers = load_scorers(settings.dino, settings.clip, [b for s in sets for b in s.backgrounds], instances,
                           use_oracle)
    if scorers.oracle is None:
        notes.append(f"no oracle reads '{base.identity}' renders: oracle metrics are null "
                     "(pass --dino/--clip folders for model-independent ones)")
    pipe = base.pipeline(settings.sampler)
    notes += attach_lora(pipe, base, lora_path, metadata, ADAPTER_NAME)
    resolution = base.default_resolution

    def render(prompts: list[str], seeds: list[int], adapter_on: bool) -> list[Image.Image]:
        set_lora_scale(pipe, base, settings.lora_scale if adapter_on else 0.0, ADAPTER_NAME)  # 0: the base model
        return [image for prompt in prompts for image in render_images(
            pipe, prompt, seeds, steps=settings.steps, guidance=settings.guidance, resolution=resolution,
            family=base.family)]

    reports, renders = score_sets(render, sets, token, class_word, scorers, progress)
    if settings.grid is not None:
        save_eval_grid(renders, reports, Path(settings.grid), f"{Path(lora_path).name} on {base.identity}")
    if (scorers.dino or scorers.clip) and not instances:
        notes.append("no instance photos: DINO and CLIP-I are null (pass --instance-dir)")
    primary = next((r for r in reports if r.name == "report"), reports[0])
    return EvalReport(
        lora=primary.lora, base=primary.base, lora_file=Path(lora_path).name, model=base.identity, token=token,
        class_word=class_word, prompts=primary.subject_prompts + primary.class_prompts,
        subject_prompts=primary.subject_prompts, class_prompts=primary.class_prompts, seeds=primary.seeds,
        backgrounds=primary.backgrounds, steps=settings.steps, guidance=settings.guidance, sampler=settings.sampler,
        lora_scale=settings.lora_scale, resolution=resolution,
        instance_dir=str(instance_folder) if instance_folder else None, instance_images=len(instances),
        oracle="toy oracle (dreamlora/builtin_models/toy_oracle)" if scorers.oracle else None,
        dino_model=Path(settings.dino).name if settings.dino is not None else None,
        clip_model=Path(settings.clip).name if settings.clip is not None else None,
        grid=str(settings.grid) if settings.grid is not None else None, seconds=round(time.time() - started, 1),
        sets=reports, notes=notes,
    )


def chosen_sets(settings: EvalSettings) -> list[PromptSet]:
    """The prompt sets asked for, with --seeds / --backgrounds replacing each set's own where given."""
    sets = []
    for name in settings.prompt_sets:
        chosen = PROMPT_SETS[name]
        if settings.seeds:
            chosen = replace(chosen, seeds=tuple(int(s) for s in settings.seeds))
        if settings.backgrounds:
            chosen = replace(chosen, backgrounds=tuple(str(b).strip() for b in settings.backgrounds))
        sets.append(chosen)
    return sets


def load_scorers(dino: str | None, clip: str | None, backgrounds: list[str], instances: list[Image.Image],
                 use_oracle: bool) -> Scorers:
    """The oracle (checked against the backgrounds asked for) and the DINO/CLIP folders given (None: not used)."""
    reader = _load_toy_oracle(backgrounds) if use_oracle else None
    return Scorers(
        oracle=reader,
        dino=DinoScorer(dino) if dino is not None else None,
        clip=ClipScorer(clip) if clip is not None else None,
        instances=instances,
        subject_class=reader.config.subject_class if reader else "",
        subject_color=reader.config.subject_color if reader else "",
    )


def set_prompts(prompt_set: PromptSet, token: str, class_word: str, bleed: bool) -> dict[str, list]:
    """The set's prompts: subject prompts with their asked backgrounds, class prompts, and bleed prompts."""
    subject = [(fill_subject(phrasing, token, class_word, bg), bg)
               for phrasing in prompt_set.phrasings for bg in prompt_set.backgrounds]
    classes = [fill_prompt(CLASS_PROMPT.replace("{class_article}", _article(class_word)), token, class_word)]
    others, attributes = [], []
    if bleed and prompt_set.bleed:
        from .toyworld.world import CLASSES

        others = [f"a photo of {_article(c)} {c}" for c in CLASSES if c != class_word]
        attributes = [(f"a photo of {_article(color)} {color} {class_word} on {_article(bg)} {bg} background", color, bg)
                      for color, bg in ATTRIBUTE_PROMPTS]
    return {"subject": subject, "class": classes, "others": others, "attributes": attributes}


def score_sets(render: Render, sets: list[PromptSet], token: str, class_word: str, scorers: Scorers,
               progress: ProgressCallback = ignore_progress) -> tuple[list[SetReport], dict]:
    """Render every set's prompts (each prompt and seed list once, with and without the adapter) and score them.

    Returns:
        The per-set reports, and the renders by (prompt, seeds, adapter on).
    """
    plans = [(s, set_prompts(s, token, class_word, bleed=scorers.oracle is not None)) for s in sets]
    jobs: dict[tuple, None] = {}  # ordered and without repeats: a prompt two sets share renders once
    for prompt_set, prompts in plans:
        seeds = tuple(prompt_set.seeds)
        texts = [p for p, _ in prompts["subject"]] + prompts["class"] + prompts["others"] + \
            [p for p, _, _ in prompts["attributes"]]
        for adapter_on in (False, True):
            jobs.update({(text, seeds, adapter_on): None for text in texts})
        spread_seeds = tuple(s + SPREAD_SEED_OFFSET for s in seeds)
        jobs.update({(text, spread_seeds, False): None for text in prompts["others"]})
    total, done = sum(len(seeds) for _, seeds, _ in jobs), 0
    renders = {}
    for job in jobs:
        text, seeds, adapter_on = job
        renders[job] = render([text], list(seeds), adapter_on)
        done += len(seeds)
        progress(ProgressEvent("eval", done, total))
    reports = [score_set(prompt_set, prompts, renders, scorers, token) for prompt_set, prompts in plans]
    return reports, renders


def score_set(prompt_set: PromptSet, prompts: dict[str, list], renders: dict, scorers: Scorers, token: str) -> SetReport:
    seeds = tuple(prompt_set.seeds)

    def images(texts: list[str], adapter_on: bool, use_seeds: tuple = seeds) -> list[Image.Image]:
        return [image for text in texts for image in renders[(text, use_seeds, adapter_on)]]

    subject_texts = [p for p, _ in prompts["subject"]]
    asked = [bg for _, bg in prompts["subject"] for _ in seeds]
    scores, per_background = {}, {bg: {} for bg in prompt_set.backgrounds}
    for tag, adapter_on in (("lora", True), ("base", False)):
        subject_images, class_images = images(subject_texts, adapter_on), images(prompts["class"], adapter_on)
        score = Scores()
        if scorers.oracle is not None:
            # class_shift compares with the base model's class renders; the base itself is 0 by definition.
            base_class = images(prompts["class"], False) if adapter_on else None
            score, present = oracle_scores(scorers, subject_images, class_images, asked, base_class)
            for bg in prompt_set.backgrounds:
                flags = [p for p, want in zip(present, asked) if want == bg]
                per_background[bg][tag] = _fraction(flags)
            if prompts["others"]:
                bleed_scores(score, scorers.oracle, images(prompts["others"], adapter_on),
                             images(prompts["others"], False), images(prompts["others"], False, tuple(
                                 s + SPREAD_SEED_OFFSET for s in seeds)),
                             images([p for p, _, _ in prompts["attributes"]], adapter_on),
                             [(color, bg) for _, color, bg in prompts["attributes"] for _ in seeds])
        embedder = scorers.dino or scorers.clip
        if scorers.oracle is None and embedder is not None:
            score.class_shift = 0.0 if not adapter_on else pairwise_shift(
                _embed(embedder, class_images), _embed(embedder, images(prompts["class"], False)))
        if scorers.dino is not None and scorers.instances:
            score.dino = _mean_cosine(scorers.dino.embed(subject_images), scorers.dino.embed(scorers.instances))
        if scorers.clip is not None:
            rendered = scorers.clip.embed_images(subject_images)  # (N, D), prompt-major like `asked`
            if scorers.instances:
                score.clip_i = _mean_cosine(rendered, scorers.clip.embed_images(scorers.instances))
            texts = [strip_token(p, token) for p in subject_texts for _ in seeds]
            score.clip_t = float((rendered * scorers.clip.embed_texts(texts)).sum(1).mean())
        scores[tag] = score
    return SetReport(name=prompt_set.name, subject_prompts=subject_texts, class_prompts=list(prompts["class"]),
                     bleed_prompts=list(prompts["others"]) + [p for p, _, _ in prompts["attributes"]],
                     seeds=list(seeds), backgrounds=list(prompt_set.backgrounds), lora=scores["lora"],
                     base=scores["base"], per_background=per_background)


def fill_subject(phrasing: str, token: str, class_word: str, background: str) -> str:
    """'a photo of sks ball on an orange background'."""
    # Filled in one pass: a background (a flag value) is text, never a template, whatever braces it holds.
    values = {"{token}": token, "{token_article}": _article(token), "{class}": class_word,
              "{bg_article}": _article(background), "{bg}": background}
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], phrasing)


def subject_prompt(token: str, class_word: str, background: str) -> str:
    """The tuning set's subject prompt: 'a photo of sks ball on an orange background'."""
    return fill_subject(PROMPT_SETS["tuning"].phrasings[0], token, class_word, background)


def strip_token(prompt: str, token: str) -> str:
    """The prompt without the identifier token, for CLIP-T: 'a photo of sks ball' -> 'a photo of ball'."""
    words = prompt.split()
    kept = [w for i, w in enumerate(words)
            if w != token and not (w in ("a", "an") and i + 1 < len(words) and words[i + 1] == token)]
    return " ".join(kept)


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
    unknown = sorted({b for b in backgrounds if b not in reader.config.backgrounds})
    if unknown:
        raise ConfigError(f"--backgrounds {unknown} are not backgrounds the toy oracle knows; "
                          f"use some of: {', '.join(reader.config.backgrounds)}")
    return reader


def save_eval_grid(renders: dict, reports: list[SetReport], path: Path, title: str) -> None:
    """Subject and class prompts of every set, a LoRA row above a base row each; columns are seeds."""
    from .grid import make_grid
    from .sampling import save_png

    rows, labels = [], []
    widest = max(len(r.seeds) for r in reports)
    for report in reports:
        for prompt in report.subject_prompts + report.class_prompts:
            for adapter_on, tag in ((True, "LoRA"), (False, "base")):
                rows.append(renders[(prompt, tuple(report.seeds), adapter_on)])
                labels.append(f"{prompt}\n({tag}, {report.name})")
    columns = [f"seed {s}" for s in reports[0].seeds] if len({tuple(r.seeds) for r in reports}) == 1 \
        else [f"#{i}" for i in range(widest)]
    save_png(make_grid(rows, labels, columns, title=title), path)


def oracle_scores(scorers: Scorers, subject_images: list[Image.Image], class_images: list[Image.Image],
                  asked_backgrounds: list[str], base_class_images: list[Image.Image] | None) -> tuple[Scores, list[bool]]:
    """The oracle's scores of one model (`base_class_images` None: this is the base model), and per subject
    render whether the subject is there."""
    reader = scorers.oracle
    subject, classes = reader.read(subject_images), reader.read(class_images)
    present = subject.subject_present(scorers.subject_class, scorers.subject_color)
    similarity = _mean_cosine(subject.embeddings, reader.embed(scorers.instances)) if scorers.instances else None
    shift = 0.0
    if base_class_images is not None:  # pairwise by seed: row i of both lists is the same prompt and seed
        shift = pairwise_shift(classes.embeddings, reader.embed(base_class_images))
    return Scores(
        subject_detected=_fraction(present),
        dots_detected=_fraction(subject.subject_detected),
        subject_similarity=similarity,
        background_match=_fraction([got == want for got, want in zip(subject.backgrounds, asked_backgrounds)]),
        class_shows_subject=_fraction(classes.subject_present(scorers.subject_class, scorers.subject_color)),
        class_shift=shift,
    ), present


def pairwise_shift(embeddings: torch.Tensor, base_embeddings: torch.Tensor) -> float:
    """1 - mean cosine of row i with row i (same prompt and seed, with and without the adapter), at least 0."""
    a = torch.nn.functional.normalize(embeddings.float(), dim=1)
    b = torch.nn.functional.normalize(base_embeddings.float(), dim=1)
    return max(0.0, 1.0 - float((a * b).sum(1).mean()))


def bleed_scores(score: Scores, reader: Oracle, others: list[Image.Image], base_others: list[Image.Image],
                 base_others_spread: list[Image.Image], attributes: list[Image.Image],
                 asked_attributes: list[tuple[str, str]]) -> None:
    """Fill the bleed metrics of `score`: how far renders of other classes and of asked attributes move."""
    read, base, spread = reader.read(others), reader.read(base_others), reader.read(base_others_spread)
    score.other_classes_color_shift = total_variation(read.colors, base.colors)
    score.other_classes_background_shift = total_variation(read.backgrounds, base.backgrounds)
    score.base_color_spread = total_variation(spread.colors, base.colors)
    score.base_background_spread = total_variation(spread.backgrounds, base.backgrounds)
    score.other_classes_show_subject = _fraction(read.subject_detected)
    got = reader.read(attributes)
    score.attributes_obeyed = _fraction([(c, b) == want for c, b, want in zip(got.colors, got.backgrounds,
                                                                               asked_attributes)])


def total_variation(a: list[str], b: list[str]) -> float:
    """Half the L1 distance between the label frequencies of two equally long lists: 0 same, 1 disjoint."""
    count_a, count_b = Counter(a), Counter(b)
    return sum(abs(count_a[k] / len(a) - count_b[k] / len(b)) for k in set(a) | set(b)) / 2


def _embed(embedder, images: list[Image.Image]) -> torch.Tensor:
    return embedder.embed(images) if isinstance(embedder, DinoScorer) else embedder.embed_images(images)


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
        {"rendered": {"class", "color", "background", "subject_detected", "white_dots"}, "drawn": {...}, "n",
        "captions"}.
    """
    import numpy as np

    from .models import load_base_model
    from .sampling import decode_latents, initial_latents, unpacked_latents
    from .toyworld.oracle import load_oracle
    from .toyworld.world import draw_scene, random_scene

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    captions = [f"a photo of {_article(s.color)} {s.color} {s.cls}{f' with {s.dots} dots' if s.dots else ''} "
                f"on {_article(s.background)} {s.background} background" for s in scenes]
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
            # white dots on a ball where the caption asks for them, and none where it does not
            "white_dots": _fraction([got == (s.cls == "ball" and s.dots == "white")
                                     for got, s in zip(reading.subject_detected, scenes)]),
        }

    return {"model": base.identity, "n": n, "rendered": accuracy(renders),
            "drawn": accuracy([draw_scene(s, 64) for s in scenes]), "captions": captions, "images": renders}
