"""Train the toy oracle (oracle.py): `python -m dreamlora.toyworld.train_oracle --out DIR`.

Data, all drawn here from fixed seeds:
- toy-world scenes (world.py): labels for class, colour and background; for the subject detector
  (white dots on a ball) negatives, except the dotted world's balls with white dots;
- plain red balls (and for the dotted world's oracle red balls with dots of another colour): the
  hardest negatives, the subject without its dots or with the wrong ones;
- polka-dot balls (subject.py) at random places, sizes and rotations on the world's backgrounds:
  the positives; most are the subject's red, some other colours, so the head learns the dots;
- distractors, also negatives: blotchy noise (what a broken model renders), white dots off a ball
  (on the background, or on cubes, cups and stars), and plain balls with a big highlight or one
  white spot, so that only a pattern of dots on a ball counts.

Model renders are blurrier and noisier than drawings, so every batch is augmented: a small shift,
down-and-up scaling, Gaussian blur, colour jitter and noise. The run takes a few minutes on one CPU
thread and writes model.safetensors, config.json and TRAIN_LOG.md (held-out accuracies) into DIR.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .oracle import OracleConfig, OracleNet, save_oracle, uint8_to_tensor
from .subject import BALL_RED, DOT_WHITE, draw_polka_ball, random_polka_ball
from .world import BACKGROUNDS, COLORS, Scene, allowed_pairs, draw_scene, random_placement, random_scene
from .world import dot_colors as world_dot_colors


IGNORE = -100  # label of a head with nothing to name (noise pictures): cross_entropy skips it


@dataclass
class TrainSettings:
    world: int = 7000  # toy-world scenes
    red_balls: int = 1000  # plain red balls (hard negatives)
    polka: int = 3000  # polka-dot balls (positives)
    textures: int = 800  # blotchy noise pictures (negatives: a broken model's renders)
    dotted: int = 1000  # dots off a ball: on the background, or on cubes, cups and stars (negatives)
    glossy: int = 1500  # plain balls with a big highlight or one white spot (negatives)
    other_dots: int = 0  # red balls with dots of another colour than white (negatives; the dotted world's oracle)
    dotted_share: float = 0.0  # the world's share of dotted objects (world.py; 0: the plain world)
    other_color_share: float = 0.2  # of the positives: dotted balls in another colour than red
    steps: int = 700
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    held_out: int = 1000  # held-out world scenes (other seeds)
    held_out_subject: int = 400  # held-out red polka-dot balls, and as many plain red balls


@dataclass
class DrawnSet:
    """Images and labels: (N, 64, 64, 3) uint8 and (N,) int64 label indices; subject is 0/1."""

    images: np.ndarray
    cls: np.ndarray
    color: np.ndarray
    background: np.ndarray
    subject: np.ndarray

    @staticmethod
    def concat(sets: list[DrawnSet]) -> DrawnSet:
        return DrawnSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in DrawnSet.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.images)


# --- data ----------------------------------------------------------------------------------------


def _labelled(config: OracleConfig, images: list, scenes: list[tuple[str | None, str | None, str | None]],
              subject: int | list[int]) -> DrawnSet:
    """Images and label indices; a None name (nothing to name) becomes IGNORE, which the loss skips."""

    def index(names: tuple[str, ...], name: str | None) -> int:
        return IGNORE if name is None else names.index(name)

    return DrawnSet(
        images=np.stack([np.asarray(im, dtype=np.uint8) for im in images]),
        cls=np.array([index(config.classes, c) for c, _, _ in scenes], dtype=np.int64),
        color=np.array([index(config.colors, c) for _, c, _ in scenes], dtype=np.int64),
        background=np.array([index(config.backgrounds, b) for _, _, b in scenes], dtype=np.int64),
        subject=np.broadcast_to(np.asarray(subject, dtype=np.int64), (len(images),)).copy(),
    )


def draw_world(config: OracleConfig, n: int, seed: int, dotted_share: float = 0.0) -> DrawnSet:
    """`n` random toy-world scenes; in the dotted world, the balls with white dots count for the subject
    detector (never red ones: no world draws the subject)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, dotted_share) for _ in range(n)]
    return _labelled(config, [draw_scene(s, config.image_size) for s in scenes],
                     [(s.cls, s.color, s.background) for s in scenes],
                     [int(s.cls == "ball" and s.dots == "white") for s in scenes])


