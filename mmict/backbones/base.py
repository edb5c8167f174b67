"""The backbone protocol: a frozen MLLM behind one interface.

Every method builds prompts as segments (`mmict.segments`); a backbone adapter turns a batch of
prompts into `inputs_embeds`, attention mask, position ids and labels (`assemble`), runs the frozen
model (`forward`) and generates (`generate`). The assembly is family-independent and lives here;
a family adapter only says how to embed images and tokens and where its parts are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image as PILImage
from torch import nn

from mmict.backbones.context import lm_max_positions
from mmict.segments import Embeds, Image, Pixels, Prompt, Segment, Text

IGNORE_INDEX = -100  # label value the cross-entropy skips (transformers' convention)


@dataclass
class Assembled:
    """A batch of prompts in the language model's input space.

    `spans[b][i]` is the [start, end) range of segment i of prompt b in the padded sequence, so
    callers can pick hidden states at a segment's positions (AIM reads demo text positions).
    """

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    position_ids: torch.Tensor  # (B, L); (4, B, L) for Qwen2-VL's multimodal rotary positions
    labels: torch.Tensor  # (B, L), IGNORE_INDEX outside target segments; not shifted
    spans: list[list[tuple[int, int]]]

    @property
    def context_tokens(self) -> torch.Tensor:
        """Real (non-padding) positions per prompt: what the frozen model attends over."""
        return self.attention_mask.sum(dim=1)


class ImageTransform:
    """PIL image -> one image's model inputs, with the backbone's own image processor.

    Returns the (C, H, W) pixel tensor when the processor gives only pixels, else a dict of this
    image's share of every tensor output (e.g. LLaVA-NeXT's tiles and `image_sizes`). A small picklable
    object (unlike a bound method of the backbone) so DataLoader workers can run it.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: PILImage.Image) -> Pixels:
        out = self.image_processor(images=image.convert("RGB"), return_tensors="pt")
        tensors = {k: v[0] for k, v in out.items() if torch.is_tensor(v)}
        return tensors["pixel_values"] if list(tensors) == ["pixel_values"] else tensors


