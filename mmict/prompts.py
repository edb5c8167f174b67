"""Query prompts as segments, one builder per way of showing demonstrations.

`demo_mode` decides what a demonstration becomes in the query prompt:
- "fused":  AIM's fused tokens, `Embeds` (computed by the caller);
- "images": vanilla multimodal ICL, the demo's `Image` then its `Text`;
- "text":   the demo's text only (the words carry no image information);
- "none":   no demonstrations (zero-shot).
The query is always `[query image][query prompt]`, plus `[target]` when training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmict.batch import DEMO_SEPARATOR
from mmict.config.schema import DEMO_MODES  # the one list (eval.demo_modes)
from mmict.segments import Embeds, Image, Prompt, Segment, Text

# How tables and plots name each demo mode (MMICT's `concat` design included, and methods may relabel theirs).
MODE_NAMES = {"none": "zero-shot", "fused": "AIM (fused tokens)", "images": "vanilla ICL (images+text)",
              "text": "text-only demos", "concat": "vanilla ICT (visual features + demo text)",
              "zero_shot_text": "0-shot (2 text-only demos, OpenFlamingo)"}
# OpenFlamingo's 0-shot row shows its demos as text only (mmict.eval.protocol): the "text" prompt builder.
PROMPT_MODE = {"zero_shot_text": "text"}


def query_segments(image: torch.Tensor, prompt: str, target: str | None = None) -> list[Segment]:
    segments: list[Segment] = [Image(image)]
    if prompt:
        segments.append(Text(prompt))
    if target is not None:
        segments.append(Text(target, target=True))
    return segments


def build_prompt(
    demo_mode: str,
    query_image: torch.Tensor,
    query_prompt: str,
    *,
    demo_images: Sequence[torch.Tensor] = (),
    demo_texts: Sequence[str] = (),
    fused_demos: Sequence[torch.Tensor] = (),
    target: str | None = None,
    separator: str = DEMO_SEPARATOR,
) -> Prompt:
    """One query's prompt with its demonstrations shown as `demo_mode` says, `separator` after each demo's text."""
    demos: list[Segment] = []
    if demo_mode == "fused":
        demos = [Embeds(f) for f in fused_demos]
    elif demo_mode == "images":
        for img, text in zip(demo_images, demo_texts, strict=True):
            demos += [Image(img), Text(text + separator)]
    elif demo_mode == "text":
        demos = [Text(text + separator) for text in demo_texts]
    elif demo_mode != "none":
        raise ValueError(f"unknown demo_mode '{demo_mode}': use one of {DEMO_MODES}")
    return demos + query_segments(query_image, query_prompt, target)