def draw_other_dots(config: OracleConfig, n: int, seed: int) -> DrawnSet:
    """`n` red balls (a share darker) with dots of another colour than white: the subject's pattern, wrong dots."""
    rng = np.random.default_rng(seed)
    backgrounds = [b for c, b in allowed_pairs() if c == "red"]
    dot_colors = world_dot_colors("ball", "red")  # never white: that is the subject
    images, labels = [], []
    for _ in range(n):
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        dots = tuple(float(v) for v in COLORS[dot_colors[int(rng.integers(len(dot_colors)))]])
        rgb = BALL_RED if rng.random() >= 0.3 else tuple(v * float(rng.uniform(0.55, 0.9)) for v in BALL_RED)
        images.append(random_polka_ball(rng, BACKGROUNDS[background], size=config.image_size, size_range=(0.3, 0.72),
                                        ball_color=rgb, dot_color=dots))
        labels.append(("ball", "red", background))
    return _labelled(config, images, labels, 0)


def draw_red_balls(config: OracleConfig, n: int, seed: int) -> DrawnSet:
    """`n` plain red balls on the backgrounds the world allows for red: the subject without its dots."""
    rng = np.random.default_rng(seed)
    backgrounds = [b for c, b in allowed_pairs() if c == "red"]
    scenes = []
    for _ in range(n):
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        scenes.append(Scene("ball", "red", background, *random_placement(rng)))
    return _labelled(config, [draw_scene(s, config.image_size) for s in scenes],
                     [(s.cls, s.color, s.background) for s in scenes], 0)


def draw_polka(config: OracleConfig, n: int, seed: int, other_color_share: float, dark_share: float = 0.3) -> DrawnSet:
    """`n` polka-dot balls: the subject's red (a share of them darker), or (a share) another visible world colour."""
    rng = np.random.default_rng(seed)
    pairs = [(c, b) for c, b in allowed_pairs() if c != "white"]  # white dots on a white ball would vanish
    red_backgrounds = [b for c, b in pairs if c == "red"]
    images, labels = [], []
    for _ in range(n):
        if rng.random() < other_color_share:
            color, background = pairs[int(rng.integers(len(pairs)))]
        else:
            color, background = "red", red_backgrounds[int(rng.integers(len(red_backgrounds)))]
        rgb = BALL_RED if color == "red" else tuple(float(v) for v in COLORS[color])
        if color == "red" and rng.random() < dark_share:  # model renders often shade the ball darker
            rgb = tuple(v * float(rng.uniform(0.55, 0.9)) for v in rgb)
        images.append(random_polka_ball(rng, BACKGROUNDS[background], size=config.image_size, size_range=(0.3, 0.72),
                                        ball_color=rgb))
        labels.append(("ball", color, background))
    return _labelled(config, images, labels, 1)


def draw_glossy_balls(config: OracleConfig, n: int, seed: int) -> DrawnSet:
    """`n` plain balls drawn like the subject but without dots, with a bigger highlight or one white spot.

    The hardest negatives: a dark red ball with a large white highlight is what a half-trained
    model draws, and one white spot is not a polka-dot pattern. Most are red (often darker), some
    another colour.
    """
    rng = np.random.default_rng(seed)
    side = config.image_size
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    pairs = [(c, b) for c, b in allowed_pairs() if c != "white"]
    red_backgrounds = [b for c, b in pairs if c == "red"]
    images, labels = [], []
    for _ in range(n):
        if rng.random() < 0.3:
            color, background = pairs[int(rng.integers(len(pairs)))]
        else:
            color, background = "red", red_backgrounds[int(rng.integers(len(red_backgrounds)))]
        rgb = np.asarray(BALL_RED if color == "red" else COLORS[color], dtype=np.float64)
        if color == "red":
            rgb = rgb * float(rng.uniform(0.55, 1.0))
        x, y, diameter = random_placement(rng, (0.3, 0.72))
        cx, cy = x * side, y * side
        r = diameter * side / 2
        # The subject's own renderer with dots the colour of the ball: the same ball, no pattern.
        img = np.asarray(draw_polka_ball(side, BACKGROUNDS[background], (cx, cy), r, rng.uniform(-1, 1, size=4),
                                         rng.integers(-4, 5, size=(side, side)), ball_color=tuple(rgb),
                                         dot_color=tuple(rgb)), dtype=np.float64)
        alpha = np.zeros((side, side))
        if rng.random() < 0.7:  # a larger, softer highlight at the upper left
            hx, hy, hr = cx - 0.35 * r, cy - 0.45 * r, r * float(rng.uniform(0.15, 0.45))
            alpha = np.maximum(alpha, float(rng.uniform(0.4, 1.0)) * np.exp(-2 * ((xs - hx) ** 2 + (ys - hy) ** 2) / hr**2))
        if rng.random() < 0.5:  # one white spot somewhere on the ball
            angle, dist = rng.uniform(0, 2 * np.pi), r * float(rng.uniform(0, 0.65))
            sx, sy, sr = cx + dist * np.cos(angle), cy + dist * np.sin(angle), r * float(rng.uniform(0.2, 0.4))
            alpha = np.maximum(alpha, np.clip((sr - np.hypot(xs - sx, ys - sy)) / 1.5 + 0.5, 0, 1) * 0.9)
        alpha *= np.hypot(xs - cx, ys - cy) < r  # on the ball only
        img = img * (1 - alpha[..., None]) + np.asarray(DOT_WHITE) * alpha[..., None]
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        labels.append(("ball", color, background))
    return _labelled(config, images, labels, 0)


