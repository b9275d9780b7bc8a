"""The toy oracle: a small CNN that reads 64 px pictures of the toy world.

It plays, for `builtin:toy`, the roles that people and DINO play in the DreamBooth paper's
evaluation (dreamlora/evaluation.py):

- three heads name the object's class, its colour and the background (is the prompt obeyed?);
- one binary head detects the sample subject's distinctive feature, white polka dots on a ball;
  with the class and colour heads saying "red ball", and the pixels showing one round red object with
  separate white dots (shapes.py: the network alone also fires on crumpled red-and-white shapes), it
  reads "the subject", which the world never draws (is the subject there?);
- its penultimate layer, L2-normalised, is an image embedding: cosine similarity between the
  embeddings of renders and of the instance photos stands in for the paper's DINO score.

The weights ship in dreamlora/builtin_models/toy_oracle/ (model.safetensors + config.json, about
1 MB) and are made by `python -m dreamlora.toyworld.train_oracle --out DIR`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ModelLoadError
from .shapes import ShapeReading, read_shape, shows_subject_shape
from .world import BACKGROUNDS, CLASSES, COLORS

ORACLE_DIR = Path(__file__).resolve().parent.parent / "builtin_models" / "toy_oracle"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class OracleConfig:
    """The network's shape and the names behind each head's outputs (saved as config.json)."""

    image_size: int = 64  # input side; other sizes are resized to it
    channels: tuple[int, ...] = (32, 32, 64, 128, 128)  # conv widths; the first conv has stride 2
    embed_dim: int = 128  # the embedding (penultimate layer) width
    classes: tuple[str, ...] = CLASSES
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    subject: str = "white polka dots on a ball"  # what the binary head detects
    # What a person calls the subject: the dots on a ball of this class and colour (dreamlora.evaluation).
    subject_class: str = "ball"
    subject_color: str = "red"
    subject_threshold: float = 0.5  # probability above which the subject counts as detected
    # The pixels' test (shapes.py), set on 400 drawings of the subject: 95-98 % of them are at least this round (rim
    # dots closed in), and the subject carries several dots where a plain ball shows one highlight ...
    subject_min_roundness: float = 0.78
    subject_min_dots: int = 2
    # ... and no white mark longer, and no more of the ball white, than on any of those drawings (longest 0.42 of the
    # diameter, white 0.26 of the ball): a bar, a worm or a white ball with red marks is not it.
    subject_max_mark: float = 0.45
    subject_max_white: float = 0.28

    def shows_subject_shape(self, reading: ShapeReading) -> bool:
        """The pixels' test with these thresholds."""
        return shows_subject_shape(reading, self.subject_min_roundness, self.subject_min_dots, self.subject_max_mark,
                                   self.subject_max_white)

    @classmethod
    def from_dict(cls, data: dict) -> OracleConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)


@dataclass
class OracleOutput:
    """Raw network outputs for a batch of N images."""

    embedding: torch.Tensor  # (N, embed_dim), L2-normalised
    class_logits: torch.Tensor  # (N, len(classes))
    color_logits: torch.Tensor  # (N, len(colors))
    background_logits: torch.Tensor  # (N, len(backgrounds))
    subject_logit: torch.Tensor  # (N,)


