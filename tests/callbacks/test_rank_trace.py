"""The rank trace: one JSON line per trained batch and rank, only when MMICT_RANK_TRACE asks for it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from callbacks.rank_trace import ENV, RankTrace, enabled


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert not enabled()
    monkeypatch.setenv(ENV, "")
    assert not enabled()


def test_each_trained_batch_is_one_line_of_its_rank(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "trace"))
    assert enabled()
    trace = RankTrace()
    batch = SimpleNamespace(step=6, sources=["train-000000.tar#doc0004", "train-000000.tar#doc0006"],
                            resume={"epoch": 1, "docs": 4})
    for step, loss in ((7, 5.25), (8, 5.0)):
        trainer = SimpleNamespace(global_rank=1, global_step=step)
        trace.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, batch, 0)
    lines = [json.loads(line) for line in (tmp_path / "trace" / "rank1.jsonl").read_text().splitlines()]
    assert [(r["rank"], r["step"], r["global_step"], r["epoch"], r["loss"]) for r in lines] == [
        (1, 6, 7, 1, 5.25), (1, 6, 8, 1, 5.0)]
    assert lines[0]["sources"] == batch.sources
    assert not (tmp_path / "trace" / "rank0.jsonl").exists()
