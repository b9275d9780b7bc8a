"""The toy world and the built-in model `builtin:toy` pretrained on it.

- world.py: procedurally drawn scenes (one plain object on a background) and their captions;
- pretrain.py: the script that trains the shipped model (`python -m dreamlora.toyworld.pretrain`).
"""

from .world import BACKGROUNDS, CLASSES, COLORS, Scene, caption, dataset, draw_scene, object_mask, random_scene

__all__ = ["BACKGROUNDS", "CLASSES", "COLORS", "Scene", "caption", "dataset", "draw_scene", "object_mask",
           "random_scene"]
