"""LLaVA-NeXT adapter (`LlavaNextForConditionalGeneration`): AnyRes tiling of every image.

The image processor cuts an image into the base view plus the tiles of the best-fitting grid pinpoint
(a per-image `pixel_values` of shape (tiles, C, H, W) and its `image_sizes`); the model packs their
features with the unpadding and newline tokens LLaVA-NeXT was trained with. The number of image
tokens therefore depends on the image's size and aspect ratio.
"""

from __future__ import annotations

from functools import cached_property

import torch
from PIL import Image as PILImage

from mmict.backbones.llava import LlavaBackbone


class LlavaNextBackbone(LlavaBackbone):
    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"

    @cached_property
    def _tokens_at_default_size(self) -> int:
        size = self.config.vision_config.image_size
        blank = self.image_transform(PILImage.new("RGB", (size, size)))
        with torch.no_grad():
            return self.embed_images([self.to_model(blank)])[0].shape[0]

    @property
    def image_tokens_per_image(self) -> int:
        """Tokens of a square image at the vision tower's size (others differ: AnyRes)."""
        return self._tokens_at_default_size

    def embed_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        if not all(isinstance(img, dict) and {"pixel_values", "image_sizes"} <= img.keys() for img in images):
            raise TypeError("LLaVA-NeXT images need `pixel_values` and `image_sizes`: preprocess them with "
                            "backbone.image_transform")
        # Tiles of every image in one vision-tower call; the model splits and packs them per image.
        out = self.model.get_image_features(
            pixel_values=torch.cat([img["pixel_values"] for img in images]),
            image_sizes=torch.stack([img["image_sizes"] for img in images]),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(out.pooler_output)
