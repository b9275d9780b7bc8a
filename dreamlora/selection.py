"""The best checkpoint, chosen by measurement: score the adapters during training, plot, recommend, export.

With `--eval-every N` a run renders the tuning prompt set (dreamlora.evaluation) every N steps and at its
last step, from the adapters being trained, and scores the renders: the toy oracle on builtin:toy, DINO /
CLIP-I and a class drift from DINO (else CLIP) embeddings where `--eval-dino` / `--eval-clip` name local
model folders. Into the run folder go

    eval/step-000200.safetensors   the adapter weights of that step (what `dreamlora export` reads)
    eval/step-000200.png           the renders, LoRA above base
    eval/scores.json               one row a scored step, the recommendation and the run's settings
    eval/scores.png                fidelity and class drift over the steps, the drift limit, the pick
    report.html                    all of it on one self-contained page (images inline: opens offline)

The recommended step is the one with the best subject fidelity whose class drift stays at or under
`--max-class-drift` (the earliest of equals: fewer steps drift less). The report set is never used
here, so a pick made on the tuning set can still be judged on it.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .atomic import atomic_path, write_text_atomic
from .config import DreamLoraConfig, load_config, to_dict
from .errors import ConfigError, TrainingError
from .evaluation import PROMPT_SETS, Scorers, _instance_images, load_scorers, oracle_reads, save_eval_grid, score_sets
from .progress import ProgressCallback, ProgressEvent, ignore_progress

EVAL_DIR = "eval"
SCORES_FILE = "scores.json"
PLOT_FILE = "scores.png"
REPORT_FILE = "report.html"


@dataclass
class StepScore:
    """One scored step: the fidelity and drift the pick is made on, and every score of the LoRA."""

    step: int
    fidelity: float | None  # subject detected (oracle), else DINO, else CLIP-I
    drift: float | None  # class shift: 1 - cosine of class renders to the base model's, same seeds
    scores: dict  # dreamlora.evaluation.Scores of the LoRA, as a dict
    grid: str  # the renders, relative to the run folder


def fidelity_and_drift(scores) -> tuple[float | None, float | None]:
    """What the pick is made on: the oracle's subject score where it reads the model, else DINO, else CLIP-I."""
    for value in (scores.subject_detected, scores.dino, scores.clip_i):
        if value is not None:
            return value, scores.class_shift
    return None, scores.class_shift


def recommend(rows: list[StepScore], max_drift: float) -> int | None:
    """The step with the best fidelity whose drift is at most `max_drift`; the earliest of equals.

    None when no step has a fidelity; when every step drifts further, the least drifting one.
    """
    scored = [r for r in rows if r.fidelity is not None]
    if not scored:
        return None
    within = [r for r in scored if r.drift is None or r.drift <= max_drift]
    if not within:
        return min(scored, key=lambda r: (r.drift, r.step)).step
    return max(within, key=lambda r: (r.fidelity, -r.step)).step


