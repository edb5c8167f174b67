"""The backbone protocol: a frozen MLLM behind one interface.

Every method builds prompts as segments (`mmict.segments`); a backbone adapter turns a batch of
prompts into `inputs_embeds`, attention mask, position ids and labels (`assemble`), runs the frozen
model (`forward`) and generates (`generate`). The assembly is family-independent and lives here;
a family adapter only says how to embed images and tokens and where its parts are. Prompts are tokenised as the
family's processor tokenises them (`mmict.backbones.tokens`), chat templates rendered by the model's own template
(`mmict.backbones.chat`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from PIL import Image as PILImage
from torch import nn

from mmict.backbones.assembly import IGNORE_INDEX, Assembled, Row, pad  # noqa: F401 - IGNORE_INDEX: re-exported
from mmict.backbones.chat import ChatLayout, content_items, item_layout, kinds_of, turn_layout, wrap
from mmict.backbones.context import lm_max_positions
from mmict.backbones.tokens import follows_image, segment_token_ids
from mmict.segments import Image, Pixels, Prompt, Segment, Text


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
    vision_cache: Any = None  # a VisionCache while an evaluation runs (`attach_vision_cache`), else None

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

    def attention_layers(self) -> list[nn.Module]:
        """The LM's transformer layers whose self-attention attends over the prompt, in order (MimIC's per-head shift
        sits before their attention's output projection: `mmict.backbones.head_shift`)."""
        return list(self.language_model.layers)

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
        """Each text alone, without special tokens (a class name's length, a decoder target; prompts go through
        `segment_token_ids`, which tokenises them as the processor does)."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    # ---- prompts as the family's processor tokenises them (mmict.backbones.tokens) ----------------
    @property
    def image_placeholder(self) -> str | None:
        """The text the family's processor reads as one image in a prompt string, before expanding it (the model's
        image token); None where the processor keeps images out of the text (BLIP-2)."""
        token_id = getattr(self.config, "image_token_id", None)
        token_id = getattr(self.config, "image_token_index", None) if token_id is None else token_id
        return None if token_id is None else self.tokenizer.convert_ids_to_tokens(int(token_id))

    def text_after_image(self, text: str) -> str:
        """The text after an image (or Embeds) as the family's processor rewrites it (Idefics2 adds a space)."""
        return text

    # Rows an image shares with an image right before it (Idefics2's processor merges adjacent image wrappers).
    adjacent_image_shared_rows = 0

    def special_token_layout(self, prompt: Prompt, add_bos: bool = True) -> tuple[int, list[int], list[int]]:
        """Where the tokenizer's special tokens go in `prompt`: (index of the segment the leading ones go before,
        leading ids, trailing ids). Default: BOS first, when the tokenizer has one and `add_bos`."""
        return 0, ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []), []

    def segment_token_ids(self, prompts: list[Prompt]) -> list[list[list[int] | None]]:
        """Per prompt, per segment, the token ids `assemble` lays out: a list per Text (tokenised in the prompt's
        string, as the processor does; EOS appended where it ends with one), None per Image or Embeds."""
        return segment_token_ids(self.tokenizer, prompts, self.image_placeholder, self.eos_token_id,
                                 self.text_after_image)

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
    def chat_layout(self, kinds: tuple[str, ...]) -> ChatLayout | None:
        """How the chat template lays out a user turn whose content items are `kinds` ("image" for an Image or
        Embeds, "text" for a run of Texts; `mmict.backbones.chat`); None when the model has no template or it is
        switched off. Rendered once per template and kinds (wrap_query runs on every training prompt)."""
        if not (self.use_chat_template and self.chat_template):
            return None
        cache = self.__dict__.setdefault("_chat_layout_cache", {})
        key = (self.chat_template, kinds)
        if key not in cache:
            layout = item_layout(self.tokenizer, self.chat_template, kinds, self.image_placeholder)
            layout = layout or turn_layout(self.tokenizer, self.chat_template, len(kinds))
            if layout is None:
                raise ValueError(f"the chat template of {self.name_or_path} could not be rendered with one user "
                                 "turn; set backbone.chat_template=false to use plain prompts")
            cache[key] = layout
        return cache[key]

    def chat_affixes(self) -> tuple[str, str] | None:
        """(text before, text after) the user's turn in the model's chat template, generation prompt included,
        for a turn of one text item; None when the model has no template or it is switched off."""
        layout = self.chat_layout(("text",))
        return None if layout is None else (layout.prefix, layout.glue[0] + layout.suffix)

    def wrap_query(self, prompt: Prompt) -> Prompt:
        """The query prompt (demos, query image, question) as the model's user turn, rendered by its chat template
        (`mmict.backbones.chat`), the targets after the generation prompt; unchanged when there is no template."""
        if not (self.use_chat_template and self.chat_template):
            return prompt
        body = [seg for seg in prompt if not (isinstance(seg, Text) and seg.target)]
        targets = [seg for seg in prompt if isinstance(seg, Text) and seg.target]
        items = content_items(body)
        return wrap(items, targets, self.chat_layout(kinds_of(items)))

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
        seg_ids = self.segment_token_ids([prompt])[0]
        at, lead, trail = self.special_token_layout(prompt, add_bos)
        total = len(lead) + len(trail)
        after_image = follows_image(prompt, seg_ids, at if lead else -1)
        for seg, ids, after in zip(prompt, seg_ids, after_image):
            if isinstance(seg, Text):
                total += len(ids)
            elif isinstance(seg, Image):
                total += int(count_image(seg.pixels)) - (self.adjacent_image_shared_rows if after else 0)
            else:
                total += int(seg.embeds.shape[0])
        return total

    # ---- assembly -----------------------------------------------------------------------------
    def assemble(
        self, prompts: list[Prompt], padding_side: Literal["left", "right"] = "right", add_bos: bool = True
    ) -> Assembled:
        """Turn a batch of prompts into padded LM inputs.

        Each prompt is tokenised as the family's processor tokenises it (`segment_token_ids`), with the tokenizer's
        special tokens where `special_token_layout` puts them. All images of the batch go through the vision tower in
        one call and all tokens through the embedding table in one call; then each prompt is concatenated in segment
        order. Right padding for training, left padding for generation (new tokens then follow the last real token).
        """
        device, dtype = self.device, self.dtype
        seg_ids = self.segment_token_ids(prompts)
        specials = [self.special_token_layout(p, add_bos) for p in prompts]
        pieces = [ids for (_, lead, trail), row in zip(specials, seg_ids)
                  for ids in (lead, *(i for i in row if i is not None), trail)]
        flat = torch.tensor([i for ids in pieces for i in ids], dtype=torch.long, device=device)
        flat_embeds = self.embed_tokens(flat) if flat.numel() else torch.zeros((0, self.hidden_size), dtype=dtype,
                                                                                device=device)
        token_embeds = iter(torch.split(flat_embeds, [len(ids) for ids in pieces]))
        images = [seg.pixels for p in prompts for seg in p if isinstance(seg, Image)]
        image_embeds = iter(self._embed_image_list(images))

        rows = []
        for prompt, ids_row, (at, lead, trail) in zip(prompts, seg_ids, specials):
            row, lead_embeds = Row(), next(token_embeds)
            after_image = follows_image(prompt, ids_row, at if lead else -1)
            for i, (seg, ids, after) in enumerate(zip(prompt, ids_row, after_image)):
                if i == at and lead:
                    row.add(lead_embeds, lead)
                if isinstance(seg, Text):
                    row.add(next(token_embeds), ids, torch.tensor(ids) if seg.target else None, seg)
                elif isinstance(seg, Image):
                    row.add(next(image_embeds)[self.adjacent_image_shared_rows if after else 0 :], None, None, seg)
                else:
                    emb = seg.embeds.to(device=device, dtype=dtype)
                    if emb.dim() != 2 or emb.shape[1] != self.hidden_size:
                        raise ValueError(f"Embeds segment has shape {tuple(emb.shape)}; expected "
                                         f"(n, {self.hidden_size}) for backbone {self.name_or_path}")
                    row.add(emb, None, None, seg)
            if lead and at >= len(prompt):
                row.add(lead_embeds, lead)
            trail_embeds = next(token_embeds)
            if trail:
                row.add(trail_embeds, trail)
            rows.append(row)
        embeds, mask, labels, input_ids, spans = pad(rows, self.hidden_size, padding_side, device, dtype)
        return Assembled(embeds, mask, self.position_ids(mask, [row.layout for row in rows]), labels, spans,
                         input_ids)

    def _embed_image_list(self, images: list[Pixels]) -> list[torch.Tensor]:
        if not images:
            return []
        if self.vision_cache is not None:  # evaluation's (mmict.backbones.vision_cache); it steps aside under grad
            return self.vision_cache.embed(images, self._encode_images)
        return self._encode_images(images)

    def _encode_images(self, images: list[Pixels]) -> list[torch.Tensor]:
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
