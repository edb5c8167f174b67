"""How many positions a backbone's language model can attend over: what evaluation checks prompts against.

Read from the MLLM's config alone (no weights), so a prompt's fit is known before anything runs.
"""

from __future__ import annotations

from typing import Any

# Where MLLM configs nest their language model's config (LLaVA, Qwen2-VL, Idefics: text_config; others differ).
LM_CONFIG_NAMES = ("text_config", "language_config", "llm_config")
# Relative-position LMs: attention biases come from relative-position buckets (distances past
# `relative_attention_max_distance` share the last bucket), so no length is out of range.
RELATIVE_POSITION_LMS = ("t5", "mt5", "umt5")


def lm_config(config: Any) -> tuple[str, Any]:
    """(where, config) of the language model's config: a nested one if the MLLM config has it, else its own."""
    for name in LM_CONFIG_NAMES:
        sub = getattr(config, name, None)
        if sub is not None:
            return name, sub
    return "config", config


def lm_max_positions(config: Any) -> tuple[int | None, str]:
    """(the LM's usable context in tokens, where that number came from). `max_position_embeddings`, or the attention's
    sliding window where that is smaller and in use; None where the LM has no hard limit (T5's relative positions).
    OPT (BLIP-2) has learned absolute positions: its max_position_embeddings."""
    where, text = lm_config(config)
    if getattr(text, "model_type", None) in RELATIVE_POSITION_LMS:
        return None, "none: T5 relative positions"
    limit = getattr(text, "max_position_embeddings", None)
    if limit is None:
        return None, f"none: {where} ({getattr(text, 'model_type', '?')}) has no max_position_embeddings"
    window = getattr(text, "sliding_window", None)
    # A window counts only where the model's attention applies it: Mistral whenever `sliding_window` is set;
    # Qwen2 (and Qwen2-VL's LM) only with `use_sliding_window` (its config then also names sliding layers in
    # `layer_types`, which is what its attention reads). Where only some layers slide, the window still bounds
    # what those layers reach, so it is taken as the limit (conservative).
    uses_window = (
        isinstance(window, int)
        and bool(getattr(text, "use_sliding_window", True))  # absent (Mistral): the window is always on
        and ("sliding_attention" in text.layer_types if getattr(text, "layer_types", None) else True)
    )
    if uses_window and window < limit:
        return window, f"{where}.sliding_window={window} (sliding attention)"
    return int(limit), f"{where}.max_position_embeddings={limit}"