class OracleNet(nn.Module):
    """conv(stride 2) -> conv -> [pool, conv] x 3 -> global average -> linear embedding -> four linear heads."""

    def __init__(self, config: OracleConfig):
        super().__init__()
        layers: list[nn.Module] = []
        widths = (3, *config.channels)
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i >= 2:  # halve the map before every conv after the second: 32 -> 16 -> 8 -> 4 at 64 px
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(config.channels[-1], config.embed_dim), nn.BatchNorm1d(config.embed_dim))
        self.class_head = nn.Linear(config.embed_dim, len(config.classes))
        self.color_head = nn.Linear(config.embed_dim, len(config.colors))
        self.background_head = nn.Linear(config.embed_dim, len(config.backgrounds))
        self.subject_head = nn.Linear(config.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> OracleOutput:
        """x: (N, 3, S, S) RGB in [0, 1]."""
        h = self.embed(self.features((x - 0.5) / 0.25))  # (N, embed_dim)
        return OracleOutput(
            embedding=nn.functional.normalize(h, dim=1),
            class_logits=self.class_head(h),
            color_logits=self.color_head(h),
            background_logits=self.background_head(h),
            subject_logit=self.subject_head(h).squeeze(1),
        )


@dataclass
class OracleReading:
    """What the oracle sees in N images."""

    classes: list[str]
    colors: list[str]
    backgrounds: list[str]
    subject_probability: list[float]
    subject_detected: list[bool]
    embeddings: torch.Tensor = field(repr=False)  # (N, embed_dim), L2-normalised
    shapes: list[ShapeReading] = field(default_factory=list)  # the subject-coloured object, read from the pixels
    subject_shape: list[bool] = field(default_factory=list)  # round, with separate white dots

    def subject_present(self, subject_class: str, subject_color: str) -> list[bool]:
        """What a person requires to call a render the subject: the dot head firing on an object the other heads
        read as the subject's class and colour, and the pixels showing it round with separate white dots (a
        red-and-white crumpled shape, a plain ball's highlight or a white cube with dots is not the subject)."""
        return [bool(dots and shape and cls == subject_class and color == subject_color)
                for dots, shape, cls, color in zip(self.subject_detected, self.subject_shape, self.classes,
                                                   self.colors)]


class Oracle:
    """A loaded oracle: `read` images, or `embed` them."""

    def __init__(self, net: OracleNet, config: OracleConfig):
        self.net = net.eval()
        self.config = config

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image], batch_size: int = 256) -> OracleReading:
        """Class, colour, background, subject and embedding of each image (any size; resized to 64 px)."""
        c = self.config
        outs, shapes = [], []
        for start in range(0, len(images), batch_size):
            pixels = images_to_tensor(images[start:start + batch_size], c.image_size)
            outs.append(self.net(pixels))
            # the pixels' test reads the very pixels the network read
            shapes += [read_shape(rgb, COLORS[c.subject_color]) for rgb in pixels.permute(0, 2, 3, 1).numpy()]
        if not outs:
            return OracleReading([], [], [], [], [], torch.zeros(0, c.embed_dim))
        cat = {name: torch.cat([getattr(o, name) for o in outs])
               for name in ("embedding", "class_logits", "color_logits", "background_logits", "subject_logit")}
        prob = torch.sigmoid(cat["subject_logit"])
        return OracleReading(
            classes=[c.classes[i] for i in cat["class_logits"].argmax(1).tolist()],
            colors=[c.colors[i] for i in cat["color_logits"].argmax(1).tolist()],
            backgrounds=[c.backgrounds[i] for i in cat["background_logits"].argmax(1).tolist()],
            subject_probability=prob.tolist(),
            subject_detected=(prob > c.subject_threshold).tolist(),
            embeddings=cat["embedding"],
            shapes=shapes,
            subject_shape=[c.shows_subject_shape(s) for s in shapes],
        )

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, embed_dim) L2-normalised embeddings."""
        return self.read(images).embeddings


def images_to_tensor(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float in [0, 1]; larger images are area-averaged down, smaller ones bicubic up."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            shrink = image.size[0] > size or image.size[1] > size
            image = image.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return uint8_to_tensor(np.stack(arrays))


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def save_oracle(net: OracleNet, config: OracleConfig, folder: str | Path) -> Path:
    """Write model.safetensors and config.json into `folder` (created if missing)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "kind": "dreamlora-toy-oracle"})
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    return folder


def load_oracle(folder: str | Path | None = None) -> Oracle:
    """Load the oracle from `folder` (default: the shipped one); offline, CPU.

    Raises:
        ModelLoadError: the folder lacks the files or they do not fit together.
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else ORACLE_DIR
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise ModelLoadError(
            f"toy oracle folder '{folder}' lacks {WEIGHTS_FILE} or {CONFIG_FILE}. "
            "Train one with: python -m dreamlora.toyworld.train_oracle --out DIR"
        )
    try:
        config = OracleConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        net = OracleNet(config)
        net.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the toy oracle from '{folder}': {str(exc).splitlines()[0][:200]}") from exc
    return Oracle(net, config)
