"""What a pretrained toy backbone can do in context, measured as evaluation measures it (the same prompts, greedy
decoding, the first word of the answer), on episodes pretraining never used: binding on held-out words
(`mmict.toy.pretrain.probe_binding`) and concept induction on held-out rules (`probe_concept`)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from mmict.backbones.base import Backbone
from mmict.eval.postprocess import first_word
from mmict.prompts import build_prompt
from mmict.toy.concept import concept_episode
from mmict.toy.language import CONCEPT_PROMPT, concept_text, rule_pools
from mmict.toy.pretrain_data import ImageBank

# (rng, k) -> (query pixels, query prompt, demo pixels, demo texts, answer): one episode of a probe
Draw = Callable[[random.Random, int], tuple[torch.Tensor, str, list[torch.Tensor], list[str], str]]


@torch.no_grad()
def icl_probe(backbone: Backbone, draw: Draw, *, shots: Sequence[int], modes: Sequence[str], episodes: int,
              tag: str, batch_size: int = 50, max_new_tokens: int = 3) -> dict[str, dict[int, float]]:
    """Accuracy per demo mode and shot count ({mode: {k: accuracy}}; mode "none" at k = 0), the same episodes (an RNG
    of `tag` and k) for every mode."""
    results: dict[str, dict[int, float]] = {}
    for k in shots:
        for mode in ["none"] if k == 0 else modes:
            rng = random.Random(f"{tag}/{k}")
            correct = 0
            for start in range(0, episodes, batch_size):
                prompts, answers = [], []
                for _ in range(min(batch_size, episodes - start)):
                    query, prompt, pixels, texts, answer = draw(rng, k)
                    prompts.append(build_prompt(mode, query, prompt, demo_images=pixels, demo_texts=texts))
                    answers.append(answer)
                outputs = backbone.generate(prompts, max_new_tokens=max_new_tokens)
                correct += sum(first_word(o) == a for o, a in zip(outputs, answers))
            results.setdefault(mode, {})[k] = correct / episodes
    return results


def probe_concept(backbone: Backbone, *, shots: Sequence[int] = (0, 2, 4, 8), modes: Sequence[str] = ("images", "text"),
                  episodes: int = 200, image_size: int = 32, seed: int = 0, batch_size: int = 50,
                  pool: str = "eval") -> dict[str, dict[int, float]]:
    """Yes/no accuracy on the `pool` rules (held-out: "eval"). Chance is 50% at every k (the query's label is drawn
    apart from the demos')."""
    bank = ImageBank(backbone.image_transform, image_size, seed=seed + 5)
    rules = rule_pools()[pool]

    def draw(rng: random.Random, k: int):
        _, demos, query = concept_episode(rng, rules, k)
        return (bank.draw(rng, query.shape, query.color, query.position), CONCEPT_PROMPT,
                [bank.draw(rng, d.shape, d.color, d.position) for d in demos], [concept_text(d.label) for d in demos],
                query.label)

    return icl_probe(backbone, draw, shots=shots, modes=modes, episodes=episodes, tag=f"concept-probe/{seed}",
                     batch_size=batch_size, max_new_tokens=2)


__all__ = ["icl_probe", "probe_concept"]
