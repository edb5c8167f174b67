"""Reports: the cost plot and W&B logging of the results table and plots."""

from __future__ import annotations

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

    class FakeRun:
        logged: dict = {}

        def log(self, data: dict) -> None:
            self.logged.update(data)

    png = plot_cost_vs_shots(ROWS, tmp_path / "cost.png")
    run = FakeRun()
    log_to_wandb(run, ROWS, {"cost_vs_shots": png})
    table = run.logged["eval/results"]
    assert isinstance(table, wandb.Table) and table.columns == list(ROWS[0]) and len(table.data) == 2
    assert table.data[1][table.columns.index("accuracy_mean")] == 0.4
    assert isinstance(run.logged["eval/cost_vs_shots"], wandb.Image)


def test_benchmark_tasks_use_their_reference_metrics():
    from mmict.eval.tasks import get_task

    vqa = get_task("vqav2")
    # official normalisation ("two" -> "2") and leave-one-out accuracy over 10 answers: 1.0 and 0.0
    assert vqa.score_trial(["two", "red"], [["2"] * 10, ["blue"] * 10]) == 0.5
    assert vqa.metric == "vqa_accuracy" and vqa.num_beams == 1
    cap = get_task("flickr30k")
    assert cap.metric == "cider" and cap.num_beams == 3
    refs = [["a dog runs on grass"], ["a cat sleeps on a sofa"]]
    good = cap.score_trial(["a dog runs on grass", "a cat sleeps on a sofa"], refs)
    swapped = cap.score_trial(["a cat sleeps on a sofa", "a dog runs on grass"], refs)
    assert good > 1.0 > swapped  # corpus-level CIDEr, not a per-caption exact match
