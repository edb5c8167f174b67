"""The data pipeline vs the training step (from the data issue): a placeholder until that issue writes it.

Registered so `python -m bench --only data` finds it; `python -m bench` reports it as "not available" until the
function below returns a `bench.Result` instead of raising.
"""

from __future__ import annotations

from bench import Context, Result, register


@register("data", "the data pipeline (episodes/s from the web shards) vs the training step")
def run(ctx: Context) -> Result:
    raise NotImplementedError("written by the data issue")
