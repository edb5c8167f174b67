"""Exact resume: an interrupted run, restarted with the same command, continues with the same losses."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

import mmict.train as train_module
from mmict.bookkeeping.resume import FINISHED, find_resume, loadable_checkpoint
from mmict.config import ConfigError, load_config, save_config
from mmict.plots import read_metric
from mmict.train import train, wandb_id

pytestmark = pytest.mark.slow


class _Crash(L.Callback):
    """A stand-in for `kill -9` between two checkpoints."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError(f"simulated crash at step {self.at_step}")


def _config(root: Path, backbone: Path, *extra: str):
    # MMICT: the M-Hub's Q-Former trains with dropout, so the RNG states must come back too; 2 workers, so
    # the stream resumes mid-epoch with the workers' turns shifted.
    return load_config("toy_mmict_vqa", [
        f"run_root={root / 'runs'}", f"data.root={root.parent / 'toy'}", f"backbone.name_or_path={backbone}",
        "backbone.toy=null", "data.toy.num_docs=8", "data.toy.val_docs=4", "data.toy.vqa_train=40",
        "data.toy.vqa_test=8", "data.toy.image_size=16", "data.toy.binding_episodes=2", "data.batch_size=4",
        "data.num_workers=2", "data.epoch_size=20", "data.val_episodes=4", "trainer.max_steps=9",
        "trainer.val_check_interval=100", "trainer.checkpoint_every_n_steps=4", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "optim.warmup_steps=2", "eval.enabled=false", *extra,
    ])


def test_interrupted_run_continues_with_the_same_losses(tmp_path, tiny_backbone_dir, monkeypatch):
    straight = train(_config(tmp_path / "a", tiny_backbone_dir))
    expected = dict(read_metric(Path(straight["run_dir"]) / "logs/metrics.csv", "train/loss"))
    assert len(expected) == 9

    build = train_module.build_trainer

    def crashing(*args, **kwargs):
        trainer, skipped = build(*args, **kwargs)
        trainer.callbacks.append(_Crash(6))  # after step 6; the last checkpoint is step 4 (mid data epoch)
        return trainer, skipped

    monkeypatch.setattr(train_module, "build_trainer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(tmp_path / "b", tiny_backbone_dir))
    monkeypatch.undo()
    [crashed] = list((tmp_path / "b" / "runs" / "toy_mmict_vqa").iterdir())
    assert not (crashed / FINISHED).exists()

    resumed = train(_config(tmp_path / "b", tiny_backbone_dir))  # the same command again
    assert Path(resumed["run_dir"]) == crashed  # the same run folder (and W&B id), not a new run
    got = dict(read_metric(crashed / "logs/metrics.csv", "train/loss"))
    assert sorted(got) == sorted(expected)
    for step in range(4, 9):  # the steps after the checkpoint, trained again after the restart
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    assert (crashed / FINISHED).exists()
    record = torch.load(crashed / "checkpoints/last.ckpt", weights_only=False)["callbacks"]["RunRecord"]
    assert record == {"run_dir": str(crashed), "wandb_id": wandb_id(crashed)}
    # A finished run is never continued: the same command now starts a new run.
    assert find_resume(_config(tmp_path / "b", tiny_backbone_dir), None) is None


def test_resume_choices(tmp_path, caplog):
    run = tmp_path / "runs" / "x" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"truncated by a kill")
    with caplog.at_level("WARNING"):
        assert loadable_checkpoint(run) is None
    assert "does not load" in caplog.text
    cfg = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "name=x", f"resume={run}"])
    with pytest.raises(ConfigError, match="no loadable checkpoint"):
        find_resume(cfg, None)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        find_resume(load_config("toy_aim", [f"resume={tmp_path / 'nope'}"]), None)
    assert find_resume(load_config("toy_aim", ["resume=never"]), None) is None


def test_a_run_trained_to_the_end_is_evaluated_not_trained_again(tmp_path):
    cfg = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "trainer.max_steps=10"])
    run = tmp_path / "runs" / "toy_aim" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.save({"global_step": 10}, run / "checkpoints" / "last.ckpt")  # trained, evaluation never finished
    found = find_resume(cfg, None)
    assert found.checkpoint == run / "checkpoints" / "last.ckpt" and found.trained
    torch.save({"global_step": 6}, run / "checkpoints" / "last.ckpt")  # interrupted at step 6
    found = find_resume(cfg, None)
    assert found.checkpoint == run / "checkpoints" / "last.ckpt" and not found.trained
    (run / "summary.json").write_text("{}")  # finished (evaluated): never resumed
    assert find_resume(cfg, None) is None
    (run / "summary.json").unlink()
    other = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "trainer.max_steps=10", "optim.lr=0.5"])
    assert find_resume(other, None) is None  # another config: not this run
