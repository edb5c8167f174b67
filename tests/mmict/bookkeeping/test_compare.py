"""`mmict compare` from run folders, and what a run tells W&B (group, tags, commit, method, backbone, shots)."""

from __future__ import annotations

import json
from pathlib import Path

from mmict.bookkeeping.compare import compare, find_runs, load_run, main, render
from mmict.config import load_config, save_config
from mmict.dependency_lock import lock_path, sha256
from mmict.train import train_shots, wandb_settings


def _fake_run(root: Path, name: str, overrides: list[str], train_losses, val_loss, scores) -> Path:
    """A run folder as `mmict train` leaves it: config.yaml, logs/metrics.csv, eval/results.json, runtime.json."""
    run = root / name
    cfg = load_config("toy_aim", overrides)
    save_config(cfg, run / "config.yaml")
    (run / "logs").mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/loss"]
    rows += [f"0,{10 * (i + 1) - 1},{v},"for i, v in enumerate(train_losses)]
    rows.append(f"0,{10 * len(train_losses) - 1},,{val_loss}")
    (run / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    summary = [{"method": mode, "shots": k, "accuracy_mean": acc, "accuracy_std": 0.01, "context_tokens": 10.0 + 5 * k,
                "peak_memory_mb": None, "ms_per_query": 2.0 + k, "seeds": 2, "queries": 8}
               for (mode, k), acc in scores.items()]
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"metric": "vqa_accuracy", "summary": summary}))
    (run / "runtime.json").write_text(json.dumps({"versions": {"mmict_commit": "abc1234"},
                                                  "precision": {"precision": "32-true"}}))
    return run


def test_compare_a_sweep_folder(tmp_path, capsys):
    sweep = tmp_path / "sweeps" / "toy_aim" / "20250101-000000"
    _fake_run(sweep / "runs", "000_shots4", ["data.shots=4", "optim.lr=1e-3"], [2.0, 1.5], 1.4,
              {("AIM (fused demos)", 0): 0.30, ("AIM (fused demos)", 4): 0.50, ("vanilla ICL", 4): 0.45})
    _fake_run(sweep / "runs", "001_shots8", ["data.shots=8", "optim.lr=3e-4"], [2.1, 1.2], 1.1,
              {("AIM (fused demos)", 0): 0.31, ("AIM (fused demos)", 4): 0.60})
    (sweep / "grid.json").write_text("{}")
    runs = [load_run(p) for p in find_runs([sweep])]
    assert [r["run_dir"].name for r in runs] == ["000_shots4", "001_shots8"]
    columns, rows = compare(runs)
    assert "optim.lr" in columns  # a key that differs between runs gets a column
    assert "vqa_accuracy@0" in columns and "vqa_accuracy@4" in columns
    first = rows[0]
    assert first["method"] == "aim" and first["train shots"] == "4" and first["backbone"] == "llava:backbone"
    assert first["train loss"] == 1.5 and first["val loss"] == 1.4 and first["steps"] == 19
    assert first["commit"] == "abc1234"
    assert len(rows) == 3  # run 0: two eval modes; run 1: one
    # each method's cost per query beside its scores, per shot count (issue 25: methods side by side)
    assert first["context tokens"] == "0:10 4:30" and first["ms / query"] == "0:2.0 4:6.0"
    assert rows[1]["eval"] == "vanilla ICL" and rows[1]["context tokens"] == "4:30"
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 000_shots4 | aim | llava:backbone | 4 |" in out
    assert "50.0 ± 1.0" in out and "60.0 ± 1.0" in out
    assert json.loads(render(columns, rows, "json"))[0]["vqa_accuracy@4"]["mean"] == 0.5
    assert render(columns, rows, "csv").splitlines()[0].startswith("run,method,backbone")


def test_a_run_without_eval_still_compares(tmp_path, capsys):
    run = tmp_path / "r"
    save_config(load_config("toy_aim"), run / "config.yaml")
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "| aim |" in out and "| 1-7 |" in out


def test_wandb_gets_group_tags_commit_method_backbone_shots(tmp_path):
    cfg = load_config("toy_aim", ["logger.group=toy_aim-20250101-000000", "logger.tags=[sweep,toy_aim]",
                                  "data.shots=4", f"run_dir={tmp_path / 'pinned'}"])
    settings = wandb_settings(cfg, tmp_path / "pinned")
    assert settings["group"] == "toy_aim-20250101-000000" and settings["tags"] == ["sweep", "toy_aim"]
    run = settings["config"]["run"]
    assert run["method"] == "aim" and run["backbone_family"] == "llava" and run["train_shots"] == "4"
    assert run["eval_shots"] == [0, 1, 2, 4, 8] and run["git_commit"]
    # the versions that produced the run, with the dependency lock's hash (dashboards can filter on it)
    assert run["versions"]["transformers"] and run["versions"]["lock"]["sha256"] == sha256(lock_path())
    assert settings["config"]["trainer"]["max_steps"] == cfg.trainer.max_steps  # the resolved config
    # one W&B run per run folder: a requeued or resumed run continues it; another folder is another run
    assert settings["id"] == wandb_settings(cfg, tmp_path / "pinned")["id"] and settings["resume"] == "allow"
    assert wandb_settings(load_config("toy_aim"), tmp_path / "fresh")["id"] != settings["id"]
    assert train_shots(load_config("toy_aim")) == "1-7"
