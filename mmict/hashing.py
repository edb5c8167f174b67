"""Content hashes of tensors and preprocessed images: what the demonstration bank (`mmict.bank`) and the
vision-feature cache (`mmict.backbones.vision_cache`) key stored tensors by, and check them with. One place, so that
the two can never hash the same image two ways."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (any dtype, bf16 included) without a copy when it is already contiguous on CPU."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_checksum(t: torch.Tensor) -> str:
    """A tensor's shape, dtype and bytes, hashed: the checksum stored beside it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(tensor_bytes(t))
    return h.hexdigest()


def update_with_pixels(h: Any, pixels: Any) -> None:
    """Feed one preprocessed image to hash `h`: every tensor's shape, dtype and bytes (dict keys sorted; a video's
    frames in order)."""
    if torch.is_tensor(pixels):
        h.update(f"T{tuple(pixels.shape)}{pixels.dtype}".encode())
        h.update(tensor_bytes(pixels))
    elif isinstance(pixels, dict):
        for key in sorted(pixels):
            h.update(f"K{key}".encode())
            update_with_pixels(h, pixels[key])
    elif isinstance(pixels, list | tuple):  # video frames
        h.update(f"L{len(pixels)}".encode())
        for item in pixels:
            update_with_pixels(h, item)
    else:
        raise TypeError(f"cannot hash an image of type {type(pixels).__name__}: preprocess images with "
                        "backbone.image_transform")


def pixels_hash(pixels: Any) -> str:
    """The content hash of one preprocessed image."""
    h = hashlib.blake2b(digest_size=16)
    update_with_pixels(h, pixels)
    return h.hexdigest()


def update_with_weight_samples(h: Any, named: Iterable[tuple[str, torch.Tensor]], sample: int = 4096) -> None:
    """Feed hash `h` the name, shape, dtype and first and last `sample` elements of each weight: a model's identity
    that is exact for any retrained or rebuilt model in practice, in milliseconds for a 7B model (hashing every byte
    would take tens of seconds)."""
    with torch.no_grad():
        for name, t in named:
            flat = t.detach().reshape(-1)
            part = flat if flat.numel() <= 2 * sample else torch.cat([flat[:sample], flat[-sample:]])
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(tensor_bytes(part))


def tensors_stamp(named: Iterable[tuple[str, torch.Tensor]]) -> tuple:
    """Changes when a tensor is replaced, moved, re-typed or written in place (in-place writes bump `_version`): what
    says, without reading a byte, that a hash of them must be computed again."""
    def version(t: torch.Tensor) -> int:
        try:
            return t._version
        except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be written in place)
            return -1

    return tuple((name, t.data_ptr(), t.dtype, version(t)) for name, t in named)
