"""Training episodes from a downstream task's own train split (MMICT trains on the task; AIM never does).

Examples stream from ``root/<task folder>/train-*.tar`` through a shuffle buffer; every k + 1 consecutive
examples of the shuffled stream make one episode: the first k are the demonstrations, the last is the query
(k from the shot policy, `data_modules.shots`). Demos are thus random examples of the split, as MMICT
samples them, without holding the split in memory. A query's target is one of its reference answers or
captions, drawn at random (VQA's ten human answers, COCO's five captions). The batches are the same as the
web corpus's (`collate_episodes`), so every module trains on either.

Validation: ``val_split`` (e.g. ``val``) read once in order, k = max_shots, every example after the first k the
query once with its k predecessors as demos (a split smaller than k + 1 validates at the shots it has, warned); no
shards there means no validation, with a warning. Prompts and demo texts are the task's own (`mmict.eval.tasks`),
so training and evaluation show a model the same format; the task (its folder and formats) is passed in by the
caller.

Episodic tasks (`episodic`: binding, concept; `Example.group` is the episode) never mix episodes, whose labels
only hold within them: the stream's consecutive examples of one episode are grouped right after the shards are
read (shards are written episode-contiguous), and whole episodes go through dealing, the shuffle buffer (its size
then counts episodes) and the resume position. Each episode gives one training episode: the query first, of a
class drawn uniformly among the episode's (so its label says nothing the demos do not), then k demos of the
rest, balanced over the classes (answers[0]) cycling from a random start as the evaluation's episodic selection
draws them. Validation: every example of an episode the query once, its k demos drawn so from the rest of its
episode, from (seed, query id).
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from .augment import ReferenceAugment
from .downstream import Example, convert_command, decode_example
from .episodes import ImageTransform
from .skips import record_skip
from .streaming import (
    ShardStream,
    ShotPlan,
    _Watchdog,
    source_of,
)
from .streaming_module import StreamingDataModule

logger = logging.getLogger(__name__)


class EpisodeFormat(Protocol):
    """What a task's episodes need from the task table (`mmict.eval.tasks.Task` is one): passed in by the caller,
    so the data layer never imports evaluation. Its functions must be picklable (module-level functions) to reach
    DataLoader workers under the spawn start method. A format with ``episodic = True`` (read with a default of
    False) has its episodes drawn within `Example.group` (see the module docstring)."""

    name: str
    folder: str  # under data.root

    def query_prompt(self, query: Example) -> str: ...

    def demo_text(self, demo: Example) -> str: ...


def task_episode(demos: list[Example], query: Example, task: EpisodeFormat, rng: random.Random) -> dict:
    """One episode in `collate_episodes`' input form, with the task's prompt and demo formats.

    A format with `train_prompts` (MMICT's reference: six caption instructions) prompts each training query with
    one drawn from the episode's generator (so a resumed stream draws the same), and `train_target` rewrites the
    target as the reference's training sees it (its caption cleaning)."""
    target = rng.choice(query.answers)
    train_prompts = getattr(task, "train_prompts", ())
    clean = getattr(task, "train_target", None)
    return {
        "demo_images": [d.image for d in demos],
        "demo_texts": [task.demo_text(d) for d in demos],
        "query_image": query.image,
        "query_prompt": rng.choice(train_prompts) if train_prompts else task.query_prompt(query),
        "query_target": clean(target) if clean is not None else target,
    }


def _decoded(samples: Iterable[dict], image_transform: ImageTransform, watchdog: _Watchdog, eager: bool = True
             ) -> Iterator[tuple[Example, str]]:
    """Each usable example of the stream with its source; corrupt samples are skipped and counted."""
    for sample in samples:
        watchdog.shards_since_sample = 0
        example = decode_example(sample, image_transform, eager=eager)
        if example is not None:
            yield example, source_of(sample)


def _group_episodes(
    samples: Iterable[dict], *, task: EpisodeFormat, image_transform: ImageTransform, plan: ShotPlan,
    rng: random.Random | None, seed: int, watchdog: _Watchdog, augment_size: int | None = None,
) -> Iterator[dict]:
    """Decode examples (corrupt ones are skipped and counted) and group every k + 1 into an episode. Training
    (`rng` given) with `augment_size` augments images as MMICT's reference (`augment.ReferenceAugment`).

    An episodic task's training stream arrives as whole episodes (`episode_units`, grouped before the shuffle
    buffer by `TaskEpisodeStream`); its validation stream, in order, is grouped here."""
    if getattr(task, "episodic", False):
        yield from _episodic_episodes(samples if rng is not None else episode_units(samples), task=task,
                                      image_transform=image_transform, plan=plan, rng=rng, seed=seed,
                                      watchdog=watchdog, augment_size=augment_size)
        return
    if rng is None:
        yield from _validation_episodes(samples, task=task, image_transform=image_transform, plan=plan, seed=seed,
                                        watchdog=watchdog)
        return
    if augment_size is not None:
        image_transform = ReferenceAugment(image_transform, augment_size, rng)
    group: list[Example] = []
    want = None
    made = 0
    for example, source in _decoded(samples, image_transform, watchdog):
        if want is None:
            want = plan(made)[0] + 1
        group.append(example)
        if len(group) == want:
            yield {**task_episode(group[:-1], group[-1], task, rng), "source": source}
            group, want = [], None
            made += 1


def _validation_episodes(
    samples: Iterable[dict], *, task: EpisodeFormat, image_transform: ImageTransform, plan: ShotPlan, seed: int,
    watchdog: _Watchdog,
) -> Iterator[dict]:
    """Validation: every example after the first k is a query once, its k predecessors its demos (a sliding
    window, so validation scores nearly every val example, not one in k + 1). A split with fewer than k + 1 usable
    examples validates at the shots it has (each example the query once, the others its demos), with a warning;
    one with fewer than 2 cannot make an episode (warned). Targets are drawn from (seed, query id): the same on
    every pass and worker split."""
    k = plan(0)[0]
    window: deque[Example] = deque(maxlen=k)
    kept: list[tuple[Example, str]] = []  # the split's examples while no episode has been made (the fallback)
    made = 0
    for example, source in _decoded(samples, image_transform, watchdog):
        if len(window) == k:  # k = 0: every example a query without demos
            yield {**task_episode(list(window), example, task, random.Random(f"{seed}/{example.id}")),
                   "source": source}
            made += 1
        window.append(example)
        if made == 0:
            kept.append((example, source))
    if made or k == 0:
        return
    name = getattr(task, "name", "task")
    if len(kept) < 2:
        logger.warning("the %s val split has %d usable example(s): no validation episode can be made (needs 2; "
                       "max_shots + 1 = %d for full episodes); training runs without validation loss", name,
                       len(kept), k + 1)
        return
    logger.warning("the %s val split has %d usable examples, fewer than max_shots + 1 = %d: validating at %d "
                   "shots (each example the query once)", name, len(kept), k + 1, len(kept) - 1)
    for i, (query, source) in enumerate(kept):
        demos = [ex for j, (ex, _) in enumerate(kept) if j != i]
        yield {**task_episode(demos, query, task, random.Random(f"{seed}/{query.id}")), "source": source}


# ---------------------------------------------------------------------------------------------------
# Episodic tasks: demos and query from one episode

# A train stream whose episodes are all too small for the shots would otherwise spin on resampled shards.
MAX_CONSECUTIVE_SMALL_EPISODES = 1_000


def _episode_of(sample: dict) -> str | None:
    """A raw sample's json "episode" (None when it has none or its json does not parse: decoding deals with it)."""
    try:
        meta = json.loads(sample["json"])
    except (KeyError, TypeError, ValueError):
        return None
    episode = meta.get("episode") if isinstance(meta, dict) else None
    return None if episode is None else str(episode)


def episode_units(samples: Iterable[dict]) -> Iterator[list[dict]]:
    """Consecutive samples of one episode as one list. A list ends where the episode changes, at another shard, or
    where a sample comes again (its shard's next pass); a sample of no known episode (corrupt, counted when
    decoded) stays in the list it arrives in."""
    unit: list[dict] = []
    episode: str | None = None
    keys: set = set()
    for sample in samples:
        this = _episode_of(sample)
        if unit and ((this is not None and episode is not None and this != episode)
                     or sample.get("__url__") != unit[-1].get("__url__") or sample.get("__key__") in keys):
            yield unit
            unit, episode, keys = [], None, set()
        unit.append(sample)
        keys.add(sample.get("__key__"))
        episode = episode if episode is not None else this
    if unit:
        yield unit


def _by_class(examples: Iterable[Example]) -> dict[str, list[Example]]:
    classes: dict[str, list[Example]] = {}
    for example in examples:
        classes.setdefault(example.answers[0], []).append(example)
    return dict(sorted(classes.items()))


def balanced_demos(rng: random.Random, by_class: dict[str, list[Example]], k: int) -> list[Example]:
    """k examples cycling over the classes (sorted) from a random start, in random order: the counts the
    evaluation's episodic selection draws. A class with no example left gives its turn to the next; fewer than k
    when the classes hold fewer."""
    labels = [label for label, examples in sorted(by_class.items()) if examples]
    if not labels:
        return []
    counts = dict.fromkeys(labels, 0)
    turn = rng.randrange(len(labels))
    for _ in range(min(k, sum(len(by_class[label]) for label in labels))):
        while counts[labels[turn % len(labels)]] >= len(by_class[labels[turn % len(labels)]]):
            turn += 1
        counts[labels[turn % len(labels)]] += 1
        turn += 1
    demos = [demo for label in labels for demo in rng.sample(by_class[label], counts[label])]
    rng.shuffle(demos)
    return demos


def _episode_examples(unit: Iterable[dict], task: EpisodeFormat, image_transform: ImageTransform,
                      watchdog: _Watchdog) -> list[tuple[Example, str]]:
    """The usable examples of one episode's samples, their images transformed when first used."""
    examples = list(_decoded(unit, image_transform, watchdog, eager=False))
    for example, _ in examples:
        if example.group is None:
            raise ValueError(f"episodic task {getattr(task, 'name', 'task')}, but example {example.id} has no "
                             "'episode' in its json")
    return examples


def _episodic_episodes(
    units: Iterable[list[dict]], *, task: EpisodeFormat, image_transform: ImageTransform, plan: ShotPlan,
    rng: random.Random | None, seed: int, watchdog: _Watchdog, augment_size: int | None = None,
) -> Iterator[dict]:
    """Training (`rng`): one episode per unit, its query of a class drawn uniformly among the episode's, then k
    demos of the rest (`balanced_demos`); an episode too small for the stage's min_shots is skipped and counted.
    Validation (`rng` None): every example of a unit the query once, its demos from the rest, drawn from
    (seed, query id)."""
    if rng is not None and augment_size is not None:
        image_transform = ReferenceAugment(image_transform, augment_size, rng)
    made = small = short = 0  # small: skipped in a row (training); short: validated at fewer shots
    for unit in units:
        examples = _episode_examples(unit, task, image_transform, watchdog)
        if rng is None:
            k = plan(0)[0]
            for i, (query, source) in enumerate(examples):
                pick = random.Random(f"{seed}/{query.id}")
                demos = balanced_demos(pick, _by_class(ex for j, (ex, _) in enumerate(examples) if j != i), k)
                if len(demos) < k and not short:
                    logger.warning("the %s val split has an episode of %d usable examples, fewer than max_shots + 1 "
                                   "= %d: its queries validate at the shots it has", getattr(task, "name", "task"),
                                   len(examples), k + 1)
                short += len(demos) < k
                yield {**task_episode(demos, query, task, pick), "source": source}
            continue
        k, fewest = plan(made)
        by_class = _by_class(ex for ex, _ in examples)
        if not by_class or len(examples) < fewest + 1:
            if examples:  # corrupt samples were counted as they were decoded
                record_skip("too few examples in the episode", len(examples))
            small += 1
            if small >= MAX_CONSECUTIVE_SMALL_EPISODES:
                raise RuntimeError(f"{small} episodes in a row had fewer than {fewest + 1} usable examples "
                                   "(min_shots + 1); check the shards and the shot counts")
            continue
        small = 0
        query = rng.choice(by_class[rng.choice(list(by_class))])
        demos = balanced_demos(rng, _by_class(ex for ex, _ in examples if ex is not query), k)
        source = next(src for ex, src in examples if ex is query)
        yield {**task_episode(demos, query, task, rng), "source": source}
        made += 1


class TaskEpisodeStream(ShardStream):
    """`ShardStream` (disjoint shards per rank and worker, seeded, exact resume) with task episodes."""

    def __init__(self, urls: list[str], *, task: EpisodeFormat, augment_size: int | None = None, **kwargs) -> None:
        super().__init__(urls, **kwargs)
        self.task = task
        self.augment_size = augment_size

    def _episode_stage(self, samples: Iterable[dict], plan: ShotPlan, rng: random.Random | None,
                       watchdog: _Watchdog) -> Iterator[dict]:
        return _group_episodes(samples, task=self.task, image_transform=self.image_transform, plan=plan, rng=rng,
                               seed=self.seed, watchdog=watchdog, augment_size=self.augment_size)

    def _stream_items(self, samples: Iterable[dict]) -> Iterable:
        """An episodic task's whole episodes (`episode_units`) as the stream's items, grouped right after the shards
        are read: dealing by document, the shuffle buffer and the resume position then count episodes and never
        split one."""
        return episode_units(samples) if getattr(self.task, "episodic", False) else samples


class TaskEpisodeDataModule(StreamingDataModule):
    """Episodes of `task` from its train split, validated on `val_split` (see the module docstring)."""

    def __init__(self, root: str | Path, *, task: EpisodeFormat, val_split: str = "val",
                 augment_size: int | None = None, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.task = task
        self.val_split = val_split
        self.augment_size = augment_size  # training images augmented as MMICT's reference, cropped to this size

    stream_class = TaskEpisodeStream

    @property
    def folder(self) -> str:
        return self.task.folder

    def _split_name(self, split: str) -> str:
        return self.val_split if split == "val" else split

    def _describe(self, split: str) -> str:
        return f"The {self.task.name} {self._split_name(split)} split"

    def _build_command(self) -> str:
        return convert_command(self.task.name, self.root / self.folder, "train")

    def _stream_extra(self) -> dict:
        return {"task": self.task, "augment_size": self.augment_size}


__all__ = ["EpisodeFormat", "TaskEpisodeDataModule", "TaskEpisodeStream", "balanced_demos", "episode_units",
           "task_episode"]
