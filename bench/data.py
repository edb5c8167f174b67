"""Is the loader the bottleneck? The web-corpus pipeline's episodes/s against AIM's training consumption.

Both are measured in this process on a toy world with the toy experiment's shapes (`toy_aim`: batch size,
shots, image size, the tiny LLaVA's widths; its backbone built untrained, which costs the same time per
step as the pretrained one):

- **pipeline**: `WebCorpusDataModule.train_dataloader()` with 2 workers, batches pulled as fast as they
  come, after a warm-up (worker start, first shards);
- **training**: AIM's full step (frozen read of the demos, projector, query forward and backward, AdamW) on
  batches held in memory, so no loading is in its time.

The ratio is pipeline episodes/s over training episodes/s (target >= 3: the loader keeps the step fed with
room to spare). They run one after the other: on a 2-core machine running both at once would have them
share the cores and measure the machine, not the pipeline. On a GPU the step gets faster and the ratio
smaller: there, raise `data.num_workers` (the pipeline scales with workers: the shards are split among them).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench import Context, Result, markdown, register, target

TARGET = 3.0


def _toy(ctx: Context) -> Any:
    """The toy_aim config over a small toy world and an untrained toy backbone under the bench's workdir."""
    from mmict.config import load_config
    from mmict.toy.backbone import ensure_toy_backbone
    from mmict.toy.world import write_toy_world

    root = ctx.workdir / "data_bench"
    docs = 120 if ctx.smoke else 300 if ctx.quick else 1500
    cfg = load_config("toy_aim", [
        f"data.root={root / 'toy'}", f"backbone.name_or_path={root / 'backbone'}",
        "backbone.toy.pretrain_steps=0", "backbone.toy.pretrain_text_steps=0", f"data.toy.num_docs={docs}",
        "data.toy.val_docs=10", "data.toy.vqa_train=10", "data.toy.vqa_test=10", "data.toy.binding_episodes=4",
    ])
    write_toy_world(cfg.data.root, **dict(cfg.data.toy))
    ensure_toy_backbone(cfg.backbone.name_or_path, cfg.backbone.toy)
    return cfg


def _loader(cfg: Any, transform: Any, workers: int, batches: int) -> Any:
    from mmict.train import build_datamodule

    cfg.data.num_workers = workers
    cfg.data.epoch_size = batches * cfg.data.batch_size
    dm = build_datamodule(cfg, transform)
    dm.setup("fit")
    return dm.train_dataloader()


def pipeline_rate(cfg: Any, transform: Any, workers: int, warmup: int, measured: int) -> float:
    """Episodes/s the loader delivers once its workers are running."""
    batches = iter(_loader(cfg, transform, workers, warmup + measured))
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    episodes = sum(len(next(batches)) for _ in range(measured))
    return episodes / (time.perf_counter() - start)


def training_rate(module: Any, batches: list[dict], warmup: int) -> float:
    """Episodes/s AIM's full training step consumes on batches already in memory."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()

    def step(batch: dict) -> None:
        loss, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    return sum(len(b) for b in batches[warmup:]) / (time.perf_counter() - start)


@register("data", "the data pipeline (episodes/s from the web shards, 2 workers) vs AIM's training step")
def run(ctx: Context) -> Result:
    from mmict.methods import METHODS

    cfg = _toy(ctx)
    module = METHODS["aim"](cfg)
    transform = module.backbone.image_transform
    warmup, measured = (1, 2) if ctx.smoke else (2, 8) if ctx.quick else (5, 30)
    repeats = 1 if ctx.smoke else max(1, min(ctx.repeats, 3))
    held = list(_loader(cfg, transform, 0, warmup + measured))
    pipeline, training = [], []
    for _ in range(repeats):  # alternated, so a load change on the machine hits both alike
        pipeline.append(pipeline_rate(cfg, transform, 2, warmup, measured))
        training.append(training_rate(module, held, warmup))
    p, t = statistics.median(pipeline), statistics.median(training)
    ratio = p / t
    rows = [{"pipeline_episodes_per_s": p, "training_episodes_per_s": t, "ratio": ratio,
             "batch_size": int(cfg.data.batch_size), "shots": f"uniform[{cfg.data.min_shots}, {cfg.data.max_shots}]",
             "image_size": int(cfg.backbone.toy.image_size), "workers": 2}]
    table = markdown(rows, [("pipeline_episodes_per_s", "pipeline (2 workers) episodes/s", ".0f"),
                            ("training_episodes_per_s", "AIM training step episodes/s", ".0f"),
                            ("ratio", "ratio", ".2f"), ("shots", "shots", ""), ("batch_size", "batch", "")])
    return Result(rows=rows, table=table,
                  targets=[target("loader vs training step", f">= {TARGET:g}x", ratio, ratio >= TARGET, "x")],
                  notes=["toy_aim shapes on this machine's CPU; measured one after the other (see bench/data.py)"],
                  settings={"warmup_batches": warmup, "measured_batches": measured, "repeats": repeats})