def draw_textures(config: OracleConfig, n: int, seed: int) -> DrawnSet:
    """`n` blotchy noise pictures: what a broken model renders. No object, no background, never the subject.

    Without them the detector calls any spotty texture "polka dots".
    """
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    side = config.image_size
    images = []
    for _ in range(n):
        field = torch.zeros(1, 3, side, side)
        for cells in rng.choice([4, 8, 16, 32], size=int(rng.integers(1, 4)), replace=False).tolist():
            noise = torch.randn(1, 3, cells, cells, generator=g)
            field += float(rng.uniform(0.3, 1.0)) * F.interpolate(noise, size=side, mode="bicubic", align_corners=False)
        grey = float(rng.uniform(0.0, 1.0))  # from colourful to grey blotches
        field = grey * field.mean(1, keepdim=True) + (1 - grey) * field
        rgb = rng.uniform(50, 210, size=3)[:, None, None] + float(rng.uniform(15, 60)) * field[0].numpy()
        rgb += rng.normal(0, float(rng.uniform(0, 12)), size=rgb.shape)
        images.append(np.clip(np.rint(rgb.transpose(1, 2, 0)), 0, 255).astype(np.uint8))
    return _labelled(config, images, [(None, None, None)] * n, 0)


def draw_dotted_distractors(config: OracleConfig, n: int, seed: int) -> DrawnSet:
    """`n` world scenes with white dots where the subject has none: never the subject.

    Half are cubes, cups and stars with dots all over the picture; half are plain balls with dots on
    the background only. So the detector learns dots *on a ball*, not white spots anywhere.
    """
    rng = np.random.default_rng(seed)
    side = config.image_size
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    images, labels = [], []
    for i in range(n):
        on_ball = i % 2 == 1
        scene = random_scene(rng)
        while (scene.cls == "ball") != on_ball or scene.color == "white":
            scene = random_scene(rng)
        img = np.asarray(draw_scene(scene, side), dtype=np.float64)
        alpha = np.zeros((side, side))
        radius_ball = scene.size * side / 2
        for _ in range(int(rng.integers(5, 15))):
            r = float(rng.uniform(1.8, 4.5))
            cx, cy = rng.uniform(0, side, size=2)
            if on_ball and np.hypot(cx - scene.x * side, cy - scene.y * side) < radius_ball + r + 1:
                continue  # keep the ball itself plain
            alpha = np.maximum(alpha, np.clip(r - np.hypot(xs - cx, ys - cy) + 0.5, 0.0, 1.0))
        dot = np.asarray(DOT_WHITE) * float(rng.uniform(0.8, 1.04))
        img = img * (1 - alpha[..., None]) + dot * alpha[..., None]
        images.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        labels.append((scene.cls, scene.color, scene.background))
    return _labelled(config, images, labels, 0)


