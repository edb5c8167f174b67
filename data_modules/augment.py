"""Training image augmentation as MMICT's reference trains (LAVIS's `blip2_image_train` processor).

KDEGroup/MMICT, lavis/processors/blip_processors.py lines 73-91: `RandomResizedCrop(image_size, scale=(0.5, 1.0),
interpolation=BICUBIC)` then `RandomHorizontalFlip()`, per image (a video's frames each), before normalisation.
The crop box is drawn by torchvision's `RandomResizedCrop.get_params` algorithm (10 tries at a random area and
log-uniform aspect ratio in [3/4, 4/3], else a centre crop), but from the training stream's own generator instead of
torch's global one, so a resumed stream draws the same crops. The backbone's own transform (resize, normalise) then
runs on the augmented image as on any other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps

AUGMENTATIONS = ("none", "mmict_reference")


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height): torchvision's RandomResizedCrop.get_params, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height  # fallback: the centre crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ReferenceAugment:
    """PIL image -> random resized crop (to `size`, bicubic) -> random horizontal flip -> `transform`."""

    def __init__(self, transform: Callable[[Image.Image], Any], size: int, rng: random.Random) -> None:
        self.transform, self.size, self.rng = transform, size, rng

    def __call__(self, image: Image.Image) -> Any:
        left, top, w, h = crop_box(image.width, image.height, self.rng)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if self.rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return self.transform(image)


def transform_size(image_transform: Any) -> int:
    """The square side the backbone's image processor resizes to (BLIP-2: 224): the reference crops to it."""
    size = getattr(getattr(image_transform, "image_processor", None), "size", None)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if not isinstance(size, int):
        raise ValueError("data.augment=mmict_reference crops to the backbone's image size, which its image processor "
                         f"does not state as a number (size={size!r}); use data.augment=none")
    return size


__all__ = ["AUGMENTATIONS", "ReferenceAugment", "crop_box", "transform_size"]
