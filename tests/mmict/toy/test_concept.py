"""Concept induction in the toy world: rule pools, labelled images, episodes whose labels alone say nothing, and the
concept documents and tasks the toy world writes."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from data_modules.web_documents import document_pairs
from mmict.toy.concept import ConceptImage, balanced_labels, concept_document, concept_episode, rule_image, satisfies
from mmict.toy.language import (
    COLORS,
    CONCEPT_LABELS,
    CONCEPT_PROMPT,
    CONCEPT_TASK,
    CONCEPT_TUNING_TASK,
    POSITIONS,
    SHAPES,
    concept_text,
    rule_name,
    rule_pools,
    tokenize,
    toy_vocabulary,
    word_pools,
)
from mmict.toy.world import make_concept_document, write_toy_world

VALUES = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}
ALL_RULES = [((a, va), (b, vb)) for i, a in enumerate(VALUES) for b in list(VALUES)[i + 1:]
             for va in VALUES[a] for vb in VALUES[b]]


EVAL_RULES = {rule_name(r) for r in rule_pools()["eval"]}


def _value(image: ConceptImage, attribute: str) -> str:
    return getattr(image, attribute)


def test_rule_pools_are_disjoint_complete_and_every_pool_uses_every_attribute_pair():
    pools = rule_pools()
    assert list(pools) == ["pretrain", "tuning", "eval"]
    assert {k: len(v) for k, v in pools.items()} == {"pretrain": 64, "tuning": 16, "eval": 16}
    every = [rule for rules in pools.values() for rule in rules]
    assert sorted(every) == sorted(ALL_RULES) and len(every) == len(set(every))  # each rule exactly once
    assert rule_pools() == pools  # a fixed split
    for rules in pools.values():  # held-out rules are new combinations of values the other pools use
        assert {tuple(a for a, _ in r) for r in rules} == {("color", "shape"), ("color", "position"),
                                                            ("shape", "position")}
    pretrain_values = {c for r in pools["pretrain"] for c in r}
    assert {c for r in pools["eval"] for c in r} <= pretrain_values


def test_concept_texts_are_in_the_toy_vocabulary():
    assert concept_text("yes") == "does it fit ? yes" and CONCEPT_PROMPT == "does it fit ?"
    assert CONCEPT_LABELS == ("yes", "no") and (CONCEPT_TASK, CONCEPT_TUNING_TASK) == ("toy_concept",
                                                                                      "toy_concept_tuning")
    vocabulary = set(toy_vocabulary())
    assert {"does", "it", "fit", "?", "yes", "no"} <= vocabulary
    assert all(set(tokenize(concept_text(label))) <= vocabulary for label in CONCEPT_LABELS)
    # Nonsense words still split into their two syllables: none starts with a new real word ("fit...").
    assert not any(w.startswith("fit") for pool in word_pools().values() for w in pool)


@pytest.mark.parametrize("rule", ALL_RULES[::7])
def test_yes_images_have_the_values_and_no_images_break_the_rule(rule):
    rng = random.Random(str(rule))
    yes = [rule_image(rng, rule, "yes") for _ in range(60)]
    no = [rule_image(rng, rule, "no") for _ in range(60)]
    assert all(satisfies(im, rule) and im.label == "yes" for im in yes)
    assert all(not satisfies(im, rule) and im.label == "no" for im in no)
    # The attribute the rule leaves free varies (uniformly random), so it says nothing about the label.
    (free,) = VALUES.keys() - {a for a, _ in rule}
    assert len({_value(im, free) for im in yes}) > 2 and len({_value(im, free) for im in no}) > 2
    with pytest.raises(ValueError):
        rule_image(rng, rule, "maybe")
    with pytest.raises(ValueError):
        rule_image(rng, (("color", "teal"), ("shape", "circle")), "yes")


def test_labels_are_balanced():
    rng = random.Random(0)
    for k in range(1, 10):
        for _ in range(20):
            counts = Counter(balanced_labels(rng, k))
            assert sum(counts.values()) == k and set(counts) <= set(CONCEPT_LABELS)
            assert abs(counts["yes"] - counts["no"]) <= 1
            assert k < 2 or set(counts) == set(CONCEPT_LABELS)
    assert {tuple(balanced_labels(rng, 1)) for _ in range(50)} == {("yes",), ("no",)}  # a random start


def test_query_label_is_independent_of_the_demo_labels():
    rng = random.Random(1)
    by_majority: dict[str, list[bool]] = {"yes": [], "no": [], "tie": []}
    for _ in range(2000):
        rule, demos, query = concept_episode(rng, rule_pools()["tuning"], 4)
        assert rule in rule_pools()["tuning"]
        counts = Counter(d.label for d in demos)
        majority = "tie" if counts["yes"] == counts["no"] else counts.most_common(1)[0][0]
        by_majority[majority].append(query.label == "yes")
    assert 0.45 <= sum(by_majority["tie"]) / len(by_majority["tie"]) <= 0.55  # k = 4: always 2 / 2
    everything = [y for answers in by_majority.values() for y in answers]
    assert 0.45 <= sum(everything) / len(everything) <= 0.55
    # Odd k has a majority: the query's label does not follow it (nor go against it).
    odd = {"yes": [], "no": []}
    for _ in range(2000):
        _, demos, query = concept_episode(rng, rule_pools()["tuning"], 3)
        odd[Counter(d.label for d in demos).most_common(1)[0][0]].append(query.label == "yes")
    assert all(0.45 <= sum(v) / len(v) <= 0.55 for v in odd.values())


def test_concept_document_is_demos_then_query_of_one_rule():
    rng = random.Random(2)
    for _ in range(50):
        pairs = concept_document(rng, rule_pools()["eval"], 5)
        assert len(pairs) == 6
        rules = [r for r in rule_pools()["eval"] if all(satisfies(p, r) == (p.label == "yes") for p in pairs)]
        assert rules  # one eval rule explains every label


def test_concept_document_round_trips_through_the_web_corpus_reader():
    rng = random.Random(3)
    doc = make_concept_document(rng, "doc_0", image_size=16)
    texts = doc["text_list"]
    assert 2 <= len(texts) <= 8 and all(t in (concept_text("yes"), concept_text("no")) for t in texts)
    pairs = document_pairs({"__key__": "doc_0", "json": json.dumps(doc).encode()})
    assert pairs is not None and [text for _, text in pairs] == texts  # text order restored from image_info
    assert all(image.size == (16, 16) for image, _ in pairs)


def _read(root: Path, folder: str, split: str) -> list[dict]:
    urls = sorted(str(p) for p in (root / folder).glob(f"{split}-*.tar"))
    return [json.loads(s["json"]) for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("concept_world")
    manifest = write_toy_world(root, num_docs=40, val_docs=4, vqa_train=2, vqa_test=2, binding_fraction=0.25,
                               concept_fraction=0.5, binding_episodes=1, concept_episodes=4, concept_pool_per_class=3,
                               concept_queries_per_episode=5, concept_tuning_episodes=3,
                               concept_tuning_val_episodes=2, concept_tuning_per_class=2, image_size=16,
                               samples_per_shard=7)
    return root, manifest


def test_the_web_corpus_holds_concept_episodes_over_tuning_rules(world):
    root, manifest = world
    assert manifest["recipe"]["concept_fraction"] == 0.5
    docs = _read(root, "web", "train")
    concept = [d for d in docs if d["text_list"][0].startswith(CONCEPT_PROMPT)]
    binding = [d for d in docs if d["text_list"][0].startswith("this is a")]
    assert concept and binding and len(concept) + len(binding) < len(docs)  # all three kinds


def test_concept_task_is_laid_out_as_the_binding_task(world):
    root, manifest = world
    assert manifest["counts"]["concept/train"] == 4 * 2 * 3 and manifest["counts"]["concept/test"] == 4 * 5
    train, test = _read(root, "concept", "train"), _read(root, "concept", "test")
    for meta in train + test:
        assert meta["task"] == CONCEPT_TASK and meta["prompt"] == CONCEPT_PROMPT
        assert set(meta) == {"id", "task", "episode", "prompt", "answers", "rule", "attribute", "value"}
        assert meta["rule"] in EVAL_RULES
    rule = {m["episode"]: m["rule"] for m in train}
    assert sorted(rule) == [f"ep{e:05d}" for e in range(4)]
    assert all(rule[m["episode"]] == m["rule"] for m in test)  # both splits agree on the rule
    for episode in rule:
        assert Counter(m["answers"][0] for m in train if m["episode"] == episode) == {"yes": 3, "no": 3}
    assert {m["answers"][0] for m in test} == set(CONCEPT_LABELS)


def test_concept_tuning_splits_use_the_tuning_rules_episode_by_episode(world):
    root, manifest = world
    assert manifest["counts"]["concept_tuning/train"] == 3 * 4 and manifest["counts"]["concept_tuning/val"] == 2 * 4
    for split, episodes in (("train", 3), ("val", 2)):
        metas = _read(root, "concept_tuning", split)
        assert all(m["task"] == CONCEPT_TUNING_TASK and m["rule"] in {rule_name(r) for r in rule_pools()["tuning"]}
                   for m in metas)
        order = [m["episode"] for m in metas]
        assert order == sorted(order) and len(set(order)) == episodes  # each episode's examples contiguous
        assert all(Counter(m["answers"][0] for m in metas if m["episode"] == e) == {"yes": 2, "no": 2}
                   for e in set(order))
