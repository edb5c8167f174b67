"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) adapters.

Two things set this family apart:
- Dynamic resolution. The image processor resizes each image to a multiple of patch x merge size and
  returns its patches flattened, (n_patches, C*T*P*P), with the patch grid `image_grid_thw` (t, h, w);
  the number of image tokens, h*w / merge**2, depends on the image size. Images of any sizes go
  through the vision tower in one call (patches concatenated, one grid row per image).
- Multimodal rotary positions (M-RoPE). Every position has three ids (temporal, height, width):
  text tokens advance all three together, an image's tokens take their grid coordinates offset by the
  position where the image starts, and the text after an image resumes at start + max(h, w) / merge,
  not at start + number of image tokens. Positions therefore come from the layout (which tokens are
  image tokens, and each image's grid), computed with the model's own `get_rope_index`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from PIL import Image as PILImage

from mmict.backbones.base import Assembled, Backbone, ImageTransform
from mmict.segments import Embeds, Image, Pixels, Segment, Text

# A square image of this side stands for "the default size" in `image_tokens_per_image` (the token
# count of a dynamic-resolution family is per image; 224 is the usual side of benchmark images).
DEFAULT_IMAGE_SIDE = 224


class Qwen2VLImageTransform(ImageTransform):
    """PIL image -> {"pixel_values": (n_patches, C*T*P*P), "image_grid_thw": (3,)}.

    The processor returns one image's patches without a batch dim and its grid as a (1, 3) row; the
    base transform's `[0]` would take a single patch.
    """

    def __call__(self, image: PILImage.Image) -> Pixels:
        out = self.image_processor(images=image.convert("RGB"), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"][0]}


class Qwen2VLBackbone(Backbone):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")  # LM attention (the vision tower uses qkv/proj)
    image_transform_class = Qwen2VLImageTransform

    @property
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    @cached_property
    def _tokens_at_default_size(self) -> int:
        side = DEFAULT_IMAGE_SIDE
        return self.image_token_count(self.image_transform(PILImage.new("RGB", (side, side))))

    def image_token_count(self, pixels: Pixels) -> int:
        """From the patch grid: t*h*w patches merged merge x merge into one token each, + <|vision_start|> and
        <|vision_end|> (what `embed_images` wraps them in)."""
        if not (isinstance(pixels, dict) and "image_grid_thw" in pixels):
            raise TypeError(f"{self.family} images need `image_grid_thw`: preprocess them with "
                            "backbone.image_transform")
        return int(pixels["image_grid_thw"].prod()) // self._merge**2 + 2

    @property
    def base_view_transform(self) -> ImageTransform:
        raise ValueError(
            f"backbone.family={self.family} has no base view: it sees every image once, whole, at its native "
            "resolution (no base image + tiles to drop), so eval.demo_image_view: base does not apply; set "
            "eval.demo_image_view: full for this family (bound its image tokens with the image processor's max_pixels "
            "instead)"
        )

    @property
    def image_tokens_per_image(self) -> int:
        """Positions of a square DEFAULT_IMAGE_SIDE image (wrapper tokens included); other sizes differ."""
        return self._tokens_at_default_size

    @property
    def image_placeholder(self) -> str:
        """An image as Qwen's chat template writes it: <|vision_start|><|image_pad|><|vision_end|> (the processor
        expands the pad; `embed_images` gives the wrappers' rows too)."""
        ids = [self.config.vision_start_token_id, self.config.image_token_id, self.config.vision_end_token_id]
        return "".join(self.tokenizer.convert_ids_to_tokens(ids))

    # ---- images -------------------------------------------------------------------------------
    def embed_images(self, images: list[Pixels]) -> list[torch.Tensor]:
        if not all(isinstance(img, dict) and {"pixel_values", "image_grid_thw"} <= img.keys() for img in images):
            raise TypeError(f"{self.family} images need `pixel_values` and `image_grid_thw`: preprocess them with "
                            "backbone.image_transform")
        # All images' patches in one vision-tower call; the grids tell the tower where each image
        # ends (attention never crosses images) and `get_image_features` splits the merged tokens.
        grids = torch.stack([img["image_grid_thw"] for img in images])
        out = self.model.model.get_image_features(
            pixel_values=torch.cat([img["pixel_values"] for img in images]), image_grid_thw=grids, return_dict=True,
        )
        wrap = self.embed_tokens(torch.tensor([self.config.vision_start_token_id, self.config.vision_end_token_id],
                                              device=self.device))
        # The processor lays an image out as <|vision_start|> + image tokens + <|vision_end|>.
        return [torch.cat([wrap[:1], feats.to(wrap.dtype), wrap[1:]]) for feats in out.pooler_output]

    # ---- positions ----------------------------------------------------------------------------
    def position_ids(self, attention_mask: torch.Tensor, layouts: list[list[tuple[Segment, int]]]) -> torch.Tensor:
        """(4, B, L): text positions (real tokens counted; what the mask builder reads) then the three
        M-RoPE rows from the model's `get_rope_index`.

        Token types follow the processor: image tokens are 1; text, Embeds (fused tokens count as
        text) and the <|vision_start|>/<|vision_end|> wrappers are 0. Padding is skipped, so a padded
        prompt gets the positions it has alone.
        """
        device = attention_mask.device
        token_types = torch.zeros_like(attention_mask)
        grids: list[torch.Tensor] = []
        for b, layout in enumerate(layouts):
            types: list[torch.Tensor] = []
            for seg, n in layout:
                t = torch.zeros(n, dtype=attention_mask.dtype)
                if isinstance(seg, Image):
                    t[1 : n - 1] = 1  # between the two wrapper tokens
                    grids.append(seg.pixels["image_grid_thw"].to(device))
                elif not isinstance(seg, (Text, Embeds)):
                    raise TypeError(f"not a segment: {type(seg).__name__}")
                types.append(t)
            real = attention_mask[b].bool()
            token_types[b, real] = torch.cat(types).to(device) if types else token_types.new_zeros(0)
        rope, _ = self.model.model.get_rope_index(
            torch.zeros_like(attention_mask),  # only its shape and device are read: the types say what is what
            mm_token_type_ids=token_types,
            image_grid_thw=torch.stack(grids) if grids else None,
            attention_mask=attention_mask,
        )
        text = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return torch.cat([text[None], rope.to(text.dtype)], dim=0)

    # ---- running ------------------------------------------------------------------------------
    def _forget_rope_deltas(self) -> None:
        # The model caches M-RoPE deltas of its last HF-computed prompt (`model.model.rope_deltas`) and
        # reuses them to place tokens when no position ids are given. We always give (4, B, L) ids, so
        # they are never needed; clearing them makes sure a stale value from another call (another
        # batch size, another prompt) can never be applied.
        self.model.model.rope_deltas = None

    def forward(self, batch: Assembled, output_hidden_states: bool = False, with_loss: bool = False) -> Any:
        self._forget_rope_deltas()
        return super().forward(batch, output_hidden_states=output_hidden_states, with_loss=with_loss)

    @torch.no_grad()
    def generate_from(self, batch: Assembled, max_new_tokens: int = 8, **generate_kwargs: Any) -> list[str]:
        # generate extends every row of the (4, B, L) ids by +1 per new token: a new text token sits one
        # past the previous one on all three M-RoPE axes, which is what HF's rope_deltas give too.
        self._forget_rope_deltas()
        try:
            return super().generate_from(batch, max_new_tokens, **generate_kwargs)
        finally:
            self._forget_rope_deltas()


class Qwen2_5_VLBackbone(Qwen2VLBackbone):
    """Qwen2.5-VL: windowed-attention vision tower with an MLP merger; same layout and M-RoPE for
    images (its `get_rope_index` also takes `second_per_grid_ts`, for videos only, passed by keyword here)."""

    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
