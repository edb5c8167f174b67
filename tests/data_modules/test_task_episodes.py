"""Training episodes of an episodic task (`data_modules.task_episodes`): whole episodes through the shuffle buffer,
demos and query from one episode, balanced labels, deterministic validation within episodes, exact resume."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_modules.downstream import Example
from data_modules.shots import ShotPolicy
from data_modules.streaming import EpisodeLoader, find_shards
from data_modules.task_episodes import TaskEpisodeDataModule, TaskEpisodeStream, balanced_demos
from mmict.eval.tasks import get_task
from mmict.toy.language import CONCEPT_LABELS, CONCEPT_PROMPT, CONCEPT_TUNING_TASK, concept_text
from mmict.toy.world import write_toy_world


@dataclass(frozen=True)
class Tagged:
    """An episodic task whose texts name each example's episode, so a batch shows where its demos came from."""

    name: str = "tagged"
    folder: str = "concept_tuning"
    episodic: bool = True

    def query_prompt(self, query: Example) -> str:
        return f"{query.group} {query.answers[0]}"

    def demo_text(self, demo: Example) -> str:
        return f"{demo.group} {demo.answers[0]}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("concept_tuning")
    # 10 examples per episode, 25 per shard: some episodes straddle two shards.
    write_toy_world(root, num_docs=2, val_docs=1, vqa_train=2, vqa_test=2, binding_episodes=1, concept_episodes=1,
                    concept_tuning_episodes=12, concept_tuning_val_episodes=3, concept_tuning_per_class=5,
                    image_size=16, samples_per_shard=25)
    return root


def _episodes(batches) -> list[tuple[list[str], str, str]]:
    """(demo texts, query prompt, target) of every episode of the batches."""
    out, i = [], 0
    for batch in batches:
        for prompt, target, k in zip(batch.query_prompts, batch.query_targets, batch.demo_counts, strict=True):
            out.append((batch.demo_texts[i:i + k], prompt, target))
            i += k
        i = 0
    return out


def _check_pure_and_balanced(episodes, max_shots: int) -> None:
    for demos, prompt, target in episodes:
        episode, label = prompt.split()
        assert label == target and 1 <= len(demos) <= max_shots
        assert all(d.split()[0] == episode for d in demos)  # never another episode's examples
        counts = Counter(d.split()[1] for d in demos)
        assert abs(counts["yes"] - counts["no"]) <= 1


def test_train_episodes_never_mix_episodes_and_balance_labels(root):
    dm = TaskEpisodeDataModule(root, task=Tagged(), val_split="val", image_transform=lambda im: im.size,
                               batch_size=4, min_shots=1, max_shots=7, epoch_size=200, shuffle_buffer=6, seed=0)
    dm.setup("fit")
    episodes = _episodes(dm.train_dataloader())
    assert len(episodes) == 200
    _check_pure_and_balanced(episodes, 7)
    queries = [prompt.split()[0] for _, prompt, _ in episodes]
    assert len(set(queries)) == 12 and queries[:12] != sorted(queries[:12])  # whole episodes, shuffled
    assert 0.35 <= Counter(t for _, _, t in episodes)["yes"] / len(episodes) <= 0.65
    assert {len(d) for d, _, _ in episodes} == set(range(1, 8))  # the shot plan's k, up to 7 of 9 left


def test_train_episodes_show_the_task_prompt_and_demo_texts(root):
    dm = TaskEpisodeDataModule(root, task=get_task(CONCEPT_TUNING_TASK), val_split="val",
                               image_transform=lambda im: im.size, batch_size=4, min_shots=2, max_shots=4,
                               epoch_size=16, shuffle_buffer=4, seed=1)
    dm.setup("fit")
    for batch in [*dm.train_dataloader(), *dm.val_dataloader()]:
        assert set(batch.query_prompts) == {CONCEPT_PROMPT} and set(batch.query_targets) <= set(CONCEPT_LABELS)
        assert set(batch.demo_texts) <= {concept_text(label) for label in CONCEPT_LABELS}


def test_fewer_shards_than_readers_deal_whole_episodes(root):
    urls = find_shards(root, "concept_tuning", "val")  # 30 examples: 2 shards, 3 episodes
    stream = TaskEpisodeStream(urls, task=Tagged(), image_transform=lambda im: im.size, batch_size=2,
                               policy=ShotPolicy.uniform(3, 3), seed=0, train=True, shuffle_buffer=4,
                               batches_per_rank=4)
    for worker in range(3):  # 3 readers, 2 shards: each reads every shard, keeps every 3rd episode part
        episodes = _episodes(stream._train_batches(worker, 3))
        assert episodes and all(len(demos) == 3 for demos, _, _ in episodes)  # whole episodes: k always fits
        _check_pure_and_balanced(episodes, 3)


def test_resumed_episodic_stream_continues_exactly(root):
    urls = find_shards(root, "concept_tuning", "train")

    def stream() -> TaskEpisodeStream:
        return TaskEpisodeStream(urls, task=Tagged(), image_transform=lambda im: im.size, batch_size=2,
                                 policy=ShotPolicy.uniform(1, 5), seed=0, train=True, shuffle_buffer=5,
                                 batches_per_rank=9)

    full = list(EpisodeLoader(stream(), batch_size=None, num_workers=0))
    states = {b.resume["worker"]: b.resume for b in full[:4]}
    resumed = list(EpisodeLoader(stream(), batch_size=None, num_workers=0, resume=states))
    assert [b.sources for b in resumed] == [b.sources for b in full[4:]]
    assert [b.demo_texts for b in resumed] == [b.demo_texts for b in full[4:]]
    assert [b.demo_counts for b in resumed] == [b.demo_counts for b in full[4:]]


def test_validation_stays_within_episodes_and_is_deterministic(root):
    dm = TaskEpisodeDataModule(root, task=Tagged(), val_split="val", image_transform=lambda im: im.size,
                               batch_size=4, min_shots=1, max_shots=6, epoch_size=8, shuffle_buffer=4, seed=0)
    dm.setup("fit")
    first, again = list(dm.val_dataloader()), list(dm.val_dataloader())
    episodes = _episodes(first)
    assert episodes == _episodes(again)
    assert len(episodes) == 3 * 10  # every val example the query once
    assert all(len(demos) == 6 for demos, _, _ in episodes)
    _check_pure_and_balanced(episodes, 6)
    assert len({s for b in first for s in b.sources}) == 30


def test_balanced_demos_cycle_over_classes_and_give_way_when_one_runs_out():
    def pool(yes: int, no: int) -> dict[str, list[Example]]:
        make = lambda label, i: Example(id=f"{label}{i}", image=None, question="", answers=[label], task="t")  # noqa: E731
        return {"no": [make("no", i) for i in range(no)], "yes": [make("yes", i) for i in range(yes)]}

    rng = random.Random(0)
    for k in range(7):
        counts = Counter(d.answers[0] for d in balanced_demos(rng, pool(5, 5), k))
        assert sum(counts.values()) == k and abs(counts["yes"] - counts["no"]) <= 1
    counts = Counter(d.answers[0] for d in balanced_demos(rng, pool(1, 6), 5))
    assert counts == {"yes": 1, "no": 4}  # yes runs out: its turns go to no
    assert len(balanced_demos(rng, pool(1, 2), 8)) == 3  # fewer than k when the episode holds fewer
    assert balanced_demos(rng, {}, 3) == []
