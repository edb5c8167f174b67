"""Idefics2 (`Idefics2ForConditionalGeneration`) and Idefics3 (`Idefics3ForConditionalGeneration`) adapters.

Both image processors may split an image into crops (`do_image_splitting`): Idefics2 into its four
quarters plus the whole image, Idefics3 into a grid of square tiles plus a global view, so an image's
`pixel_values` are (n_crops, C, H, W) with a `pixel_attention_mask` (n_crops, H, W) for padded pixels.
In the prompt the family's processor expands one image into wrapper tokens around the crops' features:

- Idefics2: `<fake_token_around_image>` (`<image>` * image_seq_len `<fake_token_around_image>`) per crop
  (adjacent wrappers merged), image_seq_len = the perceiver resampler's latents;
- Idefics3: per tile `<fake_token_around_image><row_i_col_j>` + `<image>` * image_seq_len, "\\n" after every
  row, then "\\n<fake_token_around_image><global-img>" + `<image>` * image_seq_len + `<fake_token_around_image>`
  (without splitting only the global part); image_seq_len = patches / scale_factor^2 (pixel shuffle).

`embed_images` builds that same string, tokenizes it (so "\\n" is whatever the tokenizer makes of it),
embeds it with the LM's table and puts the model's own image features (`get_image_features`: vision tower
+ connector) at the `<image>` positions, exactly as the model's `inputs_merger` does.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from PIL import Image as PILImage
from torch import nn

from mmict.backbones.base import Backbone, ImageTransform
from mmict.segments import Pixels

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


class IdeficsImageTransform(ImageTransform):
    """PIL image -> {"pixel_values": (n_crops, C, H, W), "pixel_attention_mask": (n_crops, H, W)} (+ the
    split's "rows"/"cols" for Idefics3, which lay out the prompt)."""

    row_col_info = False

    def __init__(self, image_processor: Any, image_splitting: bool | None = None) -> None:
        super().__init__(image_processor)
        # None: the processor's own `do_image_splitting`; False: the whole image only (the base view).
        self.image_splitting = image_splitting

    def __call__(self, image: PILImage.Image) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"return_row_col_info": True} if self.row_col_info else {}
        if self.image_splitting is not None:
            kwargs["do_image_splitting"] = self.image_splitting
        out = self.image_processor(images=image.convert("RGB"), return_tensors="pt", **kwargs)
        pixels = out["pixel_values"][0]
        mask = out.get("pixel_attention_mask")
        # Without do_pad the processor gives no mask: every pixel of a lone image is real.
        mask = mask[0] if mask is not None else torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long)
        result = {"pixel_values": pixels, "pixel_attention_mask": mask.long()}
        if self.row_col_info:
            for key in ("rows", "cols"):  # nested lists [[n]] (or a tensor of them) for one image
                result[key] = torch.as_tensor(out[key]).reshape(-1)[0].long()
        return result


class Idefics3ImageTransform(IdeficsImageTransform):
    row_col_info = True