class CheckpointScorer:
    """Scores the in-memory adapters at chosen steps and keeps the run folder's eval files up to date."""

    def __init__(self, base, config: DreamLoraConfig, resolution: int, run_dir: Path, start_step: int, write: bool):
        from .sampling import render_images, set_adapters_enabled

        v, data = config.validation, config.data
        self.base, self.config, self.run_dir, self.write = base, config, run_dir, write
        self.folder = run_dir / EVAL_DIR
        instances, _, _ = _instance_images(data.instance_dir, None)
        use_oracle = oracle_reads(base.identity, v.eval_oracle)
        tuning = PROMPT_SETS["tuning"]  # never the report set: it must stay free of choices
        self.sets = [replace(tuning, seeds=tuple(v.eval_seeds))] if v.eval_seeds else [tuning]
        self.scorers: Scorers = load_scorers(v.eval_dino, v.eval_clip, list(self.sets[0].backgrounds), instances,
                                             use_oracle)
        if self.scorers.oracle is None and self.scorers.dino is None and self.scorers.clip is None:
            raise ConfigError(f"--eval-every: nothing reads '{base.identity}' renders; pass --eval-dino or "
                              "--eval-clip with a local model folder (the toy oracle reads builtin:toy, or "
                              "toy-world models with --eval-oracle)")
        self.rows = [r for r in read_scores(run_dir) if r.step <= start_step]  # later ones are scored again
        self.base_renders: dict = {}  # the base model renders the same pictures at every step: once is enough
        models = [base.unet, *base.text_encoders]
        pipe = base.pipeline(v.sampler)

        def render(prompts: list[str], seeds: list[int], adapter_on: bool) -> list[Image.Image]:
            key = (tuple(prompts), tuple(seeds))
            if not adapter_on and key in self.base_renders:
                return self.base_renders[key]
            set_adapters_enabled(models, adapter_on)
            try:
                images = [im for p in prompts for im in render_images(pipe, p, seeds, steps=v.steps,
                                                                       guidance=v.guidance, resolution=resolution,
                                                                       family=base.family)]
            finally:
                set_adapters_enabled(models, True)
            if not adapter_on:
                self.base_renders[key] = images
            return images

        self.render = render

    def __call__(self, step: int, progress: ProgressCallback = ignore_progress) -> StepScore:
        from .lora import adapter_state_dict
        from .training import encoders_on

        models = [self.base.unet, *self.base.text_encoders]
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        progress(ProgressEvent("validate", 0, 1, message=f"scoring step {step}"))
        try:
            with encoders_on(self.base, self.base.unet.device):
                reports, renders = score_sets(self.render, self.sets, self.config.data.token,
                                              self.config.data.class_word, self.scorers)
        finally:
            for m, training in zip(models, was_training):
                m.train(training)
        fidelity, drift = fidelity_and_drift(reports[0].lora)
        grid = f"{EVAL_DIR}/step-{step:06d}.png"
        row = StepScore(step, fidelity, drift, asdict(reports[0].lora), grid)
        self.rows = [r for r in self.rows if r.step != step] + [row]
        if self.write:
            save_adapter(adapter_state_dict(self.base.unet, self.base.text_encoders), self.folder / f"step-{step:06d}.safetensors")
            save_eval_grid(renders, reports, self.run_dir / grid, f"step {step}")
            write_results(self.run_dir, self.rows, self.config)
        best = recommend(self.rows, self.config.validation.max_class_drift)
        progress(ProgressEvent("validate", 1, 1, message=f"step {step}: {describe_row(row)}; recommended step {best}"))
        return row


def describe_row(row: StepScore) -> str:
    show = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"fidelity {show(row.fidelity)}, class drift {show(row.drift)}"


def save_adapter(state: dict[str, torch.Tensor], path: Path) -> None:
    from .checkpoints import _save

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _save(state, tmp)


def read_scores(run_dir: Path) -> list[StepScore]:
    """The scored steps of a run folder ([] when none were scored)."""
    return read_scores_file(run_dir).get("steps", [])


def read_scores_file(run_dir: Path) -> dict:
    """eval/scores.json, its "steps" read as StepScore rows ({} when no step was scored).

    Raises:
        TrainingError: the file is damaged.
    """
    path = Path(run_dir) / EVAL_DIR / SCORES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {**data, "steps": [StepScore(**row) for row in data["steps"]]}
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"'{path}' is damaged ({exc}); delete it, or start the run over with --overwrite") from None


def write_results(run_dir: Path, rows: list[StepScore], config: DreamLoraConfig) -> None:
    """scores.json, the plot and report.html, from every row so far."""
    rows = sorted(rows, key=lambda r: r.step)
    limit = config.validation.max_class_drift
    best = recommend(rows, limit)
    folder = run_dir / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / SCORES_FILE, json.dumps(
        {"recommended_step": best, "max_class_drift": limit, "prompt_set": "tuning",
         "steps": [asdict(r) for r in rows], "config": to_dict(config)}, indent=1))
    plot = plot_scores(rows, limit, best)
    from .sampling import save_png

    save_png(plot, folder / PLOT_FILE)
    write_text_atomic(run_dir / REPORT_FILE, report_html(run_dir, rows, best, limit, config))


# --- the plot ---------------------------------------------------------------------------------------------


