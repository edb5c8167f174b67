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
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from .augment import ReferenceAugment
from .downstream import Example, convert_command, decode_example
from .episodes import ImageTransform
from .streaming import ShardStream, ShotPlan, _Watchdog, source_of
from .streaming_module import StreamingDataModule

logger = logging.getLogger(__name__)


class EpisodeFormat(Protocol):
    """What a task's episodes need from the task table (`mmict.eval.tasks.Task` is one): passed in by the caller,
    so the data layer never imports evaluation. Its functions must be picklable (module-level functions) to reach
    DataLoader workers under the spawn start method."""

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


def _decoded(samples: Iterable[dict], image_transform: ImageTransform, watchdog: _Watchdog
             ) -> Iterator[tuple[Example, str]]:
    """Each usable example of the stream with its source; corrupt samples are skipped and counted."""
    for sample in samples:
        watchdog.shards_since_sample = 0
        example = decode_example(sample, image_transform, eager=True)
        if example is not None:
            yield example, source_of(sample)


def _group_episodes(
    samples: Iterable[dict], *, task: EpisodeFormat, image_transform: ImageTransform, plan: ShotPlan,
    rng: random.Random | None, seed: int, watchdog: _Watchdog, augment_size: int | None = None,
) -> Iterator[dict]:
    """Decode examples (corrupt ones are skipped and counted) and group every k + 1 into an episode. Training
    (`rng` given) with `augment_size` augments images as MMICT's reference (`augment.ReferenceAugment`)."""
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


__all__ = ["EpisodeFormat", "TaskEpisodeDataModule", "TaskEpisodeStream", "task_episode"]
