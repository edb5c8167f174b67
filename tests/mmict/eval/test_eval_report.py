"""Reports: the cost plot and W&B logging of the results table and plots."""

from __future__ import annotations

import json

from mmict.eval.protocol import Decoding, mmict_protocol
from mmict.eval.runner import log_to_wandb
from mmict.plots import plot_cost_vs_shots

ROWS = [
    {"method": "zero-shot", "shots": 0, "accuracy_mean": 0.1, "accuracy_std": 0.0, "context_tokens": 20.0,
     "peak_memory_mb": None, "seeds": 1, "queries": 4},
    {"method": "AIM (fused tokens)", "shots": 2, "accuracy_mean": 0.4, "accuracy_std": 0.1, "context_tokens": 30.0,
     "peak_memory_mb": None, "seeds": 1, "queries": 4},
]


def test_cost_plot_is_written_with_and_without_memory(tmp_path):
    assert plot_cost_vs_shots(ROWS, tmp_path / "cpu.png").stat().st_size > 0
    gpu = [dict(r, peak_memory_mb=100.0 + r["shots"]) for r in ROWS]
    assert plot_cost_vs_shots(gpu, tmp_path / "gpu.png").stat().st_size > 0


def test_results_go_to_wandb_as_a_table_and_images(tmp_path):
    import wandb

    class FakeConfig(dict):
        def update(self, data: dict, allow_val_change: bool = False) -> None:
            super().update(data)

    class FakeRun:
        logged: dict = {}
        config = FakeConfig()

        def log(self, data: dict) -> None:
            self.logged.update(data)

    png = plot_cost_vs_shots(ROWS, tmp_path / "cost.png")
    run = FakeRun()
    settings = mmict_protocol(decoding=Decoding(3, 20, 0.0), overrides={"num_beams": 3}).as_dict()
    rows = [dict(r, metrics={"BLEU-4": 0.2}) if r["shots"] else r for r in ROWS]
    log_to_wandb(run, rows, {"cost_vs_shots": png}, settings=settings)
    table = run.logged["eval/results"]
    assert isinstance(table, wandb.Table) and len(table.data) == 2
    assert table.columns[: len(ROWS[0])] == list(ROWS[0])
    assert table.data[1][table.columns.index("accuracy_mean")] == 0.4
    # how each row was made travels with it: a dashboard cannot put rows of other protocols side by side unawares
    assert table.data[0][table.columns.index("protocol")] == "mmict (modified: num_beams=3)"
    assert json.loads(table.data[0][table.columns.index("decoding")])["length_penalty"] == 0.0
    assert table.data[1][table.columns.index("BLEU-4")] == 0.2 and table.data[0][table.columns.index("BLEU-4")] is None
    assert run.config["eval_protocol"]["label"] == "mmict (modified: num_beams=3)"
    assert isinstance(run.logged["eval/cost_vs_shots"], wandb.Image)


def test_benchmark_tasks_use_their_reference_metrics():
    from mmict.eval.tasks import get_task

    vqa = get_task("vqav2")
    # official normalisation ("two" -> "2") and leave-one-out accuracy over 10 answers: 1.0 and 0.0
    assert vqa.score_trial(["two", "red"], [["2"] * 10, ["blue"] * 10]) == (0.5, {})
    assert vqa.metric == "vqa_accuracy" and vqa.num_beams == 1
    cap = get_task("flickr30k")
    assert cap.metric == "cider" and cap.num_beams == 3
    refs = [["a dog runs on grass"], ["a cat sleeps on a sofa"]]
    good, good_all = cap.score_trial(["a dog runs on grass", "a cat sleeps on a sofa"], refs)
    swapped, _ = cap.score_trial(["a cat sleeps on a sofa", "a dog runs on grass"], refs)
    assert good > 1.0 > swapped  # corpus-level CIDEr, not a per-caption exact match
    # the caption metrics the field reports, beside the headline CIDEr (SPICE only where its jars are installed)
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(good_all) and good_all["CIDEr"] == good
    assert good_all["BLEU-4"] > 0.99 and good_all["ROUGE-L"] > 0.99


def test_table_shows_caption_metrics_and_over_context_rows():
    from mmict.eval.loop import markdown_table

    rows = [
        {"method": "zero-shot", "shots": 0, "accuracy_mean": 0.5, "accuracy_std": 0.0, "context_tokens": 20.0,
         "seeds": 1, "queries": 4, "status": "ok", "metrics": {"BLEU-4": 0.1, "METEOR": float("nan"), "CIDEr": 0.5}},
        {"method": "vanilla ICL (images+text)", "shots": 4, "accuracy_mean": None, "accuracy_std": float("nan"),
         "context_tokens": None, "seeds": 2, "queries": 4, "status": "over_context", "max_context_tokens": 9000,
         "model_max_positions": 4096, "metrics": {}},
    ]
    table = markdown_table(rows, metric="cider")
    header = table.splitlines()[0]
    assert "| cider (x100) | BLEU-4 (x100) | METEOR (x100) |" in header and "CIDEr (x100)" not in header
    assert "| 50.0 | 10.0 | n/a | 20 |" in table  # METEOR without Java: n/a, never a number
    assert "| over context (needs 9000 of 4096 positions) | n/a | n/a | not run | - | 2 x 4 |" in table
