"""Concept induction in the toy world (as VL-ICL Bench's concept tasks probe real models).

An episode has a hidden rule, a conjunction of two attribute values (``(("color", "red"), ("position", "left"))``:
a red shape on the left); its images are labelled "yes" or "no" by the rule: k demos "<image> does it fit ? yes",
then the query "<image> does it fit ?" -> "yes" / "no". The query's label is drawn apart from the demos' (and the
demos are balanced), so the labels alone say nothing: zero-shot and text-only demos are at chance (1/2), and only
the demo images with their labels define the rule. Every answer is "yes" or "no": no unseen word is copied.

Rules come from disjoint pools (`language.rule_pools`: backbone pretraining, the training corpus, the
evaluation), as the binding task's nonsense words do, so no evaluated rule was ever trained on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mmict.toy.language import CONCEPT_LABELS, CONCEPT_VALUES

Rule = tuple[tuple[str, str], ...]  # ((attribute, value), ...), e.g. (("color", "red"), ("position", "left"))


@dataclass(frozen=True)
class ConceptImage:
    """One image of an episode: what to draw and its label under the episode's rule ("yes" / "no")."""

    shape: str
    color: str
    position: str
    label: str


def satisfies(image: ConceptImage | dict[str, str], rule: Rule) -> bool:
    attrs = image if isinstance(image, dict) else {"shape": image.shape, "color": image.color,
                                                   "position": image.position}
    return all(attrs[a] == v for a, v in rule)


def rule_image(rng: random.Random, rule: Rule, label: str) -> ConceptImage:
    """An image labelled ``label`` by ``rule``: "yes" has every value of the rule (the other attribute uniformly
    random); "no" is a uniformly random image that breaks the rule (at least one of its values is another)."""
    for attribute, value in rule:
        if attribute not in CONCEPT_VALUES or value not in CONCEPT_VALUES[attribute]:
            raise ValueError(f"unknown rule {rule!r}; attributes and values: {CONCEPT_VALUES}")
    if label not in CONCEPT_LABELS:
        raise ValueError(f"unknown label {label!r}; known: {CONCEPT_LABELS}")
    while True:
        attrs = {name: rng.choice(values) for name, values in CONCEPT_VALUES.items()}
        if label == "yes":
            attrs.update(dict(rule))
            break
        if not satisfies(attrs, rule):
            break
    return ConceptImage(attrs["shape"], attrs["color"], attrs["position"], label)


def balanced_labels(rng: random.Random, k: int) -> list[str]:
    """k labels cycling yes / no from a random start, in random order: from k >= 2 on both labels have a demo, and
    the two counts differ by at most one (as `binding.balanced_classes`)."""
    start = rng.randrange(len(CONCEPT_LABELS))
    labels = [CONCEPT_LABELS[(start + i) % len(CONCEPT_LABELS)] for i in range(k)]
    rng.shuffle(labels)
    return labels


def concept_episode(rng: random.Random, pool: Sequence[Rule], k: int
                    ) -> tuple[Rule, list[ConceptImage], ConceptImage]:
    """(rule, k demos, query) for a rule drawn from ``pool``. The demos' labels are balanced; the query's label is
    uniformly random, independent of them, so text-only demos carry no information (chance 1/2)."""
    rule = rng.choice(pool)
    demos = [rule_image(rng, rule, label) for label in balanced_labels(rng, k)]
    return rule, demos, rule_image(rng, rule, rng.choice(CONCEPT_LABELS))


def concept_document(rng: random.Random, pool: Sequence[Rule], k: int) -> list[ConceptImage]:
    """k demos then the query, as the pairs of an interleaved document."""
    _, demos, query = concept_episode(rng, pool, k)
    return [*demos, query]
