"""LLaVA-1.5 adapter (`LlavaForConditionalGeneration`)."""

from __future__ import annotations

import torch
from torch import nn

from mmict.backbones.base import Backbone


class LlavaBackbone(Backbone):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"

    @property
    def _config(self):
        return self.model.config

    @property
    def image_tokens_per_image(self) -> int:
        vision = self._config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        # "default" drops the CLS token; "full" keeps it.
        return patches + (1 if self._config.vision_feature_select_strategy == "full" else 0)

    @property
    def decoder_layer_cls(self) -> type[nn.Module]:
        return type(self.model.model.language_model.layers[0])

    def embed_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.model.get_image_features(
            pixel_values=self.stack_same_shape(images),
            vision_feature_layer=self._config.vision_feature_layer,
            vision_feature_select_strategy=self._config.vision_feature_select_strategy,
            return_dict=True,
        )
        return list(out.pooler_output)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.language_model.norm(hidden)
