"""`python -m bench` (`make bench`): AIM's efficiency against vanilla multimodal ICL, measured.

Every benchmark reports ratios of quantities measured in the same process, on the same machine, interleaved
where it can be (so background load hits every method alike), after a warm-up, as the median of repeats.
Tables go to stdout; everything, with the machine's description and library versions, to
`bench/results.json`. No timing is asserted anywhere: the targets are reported as met or missed.

Benchmarks register themselves by name (`@register("latency", "...")`) in their module, listed in `MODULES`;
one that raises `NotImplementedError` is reported as "not available" and the others still run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The modules whose import registers a benchmark, in the order `python -m bench` runs them.
MODULES = ("bench.latency", "bench.floor", "bench.trainer_overhead", "bench.data", "bench.pool", "bench.real_shapes",
           "bench.eval_scaling")


@dataclass
class Context:
    """What a benchmark is told: how much to run, where to put files, models shared between benchmarks."""

    quick: bool = False  # far fewer shots and repeats (a couple of minutes instead of ~5 on 2 CPU cores)
    smoke: bool = False  # tiny images and 1 repeat: checks that the harness runs, the numbers mean nothing
    repeats: int = 5  # timed repeats per measurement (after one warm-up), median reported
    workdir: Path = Path(".")  # scratch space (tiny models, the demo bank), removed after the run
    shared: dict[str, Any] = field(default_factory=dict)  # built models etc. reused by later benchmarks
    shapes: tuple[str, ...] | None = None  # real_shapes: model shapes or groups (7b, reduced); None: by device
    past_context: bool = False  # real_shapes: also run vanilla ICL past the LM's positions (a speed figure only)
    budget_s: float | None = None  # real_shapes: cells left when this many seconds have passed are skipped
    log: Callable[[str], None] = print


@dataclass
class Result:
    """One benchmark's outcome: its rows (also in results.json), the table printed, the targets it checks."""

    rows: list[dict[str, Any]]
    table: str
    targets: list[dict[str, Any]] = field(default_factory=list)  # {name, target, measured, met}
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    description: str
    run: Callable[[Context], Result]


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, description: str) -> Callable[[Callable[[Context], Result]], Callable[[Context], Result]]:
    """Register `fn(ctx) -> Result` as benchmark `name` (what `--only` selects)."""

    def wrap(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        if name in REGISTRY and REGISTRY[name].run is not fn:
            raise ValueError(f"benchmark '{name}' is registered twice")
        REGISTRY[name] = Benchmark(name, description, fn)
        return fn

    return wrap


def target(name: str, goal: str, measured: float | None, met: bool | None, unit: str = "") -> dict[str, Any]:
    """A target row: `met` is None when it could not be measured here."""
    return {"name": name, "target": goal, "measured": measured, "unit": unit, "met": met}


def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`: columns are (key, header, format spec); None shows as n/a."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|"]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            value = r.get(key)
            cells.append("n/a" if value is None else format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
