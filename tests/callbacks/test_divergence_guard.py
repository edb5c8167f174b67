"""A run whose loss climbs far above its start, or whose weights blow up, stops with no NaN ever seen; the message
names the last checkpoint from before the trouble and a command that continues from it."""

from __future__ import annotations

import shlex

import lightning as L
import pytest
import torch
from helpers import VectorData

from callbacks.divergence_guard import DivergenceGuard, LossDivergedError
from mmict.bookkeeping.resume import find_resume
from mmict.config import ConfigError, load_config, save_config
from mmict.train import build_trainer

# Per-step train/loss of toy_aim's first 60 steps as measured on this repo's toy backbone (noisy: 1-7 shots per
# episode), at the default optim.lr=1e-3 and at optim.lr=1e10 (the projector ruined from step 2, the loss finite).
TOY_AIM_HEALTHY = [0.3, 1.44, 2.77, 3.7, 3.51, 1.6, 2.69, 1.48, 2.57, 5.12, 2.52, 2.57, 2.1, 1.48, 2.01, 3.41, 0.13,
                   4.78, 3.14, 1.79, 4.29, 0.46, 2.69, 2.09, 0.39, 1.42, 3.88, 0.13, 1.97, 3.8, 3.98, 2.82, 2.99,
                   5.91, 2.46, 1.94, 0.19, 4.38, 2.61, 1.32, 2.13, 0.9, 0.15, 4.23, 4.72, 0.14, 5.85, 0.46, 4.35,
                   4.72, 2.27, 0.12, 2.34, 1.06, 2.4, 1.37, 1.98, 2.31, 2.13, 1.91]
TOY_AIM_LR_1E10 = [0.3, 1.44, 2.67, 3.7, 3.84, 3.12, 3.37, 2.0, 3.03, 5.36, 3.33, 2.81, 2.63, 2.09, 2.19, 4.26, 1.09,
                   4.76, 3.51, 2.48, 4.43, 1.35, 3.23, 2.64, 1.25, 2.28, 4.34, 1.01, 2.82, 4.83, 4.83, 3.49, 4.05,
                   5.91, 2.8, 2.7, 1.5, 5.08, 3.43, 3.23, 2.65, 1.45, 1.29, 5.51, 5.11, 1.39, 6.28, 0.85, 4.74,
                   5.51, 2.9, 1.32, 2.88, 1.96, 2.99, 2.78, 2.52, 3.21, 2.84, 2.43]


class Tiny(L.LightningModule):
    """Its loss reads `scale` x from global_step `loss_from` on (the gradient unchanged), or its weights are
    multiplied by `blow_up` at global_step `weights_at`."""

    def __init__(self, loss_from: int = 10_000, scale: float = 100.0, weights_at: int = 10_000,
                 blow_up: float = 1e4) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.loss_from, self.scale, self.weights_at, self.blow_up = loss_from, scale, weights_at, blow_up

    def training_step(self, batch, batch_idx):
        if self.global_step == self.weights_at:
            with torch.no_grad():
                self.net.weight.mul_(self.blow_up)
        loss = self.net(batch["x"]).pow(2).mean() + 1.0
        if self.global_step >= self.loss_from:
            loss = loss + (self.scale - 1) * loss.detach()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _run(tmp_path, *extra: str):
    cfg = load_config("toy_aim", ["trainer.accelerator=cpu", "logger.wandb=false", "trainer.progress_bar=false",
                                  "trainer.checkpoint_every_n_steps=5", "trainer.max_steps=30",
                                  "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
                                  "trainer.divergence_guard.patience=4", "trainer.divergence_guard.warmup=3",
                                  f"run_root={tmp_path / 'runs'}", *extra])
    save_config(cfg, tmp_path / "config.yaml")  # as `mmict train` does in the run folder
    trainer, _ = build_trainer(cfg, tmp_path)
    return cfg, trainer


