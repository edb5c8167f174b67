"""BLIP-2 adapter (`Blip2ForConditionalGeneration`): OPT (decoder-only) or Flan-T5 (encoder-decoder) LM.

An image is the `num_query_tokens` Q-Former outputs through `language_projection` (the model's own
`get_image_features`), exactly what `Blip2ForConditionalGeneration.forward` scatters into the image-token
positions. Layout conventions follow `Blip2Processor`, which writes the image tokens *in front of* the
tokenized text:

- OPT: `[image queries][BOS][text]` (OPT's tokenizer uses "</s>" as BOS). A prompt that starts with an image
  gets BOS right after that image, as BLIP-2-OPT was trained; any other prompt (text-only demos, AIM's fused
  tokens first) starts with BOS. Positions count real tokens (OPT's learned positions, offset inside the
  model), so a left-padded prompt gets the logits it gets unpadded.
- Flan-T5: `[image queries][text][EOS]` (T5's tokenizer appends "</s>" and has no BOS). The prompt's
  non-target segments (demos, query image, prompt) go to the *encoder*, followed by that EOS; the target
  segments, which must come last, go to the *decoder* as labels (decoder input = labels shifted right
  behind `decoder_start_token_id`, T5's own `_shift_right`). So for T5, `Assembled` holds encoder inputs
  (`inputs_embeds`, `attention_mask`, `position_ids`, `spans`: every non-target segment's span is in encoder
  positions; a target segment gets an empty span at the end of its encoder row) and `labels` holds the
  decoder labels `(B, T)`, right padded with IGNORE_INDEX. `hidden_states` returns the encoder's states, so
  AIM reads demo text positions from the encoder; `num_layers` counts encoder layers accordingly (Flan-T5
  has as many encoder as decoder layers; a deeper decoder generates through `t5_lazy_cache_kwarg`). The
  loss is the mean cross-entropy over target tokens, as for decoder-only families.

Several images per prompt are allowed (MMICT's vanilla ICT concatenates every demo's Q-Former features)
although BLIP-2 was pretrained with one image per text; this is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from mmict.backbones.base import IGNORE_INDEX, Assembled, Backbone
from mmict.segments import Image, Pixels, Prompt, Text

log = logging.getLogger(__name__)

OPT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_LORA_TARGETS = ("q", "k", "v", "o")


class Blip2Backbone(Backbone):
    family = "blip2"
    model_class = "Blip2ForConditionalGeneration"

    _logged_multi_image = False  # the several-images note is logged once per backbone

    @property
    def is_encoder_decoder(self) -> bool:
        """True for Flan-T5 language models, False for OPT (the config's own switch)."""
        return not self.config.use_decoder_only_language_model

    @property
    def language_model(self) -> nn.Module:
        # Blip2ForConditionalGeneration holds its LM directly (no inner `.model`).
        return self.model.language_model

    @property
    def lora_target_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        # Names differ between the two LMs; a property so the loaded model decides.
        return T5_LORA_TARGETS if self.is_encoder_decoder else OPT_LORA_TARGETS

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size  # T5Config maps hidden_size -> d_model

    @property
    def num_layers(self) -> int:
        # T5Config maps num_hidden_layers -> num_layers, the *encoder* depth: the stack `hidden_states` reads.
        return self.config.text_config.num_hidden_layers

    @property
    def t5_decoder_deeper_than_encoder(self) -> bool:
        """A T5 LM whose decoder has more layers than its encoder (no Flan-T5 release; a custom or toy one)."""
        text = self.config.text_config
        return self.is_encoder_decoder and (text.num_decoder_layers or text.num_layers) > text.num_layers

    @property
    def image_tokens_per_image(self) -> int:
        return self.config.num_query_tokens

    def count_tokens(self, prompt: Prompt, image_tokens: Callable[[Pixels], int] | None = None,
                     add_bos: bool = True) -> int:
        """OPT: as the base (BOS moves behind a leading image but still counts once). Flan-T5: what goes to the
        *encoder*, as `context_tokens` counts it: the non-target segments + the encoder EOS (`add_bos`); the target
        is decoded, not attended over as context."""
        if not self.is_encoder_decoder:
            return super().count_tokens(prompt, image_tokens, add_bos)
        encoder, _ = self._split_target(prompt)
        return super().count_tokens(encoder, image_tokens, add_bos)

    @property
    def decoder_layer_cls(self) -> type[nn.Module]:
        lm = self.language_model
        return type(lm.encoder.block[0]) if self.is_encoder_decoder else type(lm.model.decoder.layers[0])

    def attention_layers(self) -> list[nn.Module]:
        # Flan-T5: the encoder's blocks, which attend over the prompt (a teacher's demos too); the decoder: the answer.
        lm = self.language_model
        return list(lm.encoder.block) if self.is_encoder_decoder else list(lm.model.decoder.layers)

    def embed_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.model.get_image_features(pixel_values=self.stack_same_shape(images), return_dict=True)
        return list(out.pooler_output)  # (num_query_tokens, D) each: Q-Former queries through language_projection

    # ---- MMICT: the ViT's patch features before `post_layernorm` (LAVIS's `ln_vision`, which MMICT trains) ----
    def vision_features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        vision = self.model.vision_model
        hidden = vision.embeddings(self.stack_same_shape(images))
        return list(vision.encoder(inputs_embeds=hidden).last_hidden_state)

    def vision_output_norm(self) -> nn.LayerNorm:
        return self.model.vision_model.post_layernorm

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        lm = self.language_model
        if self.is_encoder_decoder:
            return lm.encoder.final_layer_norm(hidden)
        norm = lm.model.decoder.final_layer_norm
        return hidden if norm is None else norm(hidden)  # OPT-350m style post-norm models have none

    # ---- assembly -----------------------------------------------------------------------------
    @property
    def image_placeholder(self) -> None:
        """None: `Blip2Processor` keeps images out of the text (their query tokens go in front of the tokenized
        text), so the text between two images is tokenised on its own (`mmict.backbones.tokens`)."""
        return None

    def special_token_layout(self, prompt: Prompt, add_bos: bool = True) -> tuple[int, list[int], list[int]]:
        """OPT: BOS right after a leading image, else first. Flan-T5 (the encoder prompt): EOS last, no BOS.
        `add_bos=False` leaves out the tokenizer's special token (OPT's BOS, T5's encoder EOS)."""
        if self.is_encoder_decoder:
            return 0, [], [self.eos_token_id] if add_bos else []
        at = 1 if prompt and isinstance(prompt[0], Image) else 0
        return at, [self.bos_token_id] if add_bos and self.bos_token_id is not None else [], []

    def assemble(
        self, prompts: list[Prompt], padding_side: Literal["left", "right"] = "right", add_bos: bool = True
    ) -> Assembled:
        """As the base assembly, with BLIP-2's special-token layout (module docstring; `special_token_layout`)."""
        self._note_multi_image(prompts)
        if self.is_encoder_decoder:
            return self._assemble_seq2seq(prompts, padding_side, add_bos)
        return super().assemble(prompts, padding_side, add_bos)

    def _assemble_seq2seq(self, prompts: list[Prompt], padding_side: str, add_eos: bool) -> Assembled:
        split = [self._split_target(prompt) for prompt in prompts]
        out = super().assemble([encoder for encoder, _ in split], padding_side, add_bos=add_eos)
        # The decoder's labels: the targets tokenised as one decoded sequence each (EOS after each that ends so).
        rows = [[i for ids in row for i in ids] for row in self.segment_token_ids([tail for _, tail in split])]
        labels = torch.full((len(prompts), max(map(len, rows), default=0)), IGNORE_INDEX, dtype=torch.long,
                            device=out.inputs_embeds.device)
        for b, row in enumerate(rows):
            labels[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        out.labels = labels
        spans = []
        for b, (enc_spans, (_, tail)) in enumerate(zip(out.spans, split)):
            real = out.attention_mask[b].nonzero()
            end = int(real.max()) + 1 if real.numel() else int(out.attention_mask.shape[1])
            spans.append(enc_spans + [(end, end)] * len(tail))  # targets live in the decoder: empty encoder spans
        out.spans = spans
        return out

    @staticmethod
    def _split_target(prompt: Prompt) -> tuple[Prompt, list[Text]]:
        """(encoder segments, target segments) of an encoder-decoder prompt: the targets must come last."""
        first = next((i for i, s in enumerate(prompt) if isinstance(s, Text) and s.target), len(prompt))
        tail = prompt[first:]
        if not all(isinstance(s, Text) and s.target for s in tail):
            raise ValueError(
                "BLIP-2 with an encoder-decoder LM (Flan-T5) decodes the target: target Text segments must "
                f"come last in the prompt, got {[type(s).__name__ for s in prompt]} with a target at {first}"
            )
        return list(prompt[:first]), tail  # type: ignore[return-value]

    def _note_multi_image(self, prompts: list[Prompt]) -> None:
        if self._logged_multi_image:
            return
        if any(sum(isinstance(s, Image) for s in prompt) > 1 for prompt in prompts):
            log.info("BLIP-2 prompt with several images: each image's Q-Former queries are placed in order, "
                     "although BLIP-2 was pretrained with one image per text")
            self._logged_multi_image = True

    # ---- running the frozen model -------------------------------------------------------------
    def _decoder_input_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """T5's decoder inputs: labels shifted right behind the start token; with no target, the start token
        alone (one decoder step: the logits of the first answer token)."""
        if labels.shape[1] == 0:
            start = self.config.text_config.decoder_start_token_id
            return torch.full((labels.shape[0], 1), start, dtype=torch.long, device=labels.device)
        return self.language_model._shift_right(labels)

    def forward(self, batch: Assembled, output_hidden_states: bool = False, with_loss: bool = False) -> Any:
        """The LM on assembled inputs (images are already features, so the LM is called directly).

        OPT: causal-LM logits over the sequence. T5: decoder logits `(B, T, V)` for the decoder labels."""
        lm = self.language_model
        if not self.is_encoder_decoder:
            return lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, labels=batch.labels if with_loss else None,
                      output_hidden_states=output_hidden_states, use_cache=False)
        if with_loss and not batch.labels.ne(IGNORE_INDEX).any():
            raise ValueError("with_loss needs a target: no prompt in the batch has a target Text segment")
        return lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                  decoder_input_ids=self._decoder_input_ids(batch.labels), labels=batch.labels if with_loss else None,
                  output_hidden_states=output_hidden_states, use_cache=False)

    def hidden_states(self, batch: Assembled) -> tuple[torch.Tensor, ...]:
        if not self.is_encoder_decoder:
            return super().hidden_states(batch)
        # The segments are in the encoder: its states (last one final-normed), without running the decoder.
        return self.language_model.encoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                           output_hidden_states=True).hidden_states

    @torch.no_grad()
    def generate_ids(self, batch: Assembled, max_new_tokens: int = 8, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids from a left-padded batch (T5: behind the decoder start token)."""
        inputs = {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask}
        if not self.is_encoder_decoder:
            inputs["position_ids"] = batch.position_ids  # generate extends them by one per new token
        if self.is_encoder_decoder and self.t5_decoder_deeper_than_encoder:
            generate_kwargs.update(t5_lazy_cache_kwarg())
        # Blip2ForConditionalGeneration.generate wants pixel_values; it too hands inputs_embeds to the LM's generate.
        return self.language_model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=generate_kwargs.pop("do_sample", False),
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, **generate_kwargs,
        )

    def generate_from(self, batch: Assembled, max_new_tokens: int = 8, **generate_kwargs: Any) -> list[str]:
        out = self.generate_ids(batch, max_new_tokens, **generate_kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def t5_lazy_cache_kwarg() -> dict[str, Any]:
    """`generate` kwargs with a key/value cache that grows one layer at a time.

    transformers 5.25 (seen in testing; the lock pins it) builds `generate`'s cache with as many layers as
    `T5Config.num_hidden_layers`, which T5 maps to `num_layers`, the *encoder* depth. A decoder with more
    layers than that then fails in `cache_utils` (`IndexError: list index out of range` at the first extra
    layer). An `EncoderDecoderCache` of two empty `DynamicCache`s appends a layer per layer it sees, so any
    depth works, with the same outputs (tests/mmict/backbones/test_backbone_blip2.py checks them against
    `use_cache=False`).
    transformers renamed `generate`'s `past_key_values` to `cache` in 5.24 (the old name warns until 6.0).
    """
    import transformers
    from packaging.version import Version
    from transformers import DynamicCache, EncoderDecoderCache

    name = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    return {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}


def load_processor(name_or_path: str) -> Any:
    """The checkpoint's `Blip2Processor`, usable whatever type its tokenizer gives `image_token`.

    transformers 5.25's `Blip2Processor.__call__` writes the image tokens as `self.image_token.content`; it
    takes `image_token` from the tokenizer when the tokenizer has one, and a tokenizer saved with
    `extra_special_tokens={"image_token": ...}` gives a plain `str` there (AttributeError: 'str' object has no
    attribute 'content'). The string is wrapped as the `AddedToken` the processor builds itself otherwise.
    """
    from tokenizers import AddedToken
    from transformers import Blip2Processor

    processor = Blip2Processor.from_pretrained(name_or_path)
    if isinstance(processor.image_token, str):
        processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)
    return processor


__all__ = ["Blip2Backbone", "load_processor", "OPT_LORA_TARGETS", "T5_LORA_TARGETS"]
