"""MMICT (Chen et al. 2023, arXiv 2312.06363) as a LightningModule: frozen vision tower and LLM, trainable M-Hub.

The query prompt, per demonstration design (`method.demo_design`):

- `fused`  (MMICT):        [demo M-Hub text features][<eoc>] ... [query visual features][prompt][target]
- `concat` (vanilla ICT):  [demo visual features][demo text][<eoc>] ... [query visual features][prompt][target]
- `text`:                  [demo text][<eoc>] ... [query visual features][prompt][target]
- `none` (vanilla FT):     [query visual features][prompt][target]

"Query visual features" are the M-Hub's query-position features of the query image(s): textual-guided (the
M-Hub also reads the prompt) or text-free, per `method.mmict.query_text` (null: per design, `text_init.py`:
on for fused and text, off for concat and none, as the reference's vanilla ICT has no text branch). It is a
property of the trained model: evaluation applies the run's setting under every demo mode, and the report
names it (`mode_labels`). A demo's visual features under `concat` are its M-Hub query features without text
(the demo's text is shown to the LLM as words right after).

`<eoc>` is a real token of the LLM's tokenizer, added when the tokenizer lacks it; frozen (its embedding row,
the mean of the table) or trainable (a saved copy of that row) by `method.mmict.eoc_trainable`. Everything is
handed to the backbone as segments: one assembly path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from mmict.backbones import Backbone
from mmict.batch import EpisodeBatch
from mmict.config.schema import DEMO_DESIGNS  # the one list (method.demo_design)
from mmict.methods.base import FrozenBackboneModule
from mmict.methods.mmict.hub import HubInit, Visual, build_hub, frames_of, report_size
from mmict.methods.mmict.text_init import resolve_query_text
from mmict.segments import Embeds, Prompt, Segment, Text

log = logging.getLogger(__name__)

EOC = "<eoc>"


class MMICTModule(FrozenBackboneModule):
    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        m = self.cfg.method.mmict
        self.design = self.cfg.method.demo_design
        if self.design not in DEMO_DESIGNS:
            raise ValueError(f"method.demo_design={self.design!r}: use one of {DEMO_DESIGNS}")
        self.hub_tokenizer = _hub_tokenizer(m.hub_tokenizer, self.backbone)
        self.hub, self.hub_init = build_hub(self.backbone, m, vocab_size=len(self.hub_tokenizer),
                                            pad_token_id=self.hub_tokenizer.pad_token_id)
        log.info("%s", self.hub_init.summary())
        report_size(self.hub, self.hub_init, self.backbone)  # its parameter count; a warning if it outweighs the LLM
        # The query's features read its prompt, the same at training and evaluation (web episodes have none).
        self.query_text = resolve_query_text(m.query_text, self.design, prompted=self.cfg.data.task is not None)
        if self.cfg.data.task is None and resolve_query_text(m.query_text, self.design):
            log.info("MMICT trains on web documents, whose queries have no prompt: the query's M-Hub features are "
                     "text-free at training and evaluation (method.mmict.query_text)")
        self.max_text_tokens = self.hub.qformer.config.max_position_embeddings
        self.eoc_id = self.backbone.add_special_token(EOC)
        # Trainable: a saved copy of the token's row (the frozen table itself never trains).
        row = self.backbone.embed_tokens(torch.tensor([self.eoc_id], device=self.backbone.device)).detach()
        self.eoc = nn.Parameter(row.float().clone()) if m.eoc_trainable else None

    @property
    def train_demo_mode(self) -> str:  # type: ignore[override]
        return self.design

    @property
    def mode_labels(self) -> dict[str, str]:  # type: ignore[override]
        """Report names of the demo modes, each saying which query features this run's model reads and, for a fresh
        M-Hub, that it did not start from a BLIP-2 Q-Former (a table may hold both). A run trained without demos
        (`none`) is vanilla fine-tuning, not zero-shot, and is named so."""
        setting = f"text-{'conditioned' if self.query_text else 'free'} query features"
        if self.hub_init.source == "fresh":
            setting += "; fresh M-Hub"
        names = dict(_MODE_NAMES)
        if self.design == "none":
            names["none"] = ("vanilla fine-tune", "no demos, M-Hub query")
        else:  # the 0-shot row of a model trained with demos: which one (a joint table holds several)
            names["none"] = ("zero-shot", f"no demos, M-Hub trained as {_MODE_NAMES[self.design][0]}")
        return {mode: f"{name} ({what}{'; ' if what else ''}{setting})" for mode, (name, what) in names.items()}

    # Every MMICT prompt holds M-Hub features (the query's, at least): measured as evaluation runs them.
    preflight_modes: tuple[str, ...] = ()

    @property
    def default_eval_modes(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.design,)  # each design is its own trained model: the baselines are other runs

    # ---- the M-Hub on a batch -------------------------------------------------------------------
    def _memory(self, visuals: Sequence[Visual]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen vision tower on every frame of every sample at once, then one memory per sample."""
        per_sample = [frames_of(v) for v in visuals]
        flat = [f for frames in per_sample for f in frames]
        with torch.no_grad():
            feats = self.backbone.vision_features([self.backbone.to_model(f) for f in flat])
        dtype = self.hub.vision_norm.weight.dtype  # the M-Hub trains in its own (fp32) dtype
        it = iter(f.to(dtype) for f in feats)
        return self.hub.memory([[next(it) for _ in frames] for frames in per_sample])

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.hub_tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                 return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def query_features(self, visuals: Sequence[Visual], texts: Sequence[str] | None) -> torch.Tensor:
        memory, mask = self._memory(visuals)
        ids, text_mask = self._tokens(texts) if texts is not None else (None, None)
        return self.hub.query_features(memory, mask, ids, text_mask)

    def text_features(self, visuals: Sequence[Visual], texts: Sequence[str]) -> list[torch.Tensor]:
        memory, mask = self._memory(visuals)
        return self.hub.text_features(memory, mask, *self._tokens(texts))

    def eoc_segment(self) -> Segment:
        return Embeds(self.eoc) if self.eoc is not None else Text(EOC)

    # ---- prompts ----------------------------------------------------------------------------------
    def batch_prompts(self, batch: EpisodeBatch, demo_mode: str | None = None,
                      with_target: bool = True) -> list[Prompt]:
        design = demo_mode or self.design
        if design not in DEMO_DESIGNS:
            raise ValueError(f"MMICT shows demonstrations as one of {DEMO_DESIGNS}, not {design!r}")
        demo_images, demo_texts = batch.demo_images, batch.demo_texts
        has_demos = design != "none" and len(demo_texts) > 0
        demo_feats: Sequence[torch.Tensor] = []
        if has_demos and design == "fused":
            demo_feats = self.text_features(demo_images, demo_texts)
        elif has_demos and design == "concat":
            demo_feats = list(self.query_features(demo_images, None))
        query_feats = self.query_features(batch.query_images, batch.query_prompts if self.query_text else None)

        prompts, offset = [], 0
        for b, k in enumerate(batch.demo_counts):
            demos: list[Segment] = []
            for i in range(offset, offset + k) if has_demos else ():
                if design == "fused":
                    demos += [Embeds(demo_feats[i])]
                elif design == "concat":
                    demos += [Embeds(demo_feats[i]), Text(demo_texts[i])]
                else:  # text
                    demos += [Text(demo_texts[i])]
                demos.append(self.eoc_segment())
            offset += k
            query: list[Segment] = [Embeds(query_feats[b])]
            if batch.query_prompts[b]:
                query.append(Text(batch.query_prompts[b]))
            if with_target:
                query.append(Text(batch.query_targets[b], target=True))
            prompts.append(self.backbone.wrap_query(demos + query))
        return prompts

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mmict"]["query_text"] = self.query_text

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before method.mmict.query_text existed read the prompt under every design.
        trained = (checkpoint.get("mmict") or {}).get("query_text", True)
        if trained != self.query_text:
            log.warning("this checkpoint's M-Hub was trained with text-%s query features; this run gives it "
                        "text-%s ones (method.mmict.query_text=%s). Set method.mmict.query_text=%s to go on as "
                        "it was trained", "conditioned" if trained else "free",
                        "conditioned" if self.query_text else "free", self.query_text, str(trained).lower())


# demo mode -> (report name, what the demos are); `mode_labels` adds the query features' variant.
_MODE_NAMES = {"fused": ("MMICT", "M-Hub text features"), "concat": ("vanilla ICT", "visual features + demo text"),
               "text": ("text-only demos", ""), "none": ("zero-shot", "no demos, M-Hub query")}


def _hub_tokenizer(name_or_path: str | None, backbone: Backbone) -> Any:
    """The M-Hub's text tokenizer: `method.mmict.hub_tokenizer` (e.g. a BERT one, as LAVIS), else the LLM's.

    Right padding (text positions are read by mask), and a pad token even when the LLM's tokenizer has none.
    """
    if name_or_path is None:
        import copy

        tok = copy.deepcopy(backbone.tokenizer)
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:
            raise OSError(f"method.mmict.hub_tokenizer={name_or_path!r} could not be loaded ({err}); give a local "
                          "folder or a hub id you have cached, or null for the LLM's tokenizer") from err
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


__all__ = ["DEMO_DESIGNS", "EOC", "HubInit", "MMICTModule"]
