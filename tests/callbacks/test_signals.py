"""SIGTERM / SIGINT mid-training: a resumable checkpoint at the signal's step and a non-zero exit status, never a
quiet 0; the same command then continues from that checkpoint with the losses of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmict.bookkeeping.resume import FINISHED, find_resume
from mmict.config import load_config
from mmict.plots import read_metric
from mmict.train import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# `mmict train` with one more callback: at step 3 it writes argv[1] and waits for the signal the test then sends, so
# the signal lands at a known step (the wait ends as soon as Lightning has seen it).
SCRIPT = """
import sys, time
from pathlib import Path
import lightning as L
import mmict.train as t

class Wait(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            Path(sys.argv[1]).write_text("step 3")
            while not trainer.received_sigterm:
                time.sleep(0.05)

build = t.build_trainer
def with_wait(*args, **kwargs):
    trainer, skipped = build(*args, **kwargs)
    trainer.callbacks.insert(0, Wait())
    return trainer, skipped
t.build_trainer = with_wait
t.main(sys.argv[2:])
"""


def _overrides(root: Path, backbone: Path) -> list[str]:
    return [f"run_root={root / 'runs'}", f"data.root={root.parent / 'toy'}", f"backbone.name_or_path={backbone}",
            "backbone.toy=null", "data.toy.num_docs=8", "data.toy.val_docs=4", "data.toy.vqa_train=40",
            "data.toy.vqa_test=8", "data.toy.image_size=16", "data.toy.binding_episodes=2", "data.batch_size=4",
            "data.num_workers=2", "data.epoch_size=20", "data.val_episodes=4", "trainer.max_steps=7",
            "trainer.val_check_interval=100", "trainer.checkpoint_every_n_steps=100", "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false", "optim.warmup_steps=2", "eval.enabled=false"]


def _signalled_run(root: Path, backbone: Path, signum: int) -> tuple[subprocess.CompletedProcess, Path]:
    marker = root / "at_step_3"
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(marker), "toy_mmict_vqa", *_overrides(root, backbone)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not marker.exists():  # waiting for an event, not timing anything; a failed start ends the wait
        if proc.poll() is not None:
            pytest.fail(f"the training exited ({proc.returncode}) before step 3:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    [run] = list((root / "runs" / "toy_mmict_vqa").iterdir())
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run


def test_sigterm_saves_a_checkpoint_at_its_step_exits_143_and_the_run_continues_from_it(tmp_path, tiny_backbone_dir):
    straight = train(load_config("toy_mmict_vqa", _overrides(tmp_path / "a", tiny_backbone_dir)))
    expected = dict(read_metric(Path(straight["run_dir"]) / "logs/metrics.csv", "train/loss"))

    done, run = _signalled_run(tmp_path / "b", tiny_backbone_dir, signal.SIGTERM)
    assert done.returncode == 143, done.stderr[-3000:]  # not 0: a scheduler or script sees the run was stopped
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert f"SIGTERM at step 3: saved the resumable checkpoint {checkpoint}" in done.stderr
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 3
    assert not (run / FINISHED).exists() and not (run / "run.lock").exists()  # unfinished, and its lock let go

    cfg = load_config("toy_mmict_vqa", _overrides(tmp_path / "b", tiny_backbone_dir))
    found = find_resume(cfg, None)
    assert found.checkpoint == checkpoint and found.step == 3
    resumed = train(cfg)  # the same command again
    assert Path(resumed["run_dir"]) == run and (run / FINISHED).exists()
    got = dict(read_metric(run / "logs/metrics.csv", "train/loss"))
    assert sorted(got) == sorted(expected)
    for step in range(3, 7):  # trained after the signal, from its checkpoint: as if never stopped
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path, tiny_backbone_dir):
    done, run = _signalled_run(tmp_path, tiny_backbone_dir, signal.SIGINT)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "SIGINT at step 3: saved the resumable checkpoint" in done.stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and not (run / FINISHED).exists()
