"""LLaVA-NeXT adapter (`LlavaNextForConditionalGeneration`): AnyRes tiling of every image.

The image processor cuts an image into the base view plus the tiles of the best-fitting grid pinpoint
(a per-image `pixel_values` of shape (tiles, C, H, W) and its `image_sizes`); the model packs their
features with the unpadding and newline tokens LLaVA-NeXT was trained with. The number of image
tokens therefore depends on the image's size and aspect ratio.

The base view alone (`base_view_transform`: the first tile only, the whole image resized to the vision
tower's size) is an image of one tile; the model's `pack_image_features` gives such an image its base
features followed by `image_newline`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from PIL import Image as PILImage

from mmict.backbones.base import ImageTransform
from mmict.backbones.llava import LlavaBackbone
from mmict.segments import Pixels


class LlavaNextBaseViewTransform(ImageTransform):
    """PIL image -> {"pixel_values": (1, C, H, W), "image_sizes": (2,)}: the processor's base tile only (its
    first: the resized whole image), without the AnyRes grid tiles."""

    def __call__(self, image: PILImage.Image) -> Pixels:
        out = super().__call__(image)
        return {**out, "pixel_values": out["pixel_values"][:1]}


class LlavaNextBackbone(LlavaBackbone):
    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"

    @cached_property
    def _tokens_at_default_size(self) -> int:
        size = self.config.vision_config.image_size
        return self.image_token_count(self.image_transform(PILImage.new("RGB", (size, size))))

    @property
    def image_tokens_per_image(self) -> int:
        """Tokens of a square image at the vision tower's size (others differ: AnyRes)."""
        return self._tokens_at_default_size

    @property
    def has_multi_view(self) -> bool:
        return True

    @cached_property
    def base_view_transform(self) -> ImageTransform:
        return LlavaNextBaseViewTransform(self.image_processor)

    def _check(self, images: list[Pixels]) -> None:
        if not all(isinstance(img, dict) and {"pixel_values", "image_sizes"} <= img.keys() for img in images):
            raise TypeError("LLaVA-NeXT images need `pixel_values` and `image_sizes`: preprocess them with "
                            "backbone.image_transform (or backbone.base_view_transform)")

    def _grid_tiles(self, image_sizes: torch.Tensor) -> int:
        """Tiles (base included) the processor makes of an image of this size: what the model expects of a full view."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return image_size_to_num_patches(image_sizes.tolist(), self.config.image_grid_pinpoints,
                                         self.config.vision_config.image_size)

    def _tiles(self, pixels: dict[str, torch.Tensor]) -> int:
        """1 (base view) or the full view's tile count; anything else is refused (the packing would be wrong)."""
        tiles = int(pixels["pixel_values"].shape[0])
        if tiles != 1 and tiles != self._grid_tiles(pixels["image_sizes"]):
            raise ValueError(
                f"a LLaVA-NeXT image of size {pixels['image_sizes'].tolist()} has {tiles} tiles: expected "
                f"{self._grid_tiles(pixels['image_sizes'])} (backbone.image_transform) or 1 (base_view_transform)")
        return tiles

    def image_token_count(self, pixels: Pixels) -> int:
        """From the tile count and image size (`anyres_token_count`); no vision forward."""
        self._check([pixels])
        height, width = (int(v) for v in pixels["image_sizes"].tolist())
        return anyres_token_count(self.config, height, width, base_only=self._tiles(pixels) == 1,
                                  newline=getattr(self.model.model, "image_newline", None) is not None)

    def embed_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        self._check(images)
        if any(self._tiles(img) == 1 for img in images):
            return self._embed_views(images)
        # Tiles of every image in one vision-tower call; the model splits and packs them per image.
        out = self.model.get_image_features(
            pixel_values=torch.cat([img["pixel_values"] for img in images]),
            image_sizes=torch.stack([img["image_sizes"] for img in images]),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(out.pooler_output)

    def _embed_views(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Base views (one tile) mixed with full views, all tiles in one vision-tower call.

        The model's `get_image_features` cannot take a base view: it infers every image's tile count from
        `image_sizes` (always base + grid), so it would give a one-tile image the next image's tiles. Here the
        tiles go through the same steps (vision tower, feature layer(s), CLS dropped under "default", projector),
        split by each image's own tile count, and the model's `pack_image_features` lays them out.
        """
        inner = self.model.model
        out = inner.vision_tower(torch.cat([img["pixel_values"] for img in images]), output_hidden_states=True,
                                 return_dict=True)
        feats = torch.cat([out.hidden_states[layer] for layer in self._feature_layers()], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = inner.multi_modal_projector(feats)
        per_image = torch.split(feats, [int(img["pixel_values"].shape[0]) for img in images])
        packed, _ = inner.pack_image_features(
            list(per_image), torch.stack([img["image_sizes"] for img in images]),
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=getattr(inner, "image_newline", None),
        )
        return list(packed)


def anyres_token_count(config: Any, height: int, width: int, base_only: bool = False, newline: bool = True) -> int:
    """LM positions of an image of `height` x `width` pixels as LLaVA-NeXT's `pack_image_features` lays it out:
    the base tile's features (+ `image_newline`), then, unless `base_only`, the grid tiles' features unpadded to
    the image's aspect ratio with an `image_newline` after every row. `config`: a `LlavaNextConfig`."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = config.vision_config
    side = vision.image_size // vision.patch_size  # feature rows (and columns) per tile
    base = side**2 + (1 if config.vision_feature_select_strategy == "full" else 0)
    if base_only:
        return base + int(newline)
    rows, cols = get_anyres_image_grid_shape([height, width], config.image_grid_pinpoints, vision.image_size)
    cur_h, cur_w = rows * side, cols * side
    # transformers' `unpad_image` on sizes only (the same float expressions, so the same rounding).
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return base + cur_h * (cur_w + int(newline))