def plot_scores(rows: list[StepScore], limit: float, best: int | None, size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Fidelity (blue) and class drift (orange) over the steps on a 0-1 axis, the drift limit dashed, the pick ringed."""
    width, height = size
    left, right, top, bottom = 48, 16, 28, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [r.step for r in rows] or [0]
    lo, hi = 0, max(steps)
    top_value = max([1.0] + [v for r in rows for v in (r.fidelity, r.drift) if v is not None])

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * ((step - lo) / (hi - lo) if hi > lo else 0.5)
        return x, top + (height - top - bottom) * (1 - value / top_value)

    for tick in [i / 4 * top_value for i in range(5)]:  # horizontal grid with labels
        _, y = xy(lo, tick)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((6, y - 6), f"{tick:.2f}", fill="black")
    for step in steps:
        x, _ = xy(step, 0)
        draw.text((x - 12, height - bottom + 6), str(step), fill="black")
    draw.text((left, height - 16), "step", fill="black")
    _, y = xy(lo, limit)
    for x in range(left, width - right, 12):  # the drift limit, dashed
        draw.line([(x, y), (min(x + 6, width - right), y)], fill=(230, 120, 30))
    for name, colour, offset in (("fidelity", (40, 80, 210), 0), ("drift", (230, 120, 30), 1)):
        points = [xy(r.step, getattr(r, name)) for r in rows if getattr(r, name) is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        label = "subject fidelity" if name == "fidelity" else f"class drift (limit {limit:g}, dashed)"
        draw.text((left + 8 + offset * 150, 8), label, fill=colour)
    chosen = next((r for r in rows if r.step == best and r.fidelity is not None), None)
    if chosen:
        x, y = xy(chosen.step, chosen.fidelity)
        draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline="black", width=2)
        draw.text((left + 330, 8), f"recommended: step {best}", fill="black")
    return image


# --- the report page --------------------------------------------------------------------------------------


def _data_url(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def report_html(run_dir: Path, rows: list[StepScore], best: int | None, limit: float, config: DreamLoraConfig) -> str:
    """One page, every image inline, no script: the plot, the score table, each step's renders, the settings."""
    show = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    metrics = [k for k in (rows[0].scores if rows else {}) if any(r.scores.get(k) is not None for r in rows)]
    header = "".join(f"<th>{html.escape(k)}</th>" for k in ["step", "fidelity", "class drift", *metrics])
    body = "".join(
        f"<tr{' class=best' if r.step == best else ''}><td>{r.step}</td><td>{show(r.fidelity)}</td>"
        f"<td>{show(r.drift)}</td>" + "".join(f"<td>{show(r.scores.get(k))}</td>" for k in metrics) + "</tr>"
        for r in rows)
    grids = "".join(
        f"<figure><img alt='renders at step {r.step}' src='{_data_url(run_dir / r.grid) or ''}'>"
        f"<figcaption>step {r.step}{' (recommended)' if r.step == best else ''}</figcaption></figure>"
        for r in rows if (run_dir / r.grid).is_file())
    plot = _data_url(run_dir / EVAL_DIR / PLOT_FILE)
    settings = html.escape(json.dumps(to_dict(config), indent=1))
    pick = (f"Recommended: <b>step {best}</b> (best subject fidelity with class drift ≤ {limit:g}). "
            f"Write it with <code>dreamlora export {html.escape(str(run_dir))} --step {best} --out FILE</code>."
            if best is not None else "No step could be scored.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dreamlora run report: {html.escape(run_dir.name)}</title>
<style>body{{font:14px sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}tr.best{{background:#e8f0ff;font-weight:bold}}
.grids{{display:flex;flex-wrap:wrap;gap:12px}}figure{{margin:0}}img{{image-rendering:pixelated;max-width:100%}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>{html.escape(run_dir.name)}</h1>
<p>Generated {datetime.datetime.now().isoformat(timespec="seconds")} by dreamlora. Scores are on the tuning prompt
set ({len(PROMPT_SETS['tuning'].seeds)} seeds); <code>dreamlora eval</code> scores a file on the report set.</p>
<p>{pick}</p>
<h2>Fidelity and class drift over the steps</h2>
{f"<img alt='scores over the steps' src='{plot}'>" if plot else ""}
<h2>Scores</h2><table><tr>{header}</tr>{body}</table>
<h2>Renders (LoRA above base, one row a prompt)</h2><div class="grids">{grids}</div>
<h2>Settings</h2><pre>{settings}</pre>
</body></html>
"""


# --- export -----------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    output: Path
    step: int
    source: Path  # the adapter weights the file was written from


def export(run_dir: str | Path, out: str | Path, step: int | str | None = None, *, model: str | None = None,
           format: str | None = None, save_dtype: str | None = None, overwrite: bool = False,
           progress: ProgressCallback = ignore_progress) -> ExportResult:
    """Write the LoRA file of any kept step of a run: a checkpoint's, or a scored step's (`--eval-every`).

    Args:
        run_dir: The run folder (checkpoints/ and eval/ inside).
        out: The .safetensors file to write.
        step: A step number, "best" (the recommended one), "latest", or None: best when steps were scored,
            else latest.
        model: The base model, where the run's own cannot be found (a local folder recorded by name only).
        format, save_dtype: As `train`'s --format / --save-dtype (default: the run's).
        overwrite: Replace an existing `out`.

    Raises:
        ConfigError: no such run folder or step, or `out` exists without overwrite.
        ModelLoadError, TrainingError: the base model or the stored weights cannot be read.
    """
    from .checkpoints import list_checkpoints, read_state
    from .lora import load_adapter_state_dict
    from .models import load_base_model
    from .training import add_adapters, save_output

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR '{run_dir}' is not a folder. Pass the run folder of a training (<out>-run).")
    if out.exists() and not overwrite:
        raise ConfigError(f"output '{out}' already exists. Pass --overwrite to replace it, or choose another --out.")
    scores_meta = read_scores_file(run_dir)
    scored = scores_meta.get("steps", [])
    kept = {c.step: c.path / "adapter.safetensors" for c in list_checkpoints(run_dir)}
    kept.update({r.step: run_dir / EVAL_DIR / f"step-{r.step:06d}.safetensors" for r in scored
                 if (run_dir / EVAL_DIR / f"step-{r.step:06d}.safetensors").is_file()})
    if not kept:
        raise ConfigError(f"'{run_dir}' holds no checkpoint and no scored step to export.")
    chosen = _choose_step(step, kept, scores_meta.get("recommended_step"), run_dir)
    stored = scores_meta.get("config")
    if stored is None:  # no scores: the settings of the newest checkpoint (paths by base name only)
        stored = read_state(list_checkpoints(run_dir)[-1]).get("config", {})
    overrides = {f"{section}.{key}": value for section, values in stored.items() if isinstance(values, dict)
                 for key, value in values.items()}
    overrides.update({"output.path": str(out), "output.overwrite": True, "train.resume": False})
    for key, value in (("model.name", model), ("output.format", format), ("output.save_dtype", save_dtype)):
        if value is not None:
            overrides[key] = value
    config = load_config(None, overrides)
    from safetensors.torch import load_file

    try:
        state = load_file(str(kept[chosen]))
    except Exception as exc:  # a damaged file: safetensors raises its own error types
        raise TrainingError(f"cannot read '{kept[chosen]}': {str(exc).splitlines()[0][:200]}") from None
    progress(ProgressEvent("load", message=f"loading {config.model.name} for step {chosen}"))
    base = load_base_model(config.model.name, single_file_config=config.model.single_file_config, vae=config.model.vae)
    add_adapters(base, config, torch.device("cpu"))
    try:
        load_adapter_state_dict(base.unet, base.text_encoders, state)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"the weights of step {chosen} do not fit {config.model.name} with these LoRA settings "
                            f"({str(exc).splitlines()[0][:160]}); pass the run's base model with --model") from None
    grid = run_dir / EVAL_DIR / f"step-{chosen:06d}.png"
    resolution = config.data.resolution or base.default_resolution
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    save_output(out, base, config, resolution, started, grid if grid.is_file() else None)
    progress(ProgressEvent("save", message=f"wrote {out} (step {chosen})"))
    return ExportResult(out, chosen, kept[chosen])


def _choose_step(step: int | str | None, kept: dict[int, Path], recommended: int | None, run_dir: Path) -> int:
    available = ", ".join(map(str, sorted(kept)))
    if step is None:
        step = "best" if recommended is not None else "latest"
    if step == "latest":
        return max(kept)
    if step == "best":
        if recommended is None:
            raise ConfigError(f"--step best: no step of '{run_dir}' was scored (train with --eval-every N); "
                              f"kept steps: {available}")
        step = recommended
    try:
        number = int(step)
    except (TypeError, ValueError):
        raise ConfigError(f"--step must be a step number, best or latest (got '{step}')") from None
    if number not in kept:
        raise ConfigError(f"--step {number}: '{run_dir}' keeps steps {available} (older checkpoints are deleted: "
                          "--keep-checkpoints, --eval-every keep more)")
    return number
