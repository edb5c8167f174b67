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

    # ---- MMICT: the vision tower's features, without LLaVA's projector ---------------------------
    def _feature_layers(self) -> list[int]:
        layer = self.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def vision_hidden_size(self) -> int:
        return self.config.vision_config.hidden_size * len(self._feature_layers())

    def vision_features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states LLaVA's projector reads (its feature layer(s), CLS dropped under "default")."""
        out = self.model.model.vision_tower(self.stack_same_shape(images), output_hidden_states=True,
                                            return_dict=True)
        feats = torch.cat([out.hidden_states[layer] for layer in self._feature_layers()], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return list(feats)