def test_a_loss_that_stays_far_above_its_start_stops_the_run(tmp_path):
    _, trainer = _run(tmp_path)
    with pytest.raises(LossDivergedError) as info:
        trainer.fit(Tiny(loss_from=12), datamodule=VectorData())
    msg = str(info.value)
    # The streak began at global_step 12 and reached patience 4 at global_step 15, before its update.
    assert trainer.global_step == 15 and "for 4 steps in a row" in msg and "began at global_step 12" in msg
    # step000015.ckpt was written during the streak (its weights are the diverging ones): not the one named.
    assert (tmp_path / "checkpoints" / "step000015.ckpt").is_file() and "step000015" not in msg
    good = tmp_path / "checkpoints" / "step000010.ckpt"
    assert f"the last checkpoint written before it: {good} (step 10)" in msg
    # The command continues the run from that checkpoint at a tenth of its learning rate, and works as written.
    command = shlex.split(msg[msg.index("mmict train"):].split(" (trainer.divergence_guard=null")[0])
    assert command[:3] == ["mmict", "train", str(tmp_path / "config.yaml")]
    assert command[3:] == [f"resume={good}", "optim.lr=0.001"]
    cfg = load_config(command[2], command[3:])
    assert cfg.optim.lr == pytest.approx(1e-3)
    resume = find_resume(cfg, None)
    assert resume is not None and resume.checkpoint == good and resume.run_dir == tmp_path


def test_blown_up_weights_stop_the_run_at_once(tmp_path):
    _, trainer = _run(tmp_path)
    with pytest.raises(LossDivergedError) as info:
        trainer.fit(Tiny(weights_at=7), datamodule=VectorData())
    msg = str(info.value)
    assert trainer.global_step == 7 and "the trained weights' norm is" in msg and "weight_factor" in msg
    assert "step000005.ckpt (step 5)" in msg


def test_a_healthy_run_and_a_disabled_guard_run_to_the_end(tmp_path):
    _, trainer = _run(tmp_path / "healthy")
    trainer.fit(Tiny(), datamodule=VectorData())
    assert trainer.global_step == 30
    _, trainer = _run(tmp_path / "off", "trainer.divergence_guard=null")
    assert not [cb for cb in trainer.callbacks if isinstance(cb, DivergenceGuard)]
    trainer.fit(Tiny(loss_from=12, weights_at=7), datamodule=VectorData())
    assert trainer.global_step == 30


def test_toy_aim_losses_never_trip_the_loss_sign():
    """The default settings on toy_aim's noisy per-step losses: healthy, and at lr=1e10, where the loss stays finite
    and merely mediocre (which is why the weights are watched too)."""
    for losses in (TOY_AIM_HEALTHY, TOY_AIM_LR_1E10):
        guard = DivergenceGuard()
        assert [guard.observe(v, step) for step, v in enumerate(losses)] == [None] * len(losses)


def test_the_streak_needs_consecutive_steps_and_survives_a_checkpoint():
    guard = DivergenceGuard(factor=2.0, patience=3, warmup=2)
    for step, value in enumerate([1.0, 1.0, 5.0, 5.0, 1.0, 5.0, 5.0]):  # broken at step 4: no stop
        assert guard.observe(value, step) is None
    resumed = DivergenceGuard(factor=2.0, patience=3, warmup=2)
    resumed.load_state_dict(guard.state_dict())
    reason = resumed.observe(5.0, 7)
    assert reason is not None and reason[1] == 5 and "its starting value (1," in reason[0]


@pytest.mark.parametrize("override", [f"trainer.divergence_guard.{setting}" for setting in (
    "factor=1", "patience=0", "warmup=0", "weight_factor=0.5")])
def test_impossible_guard_settings_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("toy_aim", [override])


def test_cli_reports_it_as_an_error(monkeypatch, capsys):
    from mmict import cli

    def boom(argv):
        raise LossDivergedError("training diverged: train/loss has been above 4 x its starting value")

    monkeypatch.setattr("mmict.train.main", boom)
    assert cli.main(["train", "toy_aim"]) == 1
    assert "error: training diverged" in capsys.readouterr().err