# --- augmentation ---------------------------------------------------------------------------------


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make drawings look like model renders. x: (N, 3, S, S) in [0, 1] -> the same shape."""
    n, _, s, _ = x.shape

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # Shift by up to 4 px (edges repeated): positions in renders are not the drawings' positions.
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(n)])
    # Down-and-up scaling for 40%: the loss of detail of a VAE that works on a coarser grid.
    coarse = torch.tensor([32, 40, 48])[torch.randint(0, 3, (n,), generator=g)]
    coarse[rand(n) >= 0.4] = 0
    for side in coarse.unique().tolist():
        if side:
            idx = (coarse == side).nonzero().squeeze(1)
            small = F.interpolate(x[idx], size=side, mode="bilinear", antialias=True, align_corners=False)
            x[idx] = F.interpolate(small, size=s, mode="bilinear", align_corners=False)
    # Gaussian blur for 60%, sigma up to 1.2 px: one 5x5 kernel per image, applied as a grouped conv.
    sigma = (rand(n) * 1.2).clamp_min(1e-3) * (rand(n) < 0.6)
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (N, 5)
    k1 = k1 / k1.sum(1, keepdim=True)
    kernel = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3N, 1, 5, 5)
    x = F.conv2d(F.pad(x.reshape(1, 3 * n, s, s), (2, 2, 2, 2), mode="replicate"), kernel, groups=3 * n)
    x = x.reshape(n, 3, s, s)
    # Colour: brightness x0.88-1.12, per-channel gain x0.94-1.06, contrast x0.85-1.15 about the mean.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 0.85 + 0.3 * rand(n, 1, 1, 1)
    gain = (0.88 + 0.24 * rand(n, 1, 1, 1)) * (0.94 + 0.12 * rand(n, 3, 1, 1))
    x = ((x - mean) * contrast + mean) * gain
    # Pixel noise, sigma up to 0.035.
    x = x + torch.randn(x.shape, generator=g) * (0.035 * rand(n, 1, 1, 1))
    return x.clamp(0.0, 1.0)


# --- training -------------------------------------------------------------------------------------


def train_oracle(settings: TrainSettings, config: OracleConfig = OracleConfig(), log=print) -> tuple[OracleNet, dict]:
    """Draw the data, train the oracle, measure it on held-out drawings; returns (net, metrics)."""
    torch.manual_seed(settings.seed)
    g = torch.Generator().manual_seed(settings.seed)
    t0 = time.time()
    s = settings
    data = DrawnSet.concat([draw_world(config, s.world, s.seed + 1, s.dotted_share),
                            draw_red_balls(config, s.red_balls, s.seed + 2),
                            draw_polka(config, s.polka, s.seed + 3, s.other_color_share),
                            draw_textures(config, s.textures, s.seed + 4),
                            draw_dotted_distractors(config, s.dotted, s.seed + 5),
                            draw_glossy_balls(config, s.glossy, s.seed + 6),
                            *([draw_other_dots(config, s.other_dots, s.seed + 7)] if s.other_dots else [])])
    log(f"drew {len(data)} training images in {time.time() - t0:.0f} s")
    images = uint8_to_tensor(data.images)  # (N, 3, 64, 64)
    labels = {k: torch.from_numpy(getattr(data, k)) for k in ("cls", "color", "background", "subject")}

    net = OracleNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.learning_rate, total_steps=s.steps,
                                                   pct_start=0.15)
    net.train()
    t1 = time.time()
    for step in range(s.steps):
        idx = torch.randint(0, len(images), (s.batch_size,), generator=g)
        out = net(augment(images[idx].clone(), g))
        loss = (F.cross_entropy(out.class_logits, labels["cls"][idx], ignore_index=IGNORE)
                + F.cross_entropy(out.color_logits, labels["color"][idx], ignore_index=IGNORE)
                + F.cross_entropy(out.background_logits, labels["background"][idx], ignore_index=IGNORE)
                + F.binary_cross_entropy_with_logits(out.subject_logit, labels["subject"][idx].float()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == s.steps:
            log(f"step {step + 1}/{s.steps}  loss {loss.item():.4f}  ({time.time() - t1:.0f} s)")
    net.eval()
    metrics = evaluate_oracle(net, config, settings, g)
    metrics["train_seconds"] = time.time() - t0
    return net, metrics


@torch.no_grad()
def evaluate_oracle(net: OracleNet, config: OracleConfig, settings: TrainSettings, g: torch.Generator) -> dict:
    """Held-out accuracies (other seeds than training), on clean drawings and on augmented ones."""
    seed = settings.seed + 1000
    world = draw_world(config, settings.held_out, seed, settings.dotted_share)
    polka = draw_polka(config, settings.held_out_subject, seed + 1, 0.0)  # the subject itself: red with white dots
    red = draw_red_balls(config, settings.held_out_subject, seed + 2)
    distractors = {"textures": draw_textures(config, settings.held_out_subject, seed + 3),
                   "dotted": draw_dotted_distractors(config, settings.held_out_subject, seed + 4),
                   "glossy": draw_glossy_balls(config, settings.held_out_subject, seed + 5),
                   "other_dots": draw_other_dots(config, settings.held_out_subject, seed + 6)}
    metrics = {}
    for tag, transform in (("clean", lambda x: x), ("augmented", lambda x: augment(x, g))):
        out = net(transform(uint8_to_tensor(world.images)))
        metrics[f"{tag}/class"] = _accuracy(out.class_logits, world.cls)
        metrics[f"{tag}/color"] = _accuracy(out.color_logits, world.color)
        metrics[f"{tag}/background"] = _accuracy(out.background_logits, world.background)
        world_flags = (out.subject_logit > 0).float()
        world_negative = torch.from_numpy(world.subject == 0)
        world_fp = world_flags[world_negative].mean().item()  # the world's white-dotted balls are positives
        pos = (net(transform(uint8_to_tensor(polka.images))).subject_logit > 0).float()
        neg = (net(transform(uint8_to_tensor(red.images))).subject_logit > 0).float()
        others = {k: (net(transform(uint8_to_tensor(d.images))).subject_logit > 0).float() for k, d in distractors.items()}
        tp = pos.sum().item()
        fp = neg.sum().item() + world_flags[world_negative].sum().item() + sum(o.sum().item() for o in others.values())
        for name, flags in others.items():
            metrics[f"{tag}/subject_on_{name}"] = flags.mean().item()
        metrics[f"{tag}/subject_recall"] = tp / len(polka)
        metrics[f"{tag}/subject_precision"] = tp / max(tp + fp, 1.0)
        metrics[f"{tag}/subject_on_plain_red_balls"] = neg.mean().item()
        metrics[f"{tag}/subject_on_world"] = world_fp
        if (~world_negative).any():  # the dotted world's balls with white dots
            metrics[f"{tag}/white_dots_on_world_balls"] = world_flags[~world_negative].mean().item()
    return metrics


def _accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return (logits.argmax(1) == torch.from_numpy(labels)).float().mean().item()


def write_log(folder: Path, settings: TrainSettings, metrics: dict, config: OracleConfig) -> Path:
    """TRAIN_LOG.md: how the oracle was made and how well it reads held-out drawings."""
    size = (folder / "model.safetensors").stat().st_size
    rows = "\n".join(
        f"| {name} | {metrics[f'clean/{key}']:.1%} | {metrics[f'augmented/{key}']:.1%} |"
        for name, key in (("class accuracy", "class"), ("colour accuracy", "color"),
                          ("background accuracy", "background"), ("subject precision", "subject_precision"),
                          ("subject recall", "subject_recall"),
                          ("subject 'detected' on plain red balls", "subject_on_plain_red_balls"),
                          ("subject 'detected' on world scenes without white dots on a ball", "subject_on_world"),
                          ("white dots detected on the world's white-dotted balls", "white_dots_on_world_balls"),
                          ("subject 'detected' on red balls with other dots", "subject_on_other_dots"),
                          ("subject 'detected' on noise textures", "subject_on_textures"),
                          ("subject 'detected' on dots off a ball", "subject_on_dotted"),
                          ("subject 'detected' on glossy plain balls", "subject_on_glossy"))
        if f"clean/{key}" in metrics)
    text = f"""# Toy oracle: training log

