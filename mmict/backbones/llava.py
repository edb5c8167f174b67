"""LLaVA-1.5 adapter (`LlavaForConditionalGeneration`)."""

from __future__ import annotations

import torch

from mmict.backbones.base import Backbone


class LlavaBackbone(Backbone):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"

    @property
    def image_tokens_per_image(self) -> int:
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        # "default" drops the CLS token; "full" keeps it.
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def embed_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.model.get_image_features(
            pixel_values=self.stack_same_shape(images),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(out.pooler_output)
