"""Where the M-Hub's text branch starts (`method.mmict.text_init`), and which queries read their prompt
(`method.mmict.query_text`). Plain Python at import (no torch): `mmict.config` checks these names.

The text branch is what only text tokens use: the word and position embeddings and every layer's text
feed-forward (`intermediate`, `output`; the queries have their own `intermediate_query`, `output_query`).
BLIP-2 checkpoints have none of it: LAVIS's stage-2 BLIP-2 deletes it before training (the MMICT fork does the
same for vanilla ICT, KDEGroup/MMICT lavis/models/blip2_models/blip2_t5.py:84-89, blip2_opt.py:80-85), and
transformers' `Blip2QFormerModel` has no such modules. The reference's MMICT (`instruct_qformer: True`,
lavis/projects/blip2/train/mmict.yaml:18) keeps it, so it keeps the weights `init_Qformer` gave it,
`BertLMHeadModel.from_pretrained("bert-base-uncased")` (blip2.py:47-56), under the BLIP-2 checkpoint, which
loads with `strict=False` (base_model.py:81-100 -> blip2.py:80-93; a finetuned one: base_model.py:51) and so
leaves them in place.

`text_init`:

- `bert` (the reference's): word and position embeddings and the text feed-forward from the BERT checkpoint
  that `method.mmict.hub_tokenizer` names (its model, loaded with transformers' `AutoModel`);
- `query_branch` (this repository's init before issue 21): the text feed-forward copied from the query one
  (a BLIP-2 start; fresh M-Hubs keep their random one), the embeddings random (normal(0, initializer_range));
- null: `bert` when `hub_tokenizer` is set (LAVIS reads M-Hub text with BERT's tokenizer and BERT's weights),
  else `query_branch` (the LLM's tokenizer has no BERT weights to start from).
"""

from __future__ import annotations

import re
from typing import Any

TEXT_INITS = ("bert", "query_branch")

# The query's M-Hub features read its prompt (textual-guided visual features) or not (text-free), per design
# when `method.mmict.query_text` is null. The reference's vanilla ICT (`instruct_qformer: False`) has no text
# branch, so its query features are text-free at training and generation (blip2_t5.py:248-255, 413-420);
# MMICT's read the prompt (blip2_t5.py:234-247, 392-412). `text` shows demos as words and keeps MMICT's query
# path: against `fused` it changes the demo representation only (the reference has a text branch only in its
# MMICT model). `none` is vanilla fine-tuning, the reference's model without demos: text-free.
QUERY_TEXT_BY_DESIGN = {"fused": True, "concat": False, "text": True, "none": False}

WORD, POSITION, TEXT_FFN = ("word embeddings (qformer.embeddings.word_embeddings)",
                            "position embeddings (qformer.embeddings.position_embeddings)",
                            "text feed-forward (qformer.encoder.layer.*.intermediate/output)")
RANDOM_EMBEDDINGS = "random normal(0, initializer_range)"


def resolve_text_init(text_init: str | None, hub_tokenizer: str | None) -> str:
    if text_init is None:
        return "bert" if hub_tokenizer is not None else "query_branch"
    if text_init not in TEXT_INITS:
        raise ValueError(f"method.mmict.text_init={text_init!r}: use one of {TEXT_INITS} (or null)")
    if text_init == "bert" and hub_tokenizer is None:
        raise ValueError("method.mmict.text_init=bert loads the M-Hub's text branch from the BERT checkpoint "
                         "method.mmict.hub_tokenizer names, and hub_tokenizer is null (the LLM's tokenizer). Fix: "
                         "method.mmict.hub_tokenizer=bert-base-uncased (or a local BERT folder), or "
                         "method.mmict.text_init=query_branch")
    return text_init


def resolve_query_text(query_text: bool | None, design: str, prompted: bool = True) -> bool:
    """Whether the query's M-Hub features read the query prompt, at training and evaluation alike.

    `prompted=False`: training episodes come from the web corpus (`data.task` null), whose queries have no prompt
    (the whole text is the target), so the M-Hub would read no text in training and the task's prompt ("this is a")
    only at evaluation, a mismatch that decides what the trained features mean. The per-design default then becomes
    text-free at both; asking for text-conditioned queries explicitly is an error."""
    if not prompted:
        if query_text:
            raise ValueError(
                "method.mmict.query_text=true, but training episodes come from the web corpus (data.task is null), "
                "whose queries have no prompt: the M-Hub would read no text in training and the task's prompt at "
                "evaluation. Fix: method.mmict.query_text=null (text-free at both), or train on a task "
                "(data.task=<task>) whose episodes carry its prompt")
        return False
    return QUERY_TEXT_BY_DESIGN[design] if query_text is None else bool(query_text)


