"""Demo selection: which k pool examples a query sees as its demonstrations.

`random` draws k distinct examples from the whole pool (OpenFlamingo's protocol). `episodic` (binding
tasks) draws them from the query's own episode, cycling over its classes from a random start, so from
k >= N every class has a demo and the query's class may or may not have one at k < N: answering with a
demo's word is right 1 time in N at every k >= 1 (the chance rate the tables report).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from data_modules.downstream import Example


class DemoSelector:
    def __init__(self, pool: Sequence[Example], episodic: bool = False) -> None:
        self.pool, self.episodic = list(pool), episodic
        self.episodes: dict[str, dict[str, list[Example]]] = defaultdict(lambda: defaultdict(list))
        if episodic:
            for ex in self.pool:
                if ex.group is None:
                    raise ValueError(f"episodic task, but pool example {ex.id} has no 'episode' in its json")
                self.episodes[ex.group][ex.answers[0]].append(ex)

    def classes(self, query: Example) -> int:
        """How many classes the query's episode has (its chance rate is 1 / this)."""
        return len(self._episode(query))

    def _episode(self, query: Example) -> dict[str, list[Example]]:
        if query.group not in self.episodes:
            raise ValueError(f"query {query.id} is from episode {query.group!r}, which has no demos in the pool")
        return self.episodes[query.group]

    def select(self, rng: random.Random, query: Example, k: int) -> list[Example]:
        if not self.episodic:
            if k > len(self.pool):
                raise ValueError(f"{k} shots asked but the demo pool has only {len(self.pool)} examples")
            return rng.sample(self.pool, k)
        by_class = self._episode(query)
        labels = sorted(by_class)
        start = rng.randrange(len(labels))
        counts = [sum(1 for i in range(k) if (start + i) % len(labels) == c) for c in range(len(labels))]
        demos = []
        for label, n in zip(labels, counts):
            if n > len(by_class[label]):
                raise ValueError(f"{k} shots need {n} demos of class {label!r} in episode {query.group}, "
                                 f"the pool has {len(by_class[label])}: raise binding_pool_per_class")
            demos += rng.sample(by_class[label], n)
        rng.shuffle(demos)
        return demos
