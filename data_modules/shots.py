"""How many demonstrations an episode gets at a training step: fixed, uniform in a range, or a schedule.

A `ShotPolicy` is a pure function of (training step, episode index in the batch): the k it gives is drawn
from a hash of (seed, step, episode), never from a running RNG. That is what lets the DataLoader workers
cut each episode with exactly the k its step asks for (no decoding of demos that are then thrown away),
and what makes the shot counts identical after a resume. The `callbacks.DemoSampler` callback owns the
policy during a run: it hands it to the data module, checks the batches follow it, logs the shots and
keeps the policy in the checkpoint.

A document (or task stream) shorter than the drawn k gives all the demos it has, but never fewer than the
stage's ``min_shots``: with ``shots: 8`` every episode has exactly 8 demos; with ``[1, 8]`` a 4-pair
document gives at most 3.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShotStage:
    start_step: int  # the stage applies from this training step on (until the next stage's start)
    min_shots: int
    max_shots: int


@dataclass(frozen=True)
class ShotPolicy:
    """k ~ uniform[min_shots, max_shots] of the stage the step is in, drawn per episode or per step."""

    stages: tuple[ShotStage, ...]
    per: str = "episode"  # episode: each episode its own k | step: every episode of a batch shares k
    seed: int = 0
    val_shots: int = field(default=-1)  # validation's k (the hardest setting: the largest max_shots)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a shot policy needs at least one stage")
        if self.stages[0].start_step != 0:
            raise ValueError(f"data.shot_schedule must start at step 0, got {self.stages[0].start_step}")
        starts = [s.start_step for s in self.stages]
        if starts != sorted(set(starts)):
            raise ValueError(f"data.shot_schedule steps must increase strictly, got {starts}")
        for s in self.stages:
            if not 0 <= s.min_shots <= s.max_shots:
                raise ValueError(f"need 0 <= min_shots <= max_shots, got {s.min_shots} and {s.max_shots}"
                                 f" (stage from step {s.start_step})")
        if self.per not in ("episode", "step"):
            raise ValueError(f"data.shots_per must be 'episode' or 'step', got {self.per!r}")
        if self.val_shots < 0:
            object.__setattr__(self, "val_shots", self.max_shots)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, min_shots: int, max_shots: int, seed: int = 0, per: str = "episode") -> ShotPolicy:
        return cls((ShotStage(0, min_shots, max_shots),), per=per, seed=seed)

    @classmethod
    def from_config(cls, data: Any, seed: int = 0) -> ShotPolicy:
        """From the `data` config section: `shots` (fixed), else `shot_schedule`, else [min_shots, max_shots]."""
        if data.shots is not None:
            stages: tuple[ShotStage, ...] = (ShotStage(0, int(data.shots), int(data.shots)),)
        elif data.shot_schedule:
            rows = [list(row) for row in data.shot_schedule]
            bad = [row for row in rows if len(row) != 3]
            if bad:
                raise ValueError(f"data.shot_schedule rows are [from_step, min_shots, max_shots], got {bad[0]}")
            stages = tuple(ShotStage(int(a), int(b), int(c)) for a, b, c in rows)
        else:
            stages = (ShotStage(0, int(data.min_shots), int(data.max_shots)),)
        return cls(stages, per=str(data.shots_per), seed=seed)

    # ---- queries --------------------------------------------------------------------------------------
    @property
    def max_shots(self) -> int:
        """The most demos any step can ask for (what a pipeline must be able to cut)."""
        return max(s.max_shots for s in self.stages)

    @property
    def min_shots(self) -> int:
        return min(s.min_shots for s in self.stages)

    def stage(self, step: int) -> ShotStage:
        current = self.stages[0]
        for s in self.stages:
            if s.start_step <= step:
                current = s
        return current

    def shots(self, step: int, episode: int) -> tuple[int, int]:
        """(k to cut, the fewest demos acceptable) for episode ``episode`` of the batch at ``step``."""
        s = self.stage(step)
        if s.min_shots == s.max_shots:
            return s.max_shots, s.min_shots
        draw = episode if self.per == "episode" else 0
        rng = random.Random(f"{self.seed}/shots/{step}/{draw}")
        return rng.randint(s.min_shots, s.max_shots), s.min_shots

    def describe(self) -> str:
        parts = [f"from step {s.start_step}: " + (f"{s.min_shots}" if s.min_shots == s.max_shots
                                                   else f"uniform[{s.min_shots}, {s.max_shots}]")
                 for s in self.stages]
        return "; ".join(parts) + f" shots per {self.per} (validation: {self.val_shots})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["ShotPolicy", "ShotStage"]


def shots_label(data: Any) -> str:
    """A `data` config's training shots in one word: `8` (data.shots), `1-8` (min_shots-max_shots) or `schedule`
    (data.shot_schedule): the run's "train shots" on W&B, and the teacher's shots in LIVE's and MimIC's row names."""
    if data.get("shots") is not None:
        return str(data.shots)
    if data.get("shot_schedule"):
        return "schedule"
    return str(data.min_shots) if data.min_shots == data.max_shots else f"{data.min_shots}-{data.max_shots}"