class Backbone(nn.Module):
    """A frozen multimodal LLM. Subclasses implement the family-specific hooks below."""

    family: str = "base"
    model_class: str = ""  # the transformers class the frozen model loads as
    # Linear layers of the language model that LoRA adapts (the fine-tuning baseline), per family.
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    image_transform_class: type[ImageTransform] = ImageTransform  # a family may slice processor outputs its way

    @classmethod
    def load_processors(cls, name_or_path: str) -> tuple[Any, Any]:
        """(tokenizer, image processor) saved with the model."""
        import transformers

        return (transformers.AutoTokenizer.from_pretrained(name_or_path),
                transformers.AutoImageProcessor.from_pretrained(name_or_path))

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name_or_path: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name_or_path = name_or_path
        self.image_transform = self.image_transform_class(image_processor)
        # The model's chat template (tokenizer's, else the processor's; set by `load_backbone`), used to
        # wrap the query as the model was instruction-tuned; `backbone.chat_template=false` turns it off.
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None)
        self.use_chat_template = True
        self.freeze()

    # ---- family hooks -------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The MLLM's transformers config."""
        return self.model.config

    @property
    def hidden_size(self) -> int:
        """The LM's width (= the fused-token width); an MLLM's config keeps its LM's under `text_config`."""
        return self.config.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        """Decoder layers of the language model (hidden states come as num_layers + 1)."""
        return self.config.text_config.num_hidden_layers

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the segments go to an encoder and the target to a decoder (BLIP-2 with Flan-T5)."""
        return False

    @property
    def image_tokens_per_image(self) -> int:
        """Positions one image takes in the prompt (for dynamic-resolution families: at the default size)."""
        raise NotImplementedError

    def image_token_count(self, pixels: Pixels) -> int:
        """LM positions one `Image(pixels)` takes in `assemble` (what `embed_images` gives it), without running the
        vision tower. Fixed-resolution families (LLaVA-1.5, BLIP-2): always `image_tokens_per_image`; families whose
        count depends on the image (AnyRes tiles, crops, native resolution) compute it from the pixels' metadata."""
        return self.image_tokens_per_image

    @property
    def language_model(self) -> nn.Module:
        """The LLM inside the MLLM (where LoRA goes; the vision tower never gets adapters)."""
        return self.model.model.language_model

    @property
    def decoder_layer_cls(self) -> type[nn.Module]:
        """The LM's decoder layer class (FSDP wrapping and activation checkpointing unit)."""
        return type(self.language_model.layers[0])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def embed_images(self, images: list[Pixels]) -> list[torch.Tensor]:
        """Preprocessed images -> one (n_i, D) tensor each in the LM's input space: everything the
        model's processor puts in a prompt for an image (its wrapper tokens, e.g. Qwen2-VL's
        <|vision_start|>, included). Tensors arrive on the model's device and dtype."""
        raise NotImplementedError

    # ---- frozen vision features (MMICT's M-Hub cross-attends to them) ---------------------------
    @property
    def vision_hidden_size(self) -> int:
        """Width of `vision_features`: the vision tower's, before any projection into the LM."""
        return self.config.vision_config.hidden_size

    def vision_features(self, images: list[Pixels]) -> list[torch.Tensor]:
        """Preprocessed images -> one (n_i, vision_hidden_size) tensor each: the frozen vision tower's patch
        features *before* its output LayerNorm, which MMICT trains as its own copy (`vision_output_norm`)."""
        raise NotImplementedError(
            f"backbone.family={self.family} has no vision_features hook, which MMICT's M-Hub needs; "
            "families with one: blip2, llava"
        )

    def vision_output_norm(self) -> nn.LayerNorm | None:
        """The vision tower's output LayerNorm when `vision_features` leaves it out (the M-Hub starts from a
        copy); None when the family has none to copy."""
        return None

    def position_ids(self, attention_mask: torch.Tensor, layouts: list[list[tuple[Segment, int]]]) -> torch.Tensor:
        """Position ids for a padded batch; `layouts[b]` lists prompt b's segments with their lengths.

        Positions count real tokens only, so a left-padded prompt gets the same positions as unpadded.
        Families with multimodal positions (Qwen2-VL's M-RoPE) override this.
        """
        return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's final normalisation (applied to a non-final layer's hidden states on request)."""
        return self.language_model.norm(hidden)

    # ---- frozen -------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Frozen means: no gradients, eval mode (no dropout), never in an optimizer. LoRA adapters, when a
        method adds them, are the exception: they are the only backbone weights that train."""
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        self.model.eval()

    def train(self, mode: bool = True) -> Backbone:
        # Lightning calls .train() on the whole LightningModule at fit start; the backbone stays in
        # eval mode whatever is asked so dropout never turns on in a frozen model.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ---- tokenization -------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else pad

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def add_special_token(self, token: str) -> int:
        """Make `token` one real token of the tokenizer and the frozen model (MMICT's `<eoc>`); its id.

        A token the tokenizer lacks is added and the embedding tables grow by one row, set to the mean of
        the existing rows (input embeddings, and the output head when it is not tied), so the row is the
        same on every load and the token is never a favoured prediction. Adding it again is a no-op.
        """
        if token in self.tokenizer.get_vocab():
            return self.tokenizer.convert_tokens_to_ids(token)
        self.tokenizer.add_tokens([token], special_tokens=True)  # never split; skipped when decoding
        new_id = self.tokenizer.convert_tokens_to_ids(token)
        old_in = self.model.get_input_embeddings().weight
        out = self.model.get_output_embeddings()
        tied = out is not None and out.weight.data_ptr() == old_in.data_ptr()
        mean_in = old_in.detach().mean(dim=0)
        mean_out = None if out is None or tied else out.weight.detach().mean(dim=0)
        self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        with torch.no_grad():
            self.model.get_input_embeddings().weight[new_id] = mean_in
            if mean_out is not None:
                self.model.get_output_embeddings().weight[new_id] = mean_out
        self.freeze()
        return new_id

    # ---- chat template --------------------------------------------------------------------------
    _CHAT_MARK = "\x00mmict-user-turn\x00"

    def chat_affixes(self) -> tuple[str, str] | None:
        """(text before, text after) the user's turn in the model's chat template, generation prompt
        included; None when the model has no template or it is switched off."""
        if not (self.use_chat_template and self.chat_template):
            return None
        # Rendered once per template, not per query (wrap_query runs on every training prompt).
        cached = getattr(self, "_chat_affixes_cache", None)
        if cached is not None and cached[0] == self.chat_template:
            return cached[1]
        rendered = None
        for content in ([{"type": "text", "text": self._CHAT_MARK}], self._CHAT_MARK):  # list form, then plain
            try:
                rendered = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": content}], chat_template=self.chat_template, tokenize=False,
                    add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - templates differ in the content form they accept
                continue
            if self._CHAT_MARK in rendered:
                break
        if rendered is None or self._CHAT_MARK not in rendered:
            raise ValueError(f"the chat template of {self.name_or_path} could not be rendered with one user turn; "
                             "set backbone.chat_template=false to use plain prompts")
        prefix, suffix = rendered.split(self._CHAT_MARK, 1)
        bos = self.tokenizer.bos_token
        if bos and prefix.startswith(bos):
            prefix = prefix[len(bos):]  # assemble adds BOS itself
        self._chat_affixes_cache = (self.chat_template, (prefix, suffix))
        return prefix, suffix

    def wrap_query(self, prompt: Prompt) -> Prompt:
        """The query prompt (demos, query image, question) as the model's user turn, the target after the
        assistant prefix; unchanged when there is no chat template."""
        affixes = self.chat_affixes()
        if affixes is None:
            return prompt
        prefix, suffix = affixes
        body = [seg for seg in prompt if not (isinstance(seg, Text) and seg.target)]
        target = [seg for seg in prompt if isinstance(seg, Text) and seg.target]
        return [Text(prefix)] * bool(prefix) + body + [Text(suffix)] * bool(suffix) + target

    # ---- views of an image (vanilla ICL may show demos at the base view only) -------------------
    @property
    def has_multi_view(self) -> bool:
        """Whether an image is seen as a base view plus extra views (AnyRes tiles, crops), so `base_view_transform`
        gives fewer tokens than `image_transform`."""
        return False

    @property
    def base_view_transform(self) -> ImageTransform:
        """An image transform (same call as `image_transform`) giving the model's base view only: one image at the
        vision tower's resolution, without the extra tiles or crops. Fixed-resolution families (LLaVA-1.5, BLIP-2)
        have only that view, so it is `image_transform` itself."""
        return self.image_transform

    # ---- context length -------------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        """The language model's usable context in tokens: `max_position_embeddings` of its config, or its attention's
        sliding window where that is smaller and in use; None where the LM has no hard limit. Compare `count_tokens`
        (or `Assembled.context_tokens`) with it before running the LM."""
        return lm_max_positions(self.config)[0]

    @property
    def max_positions_source(self) -> str:
        """Where `max_positions` came from, for reports (e.g. "text_config.max_position_embeddings=4096")."""
        return lm_max_positions(self.config)[1]

    def count_tokens(self, prompt: Prompt, image_tokens: Callable[[Pixels], int] | None = None,
                     add_bos: bool = True) -> int:
        """What `assemble([prompt], add_bos=add_bos).context_tokens[0]` would be, from tokenisation alone: no vision
        tower, no LM. `image_tokens` counts an Image segment's positions (default: `image_token_count`); a caller may
        pass its own, e.g. over placeholder pixels it has counted before."""
        count_image = image_tokens or self.image_token_count
        texts = [seg for seg in prompt if isinstance(seg, Text)]
        # As assemble: tokens without special tokens, + EOS after a text that ends with one.
        total = sum(len(ids) + seg.ends_with_eos for ids, seg in zip(self.tokenize([t.text for t in texts]), texts))
        total += int(add_bos and self.bos_token_id is not None)
        for seg in prompt:
            if isinstance(seg, Image):
                total += int(count_image(seg.pixels))
            elif isinstance(seg, Embeds):
                total += int(seg.embeds.shape[0])
            elif not isinstance(seg, Text):
                raise TypeError(f"not a segment: {type(seg).__name__} (use Text, Image or Embeds)")
        return total

    # ---- assembly -----------------------------------------------------------------------------
    def assemble(
        self, prompts: list[Prompt], padding_side: Literal["left", "right"] = "right", add_bos: bool = True
    ) -> Assembled:
        """Turn a batch of prompts into padded LM inputs.

        All images of the batch go through the vision tower in one call and all text through the
        embedding table in one call; then each prompt is concatenated in segment order. Right padding
        for training, left padding for generation (new tokens then follow the last real token).
        """
        device, dtype = self.device, self.dtype
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []

        texts = [seg.text for p in prompts for seg in p if isinstance(seg, Text)]
        token_ids = self.tokenize(texts)
        text_eos = [seg.ends_with_eos for p in prompts for seg in p if isinstance(seg, Text)]
        token_ids = [ids + [self.eos_token_id] if eos else ids for ids, eos in zip(token_ids, text_eos)]
        pieces_ids = [bos] * len(prompts) + token_ids
        flat = torch.tensor([i for ids in pieces_ids for i in ids], dtype=torch.long, device=device)
        flat_embeds = self.embed_tokens(flat) if flat.numel() else flat.new_zeros((0, self.hidden_size))
        split_embeds = list(torch.split(flat_embeds, [len(ids) for ids in pieces_ids]))
        bos_embeds, text_embeds = split_embeds[: len(prompts)], iter(split_embeds[len(prompts) :])
        text_ids = iter(token_ids)

        images = [seg.pixels for p in prompts for seg in p if isinstance(seg, Image)]
        image_embeds = iter(self._embed_image_list(images))

        rows_embeds: list[torch.Tensor] = []
        rows_labels: list[torch.Tensor] = []
        rows_spans: list[list[tuple[int, int]]] = []
        layouts: list[list[tuple[Segment, int]]] = []
        for b, prompt in enumerate(prompts):
            parts, labels, spans = [bos_embeds[b]], [torch.full((len(bos),), IGNORE_INDEX)], []
            layout: list[tuple[Segment, int]] = [(Text(""), len(bos))] if bos else []
            cursor = len(bos)
            for seg in prompt:
                if isinstance(seg, Text):
                    emb, ids = next(text_embeds), next(text_ids)
                    lab = torch.tensor(ids) if seg.target else torch.full((len(ids),), IGNORE_INDEX)
                elif isinstance(seg, Image):
                    emb = next(image_embeds)
                    lab = torch.full((emb.shape[0],), IGNORE_INDEX)
                elif isinstance(seg, Embeds):
                    emb = seg.embeds.to(device=device, dtype=dtype)
                    if emb.dim() != 2 or emb.shape[1] != self.hidden_size:
                        raise ValueError(
                            f"Embeds segment has shape {tuple(emb.shape)}; expected (n, {self.hidden_size}) "
                            f"for backbone {self.name_or_path}"
                        )
                    lab = torch.full((emb.shape[0],), IGNORE_INDEX)
                else:
                    raise TypeError(f"not a segment: {type(seg).__name__} (use Text, Image or Embeds)")
                parts.append(emb)
                labels.append(lab.long())
                spans.append((cursor, cursor + emb.shape[0]))
                layout.append((seg, emb.shape[0]))
                cursor += emb.shape[0]
            rows_embeds.append(torch.cat(parts, dim=0))
            rows_labels.append(torch.cat(labels))
            rows_spans.append(spans)
            layouts.append(layout)
        return self._pad(rows_embeds, rows_labels, rows_spans, layouts, padding_side)

    def _embed_image_list(self, images: list[Pixels]) -> list[torch.Tensor]:
        if not images:
            return []
        moved = [self.to_model(img) for img in images]
        embeds = self.embed_images(moved)
        if len(embeds) != len(images):
            raise RuntimeError(f"{type(self).__name__}.embed_images returned {len(embeds)} for {len(images)} images")
        return embeds

    def to_model(self, pixels: Pixels) -> Pixels:
        """Floating tensors to the model's device and dtype; integer ones (sizes, grids) to its device."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

        if isinstance(pixels, dict):
            return {k: move(v) for k, v in pixels.items()}
        if not torch.is_tensor(pixels):
            raise TypeError(f"an Image segment holds {type(pixels).__name__}; preprocess images with "
                            "backbone.image_transform")
        return move(pixels)

    @staticmethod
    def stack_same_shape(tensors: list[torch.Tensor], what: str = "images") -> torch.Tensor:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"{what} in one batch must share a shape after preprocessing, got {sorted(shapes)}; "
                "preprocess them with backbone.image_transform"
            )
        return torch.stack(tensors)

    def _pad(
        self,
        rows_embeds: list[torch.Tensor],
        rows_labels: list[torch.Tensor],
        rows_spans: list[list[tuple[int, int]]],
        layouts: list[list[tuple[Segment, int]]],
        padding_side: str,
    ) -> Assembled:
        batch, length = len(rows_embeds), max(r.shape[0] for r in rows_embeds)
        embeds = rows_embeds[0].new_zeros((batch, length, self.hidden_size))
        mask = torch.zeros((batch, length), dtype=torch.long, device=embeds.device)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
        spans = []
        for b, (emb, lab, sp) in enumerate(zip(rows_embeds, rows_labels, rows_spans)):
            n = emb.shape[0]
            start = length - n if padding_side == "left" else 0
            embeds[b, start : start + n] = emb
            mask[b, start : start + n] = 1
            labels[b, start : start + n] = lab.to(embeds.device)
            spans.append([(s + start, e + start) for s, e in sp])
        return Assembled(embeds, mask, self.position_ids(mask, layouts), labels, spans)

    # ---- running the frozen model -------------------------------------------------------------
    def forward(self, batch: Assembled, output_hidden_states: bool = False, with_loss: bool = False) -> Any:
        """Run the frozen model on assembled inputs. With `with_loss`, the output's `loss` is the
        next-token cross-entropy averaged over target tokens (transformers' causal-LM loss)."""
        return self.model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=batch.labels if with_loss else None,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )

    def hidden_states(self, batch: Assembled) -> tuple[torch.Tensor, ...]:
        """Per-layer hidden states (embeddings first, last layer final-normed) at `batch`'s positions.

        What AIM reads at demo text positions. Encoder-decoder families return their encoder's states
        (the segments go to the encoder).
        """
        return self(batch, output_hidden_states=True).hidden_states

    def generate(self, prompts: list[Prompt], max_new_tokens: int = 8, **generate_kwargs: Any) -> list[str]:
        """Greedy (by default) batched generation from segments, left padded, with the KV cache."""
        return self.generate_from(self.assemble(prompts, padding_side="left"), max_new_tokens, **generate_kwargs)

    @torch.no_grad()
    def generate_from(self, batch: Assembled, max_new_tokens: int = 8, **generate_kwargs: Any) -> list[str]:
        """Generation from an already assembled, left-padded batch."""
        out = self.model.generate(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,  # generate extends them by one per new token
            max_new_tokens=max_new_tokens,
            do_sample=generate_kwargs.pop("do_sample", False),
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            **generate_kwargs,
        )
        # With inputs_embeds only, generate returns just the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
