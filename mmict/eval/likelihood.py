"""Scoring fixed continuations by teacher forcing: how likely a frozen backbone finds a text after a prompt.

Classification tasks (Hateful Memes) score each class name this way instead of generating, as OpenFlamingo's
`get_rank_classifications` does: the class's tokens follow the prompt, and the log-probabilities the model gives
them are summed, then divided by their count (`metrics.p_yes_from_loglikelihoods`).

One code path for every family: the continuation is a target `Text`, so `assemble` marks its tokens in `labels`
(-100 elsewhere), and the backbone's forward gives logits aligned with those labels:
- decoder-only: logits over the whole sequence; the logits at position t predict token t + 1, so the labels are
  read one position later than the logits (transformers' causal-LM loss shifts the same way);
- encoder-decoder (BLIP-2 with Flan-T5): `labels` are the decoder's, and its inputs are those labels shifted right
  behind the start token, so the logits at t predict labels[t]: no shift.
"""

from __future__ import annotations

import torch

from mmict.backbones.base import IGNORE_INDEX, Backbone
from mmict.eval.metrics import p_yes_from_loglikelihoods
from mmict.segments import Prompt, Text


def target_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, encoder_decoder: bool) -> torch.Tensor:
    """(B, L) log-probabilities of the label tokens (0 where labels are IGNORE_INDEX), from (B, L', V) logits.

    Only the target rows go through log-softmax (in float32), so a long prompt with a large vocabulary costs no
    (B, L, V) float copy."""
    if not encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]  # logits at t predict token t + 1
    mask = labels.ne(IGNORE_INDEX)
    picked = torch.log_softmax(logits[mask].float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    out[mask] = picked
    return out


@torch.no_grad()
def continuation_loglikelihoods(
    backbone: Backbone, prompts: list[Prompt], continuation: str
) -> tuple[list[float], list[int], list[int]]:
    """For each prompt: (summed log-likelihood of `continuation` after it, its token count, the prompt's context
    tokens without the continuation). No EOS is appended to the continuation: a class name is scored as the
    answer's beginning, as OpenFlamingo scores it."""
    full = [[*p, Text(continuation, target=True, eos=False)] for p in prompts]
    batch = backbone.assemble(full, padding_side="right")
    encoder_decoder = backbone.is_encoder_decoder
    logits = backbone(batch).logits
    if logits.shape[:2] != batch.labels.shape:
        raise RuntimeError(f"{type(backbone).__name__} gave logits {tuple(logits.shape)} for labels "
                           f"{tuple(batch.labels.shape)}: they must be aligned position by position")
    logprobs = target_token_logprobs(logits, batch.labels, encoder_decoder)
    counts = batch.labels.ne(IGNORE_INDEX).sum(dim=1)
    if (counts == 0).any():
        raise ValueError(f"the continuation {continuation!r} tokenises to nothing")
    # Decoder-only: the continuation is part of the sequence; encoder-decoder: it is in the decoder, not counted.
    context = batch.context_tokens - (0 if encoder_decoder else counts)
    return logprobs.sum(dim=1).tolist(), counts.tolist(), context.tolist()


def class_probabilities(
    backbone: Backbone, prompts: list[Prompt], classes: tuple[str, str]
) -> tuple[list[float], list[int]]:
    """P(classes[0]) per prompt against classes[1] (softmax over length-normalised log-likelihoods), and the
    prompts' context tokens."""
    (ll_a, n_a, context), (ll_b, n_b, _) = (continuation_loglikelihoods(backbone, prompts, c) for c in classes)
    return p_yes_from_loglikelihoods(ll_a, n_a, ll_b, n_b), context