_TEXT_BRANCH = re.compile(r"embeddings\.(word|position)_embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.")


def is_text_branch(key: str) -> bool:
    """Whether an M-Hub state-dict key (`qformer.` + a Q-Former key) is a text-branch weight: one that BLIP-2
    checkpoints lack (a layer's `intermediate`/`output`, not `attention.output` nor `output_query`)."""
    return key.startswith("qformer.") and _TEXT_BRANCH.match(key, len("qformer.")) is not None


def load_bert_text_branch(qformer: Any, name_or_path: str) -> dict[str, str]:
    """Copy a BERT checkpoint's word and position embeddings and text feed-forward into `qformer` (an
    InstructBLIP Q-Former of BERT's sizes); returns each part's origin for the init report.

    As LAVIS: BERT's first `max_position_embeddings` positions, and no token-type embeddings (the Q-Former's
    embeddings have none: KDEGroup/MMICT lavis/models/blip2_models/Qformer.py:51-66)."""
    import torch
    from transformers import AutoConfig, AutoModel

    fix = ("give a BERT checkpoint (model weights next to the tokenizer, e.g. bert-base-uncased), or "
           "method.mmict.text_init=query_branch")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise OSError(f"method.mmict.text_init=bert: method.mmict.hub_tokenizer={name_or_path!r} has no model "
                      f"config here ({err}); {fix}") from err
    if config.model_type != "bert":
        raise ValueError(f"method.mmict.text_init=bert: method.mmict.hub_tokenizer={name_or_path!r} is a "
                         f"{config.model_type!r} checkpoint, not a BERT one; {fix}")
    mine = qformer.config
    sizes = [f"{name} {getattr(config, name)} (M-Hub: {getattr(mine, name)})"
             for name in ("hidden_size", "intermediate_size", "num_hidden_layers")
             if getattr(config, name) != getattr(mine, name)]
    if sizes:
        raise ValueError(f"method.mmict.text_init=bert: the BERT checkpoint {name_or_path!r} does not fit the "
                         f"M-Hub's text branch: {', '.join(sizes)}; {fix}")
    try:  # a BertModel, or the `bert` part of a BertForMaskedLM / BertForPreTraining / ... checkpoint
        bert, info = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False, output_loading_info=True)
    except OSError as err:
        raise OSError(f"method.mmict.text_init=bert: no BERT weights at {name_or_path!r} ({err}); {fix}") from err
    needed = [k for k in info["missing_keys"] if _TEXT_BRANCH.match(k)]
    if needed:
        raise ValueError(f"method.mmict.text_init=bert: the checkpoint {name_or_path!r} lacks {sorted(needed)[:4]}; "
                         f"{fix}")
    words, positions = qformer.embeddings.word_embeddings, qformer.embeddings.position_embeddings
    theirs = bert.embeddings
    n_words = min(words.num_embeddings, theirs.word_embeddings.num_embeddings)
    n_pos = min(positions.num_embeddings, theirs.position_embeddings.num_embeddings)
    with torch.no_grad():
        words.weight[:n_words].copy_(theirs.word_embeddings.weight[:n_words])
        positions.weight[:n_pos].copy_(theirs.position_embeddings.weight[:n_pos])
        for layer, source in zip(qformer.encoder.layer, bert.encoder.layer, strict=True):
            layer.intermediate.load_state_dict(source.intermediate.state_dict())
            layer.output.load_state_dict(source.output.state_dict())
    src = f"BERT checkpoint {name_or_path}"
    word = f"{src}: embeddings.word_embeddings ({n_words} of the tokenizer's {words.num_embeddings} rows"
    word += ")" if n_words == words.num_embeddings else f"; the rest {RANDOM_EMBEDDINGS})"
    pos = f"{src}: embeddings.position_embeddings (the first {n_pos} of {theirs.position_embeddings.num_embeddings}"
    pos += ")" if n_pos == positions.num_embeddings else f"; positions {n_pos}+ {RANDOM_EMBEDDINGS})"
    return {WORD: word, POSITION: pos,
            TEXT_FFN: f"{src}: encoder.layer.*.intermediate/output ({len(qformer.encoder.layer)} layers)"}


__all__ = ["QUERY_TEXT_BY_DESIGN", "TEXT_INITS", "is_text_branch", "load_bert_text_branch", "resolve_query_text",
           "resolve_text_init"]