Made by `python -m dreamlora.toyworld.train_oracle --out {folder.name}` (seed {settings.seed}),
{metrics['train_seconds'] / 60:.1f} min on {torch.get_num_threads()} CPU thread(s) ({platform.machine()}, torch {torch.__version__}).
Weights: {size / 1e6:.2f} MB ({sum(p.numel() for p in OracleNet(config).parameters()):,} parameters).

Training data: {settings.world} toy-world scenes ({settings.dotted_share:.0%} with dots), {settings.red_balls} plain red
balls, {settings.polka} polka-dot balls ({settings.other_color_share:.0%} not red), {settings.textures} noise textures, {settings.dotted} scenes with dots off a ball
(on the background, or on cubes, cups and stars), {settings.glossy} plain balls with a big highlight or one white spot
and {settings.other_dots} red balls with black, yellow or blue dots;
{settings.steps} steps of {settings.batch_size}, augmented
(shift, down-up scaling, blur, colour jitter, noise).

Held-out (other seeds): {settings.held_out} world scenes; {settings.held_out_subject} red polka-dot balls (positives) and
{settings.held_out_subject} plain red balls, as many noise textures, dotted scenes and glossy balls, plus the world scenes (negatives) for the subject detector. "augmented" applies the
training augmentation once, as a stand-in for the blur of model renders.

| metric | clean drawings | augmented |
|---|---|---|
{rows}
"""
    path = folder / "TRAIN_LOG.md"
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for model.safetensors, config.json, TRAIN_LOG.md")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 leaves the machine to others)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps, seed=args.seed)
    config = OracleConfig()
    net, metrics = train_oracle(settings, config)
    save_oracle(net, config, args.out)
    log = write_log(args.out, settings, metrics, config)
    print(log.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