class _IdeficsBackbone(Backbone):
    """What Idefics2 and Idefics3 share: crops batched through `get_image_features`, a token layout per image."""

    image_transform_class = IdeficsImageTransform

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def image_seq_len(self) -> int:
        """`<image>` tokens per crop: what the connector makes of one crop."""
        raise NotImplementedError

    def image_layout(self, image: dict[str, torch.Tensor]) -> str:
        """The text the family's processor puts in the prompt for this image (with `<image>` placeholders)."""
        raise NotImplementedError

    @cached_property
    def _layout_ids_cache(self) -> dict[str, list[int]]:
        return {}

    def _layout_ids(self, layout: str) -> list[int]:
        # Every image with the same crop layout has the same token string: tokenize each layout once.
        if layout not in self._layout_ids_cache:
            self._layout_ids_cache[layout] = self.tokenizer(layout, add_special_tokens=False)["input_ids"]
        return self._layout_ids_cache[layout]

    @property
    def image_tokens_per_image(self) -> int:
        return self._tokens_at_default_size

    def image_token_count(self, pixels: Pixels) -> int:
        """The length of the image's tokenized layout (wrapper tokens + `<image>` per crop), which `embed_images`
        fills: it depends on the crop count (Idefics2) or the split's rows and cols (Idefics3)."""
        if not isinstance(pixels, dict):
            raise TypeError(f"{self.family} images are dicts of the processor's outputs: preprocess them with "
                            "backbone.image_transform")
        return len(self._layout_ids(self.image_layout(pixels)))

    @property
    def has_multi_view(self) -> bool:
        return bool(getattr(self.image_processor, "do_image_splitting", False))

    @cached_property
    def base_view_transform(self) -> ImageTransform:
        """The processor without image splitting: the whole image alone (Idefics2: 1 crop instead of 4 + 1;
        Idefics3: the global view, without the row/col tiles)."""
        return self.image_transform_class(self.image_processor, image_splitting=False)

    @cached_property
    def _tokens_at_default_size(self) -> int:
        return len(self._layout_ids(self.image_layout(self._default_image())))

    def _default_image(self) -> dict[str, torch.Tensor]:
        """Per-image inputs (shapes only matter) of a square image at the processor's default size."""
        raise NotImplementedError

    def embed_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        if not all(isinstance(img, dict) and "pixel_values" in img for img in images):
            raise TypeError(f"{self.family} images need `pixel_values` (+ `pixel_attention_mask`): preprocess "
                            "them with backbone.image_transform")
        features = self._image_features(images)
        layouts = [torch.tensor(self._layout_ids(self.image_layout(img)), device=self.device) for img in images]
        embeds = torch.split(self.embed_tokens(torch.cat(layouts)), [len(ids) for ids in layouts])
        out = []
        for ids, emb, feats in zip(layouts, embeds, features):
            is_image = ids == self.config.image_token_id
            if int(is_image.sum()) != feats.shape[0]:
                raise RuntimeError(
                    f"{self.family}: the prompt layout has {int(is_image.sum())} image tokens but the model made "
                    f"{feats.shape[0]} features; the processor's image_seq_len ({self.image_seq_len}) does not match "
                    "the model config"
                )
            # As the model's inputs_merger: image features in order at the <image> positions.
            out.append(emb.masked_scatter(is_image[:, None], feats.to(emb.dtype)))
        return out

    def _image_features(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """(n_crops_i * image_seq_len, D) per image, all crops in one vision-tower call.

        Images are batched as the HF processor batches them: crops zero-padded to the largest height and width
        (their `pixel_attention_mask` marks the real pixels) and to the most crops (all-zero crops, which the
        model drops)."""
        pixels = [img["pixel_values"] for img in images]
        masks = [img.get("pixel_attention_mask") for img in images]
        masks = [m if m is not None else torch.ones(p.shape[0], *p.shape[-2:], dtype=torch.long, device=p.device)
                 for p, m in zip(pixels, masks)]
        n_crops = max(p.shape[0] for p in pixels)
        height, width = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
        batch = pixels[0].new_zeros((len(pixels), n_crops, pixels[0].shape[1], height, width))
        batch_mask = masks[0].new_zeros((len(pixels), n_crops, height, width))
        for i, (p, m) in enumerate(zip(pixels, masks)):
            batch[i, : p.shape[0], :, : p.shape[-2], : p.shape[-1]] = p
            batch_mask[i, : m.shape[0], : m.shape[-2], : m.shape[-1]] = m
        out = self.model.get_image_features(pixel_values=batch, pixel_attention_mask=batch_mask)
        features = list(out.pooler_output)
        for p, f in zip(pixels, features):
            if f.shape[0] != p.shape[0] * self.image_seq_len:
                # get_image_features drops all-zero crops as padding; a real crop that is exactly zero would go too.
                raise RuntimeError(f"{self.family}: {p.shape[0]} crops gave {f.shape[0]} image features, expected "
                                   f"{p.shape[0] * self.image_seq_len} (an all-zero crop is taken for padding)")
        return features


class Idefics2Backbone(_IdeficsBackbone):
    family = "idefics2"
    model_class = "Idefics2ForConditionalGeneration"

    # Idefics2Processor merges the wrappers of adjacent images ("<fake><fake>" -> "<fake>"): an image right after
    # another starts at its first <image> token.
    adjacent_image_shared_rows = 1

    @property
    def image_seq_len(self) -> int:
        return self.config.perceiver_config.resampler_n_latents

    def text_after_image(self, text: str) -> str:
        """Idefics2Processor puts a space between an image's closing wrapper and a word right after it (anything but
        whitespace or "<"), "so words stay word-boundary aligned"."""
        return text if text[:1].isspace() or text.startswith("<") else " " + text

    def image_layout(self, image: dict[str, torch.Tensor]) -> str:
        # Idefics2Processor: one wrapped block per crop (5 with splitting), then adjacent wrappers merged.
        crop = f"{FAKE_TOKEN}{IMAGE_TOKEN * self.image_seq_len}{FAKE_TOKEN}"
        return (crop * image["pixel_values"].shape[0]).replace(FAKE_TOKEN * 2, FAKE_TOKEN)

    def _default_image(self) -> dict[str, torch.Tensor]:
        n_crops = 5 if getattr(self.image_processor, "do_image_splitting", False) else 1
        return {"pixel_values": torch.empty(n_crops, 0, 0, 0)}


class Idefics3Backbone(_IdeficsBackbone):
    family = "idefics3"
    model_class = "Idefics3ForConditionalGeneration"
    image_transform_class = Idefics3ImageTransform

    @property
    def image_seq_len(self) -> int:
        vision = self.config.vision_config
        return int((vision.image_size // vision.patch_size) ** 2 / self.config.scale_factor**2)

    def image_layout(self, image: dict[str, torch.Tensor]) -> str:
        if "rows" not in image or "cols" not in image:
            raise TypeError("Idefics3 images need the split's `rows` and `cols`: preprocess them with "
                            "backbone.image_transform")
        rows, cols = int(image["rows"]), int(image["cols"])
        # Idefics3Processor.replace_image_token, character for character.
        tiles = "".join(
            "".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{IMAGE_TOKEN * self.image_seq_len}" for c in range(cols))
            + "\n"
            for r in range(rows)
        )
        global_view = f"{FAKE_TOKEN}{GLOBAL_IMAGE_TOKEN}{IMAGE_TOKEN * self.image_seq_len}{FAKE_TOKEN}"
        return f"{tiles}\n{global_view}" if rows or cols else global_view

    def _default_image(self) -> dict[str, torch.Tensor]:
        longest = self.image_processor.size["longest_edge"]
        _, rows, cols = self.image_processor.get_number_of_image_patches(longest, longest, {})
        return {"rows": torch.tensor(rows), "cols": torch.tensor(cols)}
