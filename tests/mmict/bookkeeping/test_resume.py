"""Exact resume: an interrupted run, restarted with the same command, continues with the same losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import mmict.train as train_module
from mmict.bookkeeping.lock import RunLockedError
from mmict.bookkeeping.resume import FINISHED, Resume, find_resume, missed_validation, newest_step
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
        assert newest_step(run) is None
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


def _ckpt(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_the_checkpoint_is_chosen_by_its_step_not_its_file_date(tmp_path):
    cfg = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "trainer.max_steps=100"])
    run = tmp_path / "runs" / "toy_aim" / "20260101-000000"
    save_config(cfg, run / "config.yaml")
    # as `cp -r` leaves them: the dates say nothing of the order the run wrote the files in
    _ckpt(run / "checkpoints" / "step000060.ckpt", 60, 1_000)
    _ckpt(run / "checkpoints" / "step000050.ckpt", 50, 3_000)
    found = find_resume(cfg, None)
    assert found.checkpoint.name == "step000060.ckpt" and found.step == 60
    _ckpt(run / "checkpoints" / "last.ckpt", 60, 500)  # the same step as step000060: the latest save of it wins
    assert find_resume(cfg, None).checkpoint.name == "last.ckpt"
    _ckpt(run / "hpc_ckpt_1.ckpt", 70, 100)  # Lightning's SLURM requeue checkpoint, further on
    assert find_resume(cfg, None).step == 70


def test_a_truncated_checkpoint_is_moved_aside_with_a_warning_and_the_previous_one_used(tmp_path, caplog):
    cfg = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "trainer.max_steps=100"])
    run = tmp_path / "runs" / "toy_aim" / "20260101-000000"
    save_config(cfg, run / "config.yaml")
    _ckpt(run / "checkpoints" / "step000004.ckpt", 4, 1_000)
    (run / "checkpoints" / "step000008.ckpt").write_bytes(b"PK\x03\x04 truncated by a kill during the save")
    with caplog.at_level("WARNING"):
        found = find_resume(cfg, None)
    assert found.checkpoint.name == "step000004.ckpt" and found.step == 4
    assert (run / "checkpoints" / "step000008.ckpt.corrupt").is_file()  # kept for a look, never deleted
    assert not (run / "checkpoints" / "step000008.ckpt").exists()
    assert "moved aside to step000008.ckpt.corrupt" in caplog.text


def test_a_run_folder_a_live_process_holds_is_refused_naming_it(tmp_path):
    cfg = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "trainer.max_steps=100"])
    run = tmp_path / "runs" / "toy_aim" / "20260101-000000"
    save_config(cfg, run / "config.yaml")
    _ckpt(run / "checkpoints" / "last.ckpt", 6, 1_000)
    hold = ("import sys, time; from mmict.bookkeeping.lock import acquire; acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(run)], cwd=Path(__file__).resolve().parents[3],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {proc.pid}"):
            find_resume(cfg, None)  # the same command while that run lives: it stops, before touching a file
    finally:
        proc.kill()
        proc.wait()
    assert find_resume(cfg, None).checkpoint == run / "checkpoints" / "last.ckpt"  # killed: continued


def test_the_validation_an_interruption_cut_short_is_owed(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    # Lightning logs the validation after step s at step s - 1; this one ran at step 6, not at step 12
    (run / "logs" / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,0,,5.0\n0,5,,4.0\n0,11,3.0,\n")
    assert missed_validation(Resume(run, run / "x.ckpt", step=12), val_check_interval=6) == 12
    assert missed_validation(Resume(run, run / "x.ckpt", step=6), val_check_interval=6) is None  # it ran
    assert missed_validation(Resume(run, run / "x.ckpt", step=10), val_check_interval=6) is None  # no val step


class _CrashInValidation(L.Callback):
    """A stand-in for a kill during the validation at `at_step` (its checkpoint was saved right before it)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "fit" and trainer.global_step == self.at_step:
            raise RuntimeError(f"simulated kill during the validation at step {self.at_step}")


def test_a_validation_cut_short_is_run_again_after_the_resume(tmp_path, tiny_backbone_dir, monkeypatch):
    extra = ("trainer.val_check_interval=4", "data.num_workers=0")
    straight = train(_config(tmp_path / "a", tiny_backbone_dir, *extra))
    expected = dict(read_metric(Path(straight["run_dir"]) / "logs/metrics.csv", "val/loss"))
    assert {3, 7} <= set(expected)  # the validations after steps 4 and 8

    build = train_module.build_trainer

    def crashing(*args, **kwargs):
        trainer, skipped = build(*args, **kwargs)
        trainer.callbacks.append(_CrashInValidation(8))
        return trainer, skipped

    monkeypatch.setattr(train_module, "build_trainer", crashing)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_config(tmp_path / "b", tiny_backbone_dir, *extra))
    monkeypatch.undo()
    [crashed] = list((tmp_path / "b" / "runs" / "toy_mmict_vqa").iterdir())
    assert 7 not in dict(read_metric(crashed / "logs/metrics.csv", "val/loss"))

    train(_config(tmp_path / "b", tiny_backbone_dir, *extra))
    got = dict(read_metric(crashed / "logs/metrics.csv", "val/loss"))
    assert got[7] == pytest.approx(expected[7], rel=1e-6)  # run again, at its own step, with the same value
    assert got[0] == pytest.approx(expected[0], rel=1e-6)  # the before-training point is untouched
    rows = (crashed / "logs/metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    at_7 = [r for r in rows[1:] if r.split(",")[header.index("step")] == "7" and r.split(",")[header.index("val/loss")]]
    assert len(at_7) == 1  # run once, not also by Lightning


def test_ranks_lightning_starts_join_rank_zeros_run_folder_and_resume(tmp_path, monkeypatch):
    from mmict.bookkeeping.resume import RANK_ZERO_RUN_ENV, rank_zero_run, share_with_other_ranks

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", RANK_ZERO_RUN_ENV):
        monkeypatch.delenv(name, raising=False)
    found = Resume(tmp_path / "run", tmp_path / "run" / "checkpoints" / "step000004.ckpt", step=4)
    share_with_other_ranks(tmp_path / "run", found)  # rank 0, before its Trainer starts the other ranks
    assert rank_zero_run() is None  # rank 0 decides for itself
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets for the process it starts
    assert rank_zero_run() == (tmp_path / "run", found)
    share_with_other_ranks(tmp_path / "other", None)  # ranks above 0 never overwrite it
    assert rank_zero_run() == (tmp_path / "run", found)
    monkeypatch.setenv("LOCAL_RANK", "0")
    share_with_other_ranks(tmp_path / "fresh", None)  # a new run: no checkpoint to continue
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_zero_run() == (tmp_path / "fresh", None)
