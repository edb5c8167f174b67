"""A NaN / inf loss stops the run with the step in the message; the last good checkpoint is the newest one, and the
message's command continues from it with a lower learning rate."""

from __future__ import annotations

import math
import shlex

import lightning as L
import pytest
import torch
from helpers import VectorData

from callbacks.nan_guard import NonFiniteLossError
from mmict.bookkeeping.resume import find_resume
from mmict.config import load_config, save_config
from mmict.train import build_trainer, shot_policy

BAD_STEP = 8  # the 8th optimizer step's loss is NaN (global_step 7 when it is computed)


class Tiny(L.LightningModule):
    def __init__(self, bad_at: int, value: float = math.nan) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.bad_at, self.value = bad_at, value

    def training_step(self, batch, batch_idx):
        loss = self.net(batch["x"]).pow(2).mean()
        if self.global_step == self.bad_at - 1:
            loss = loss * self.value
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path):
    cfg = load_config("toy_aim", ["trainer.accelerator=cpu", "logger.wandb=false", "trainer.progress_bar=false",
                                  "trainer.checkpoint_every_n_steps=3", "trainer.max_steps=20",
                                  "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1"])
    assert shot_policy(cfg) is not None
    trainer, _ = build_trainer(cfg, tmp_path)
    return trainer


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_stops_before_the_update(tmp_path, value):
    trainer = _trainer(tmp_path)
    module = Tiny(BAD_STEP, value)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, datamodule=VectorData())
    msg = str(info.value)
    assert f"at training step {BAD_STEP} " in msg and f"global_step {BAD_STEP - 1}" in msg
    assert "last.ckpt" in msg and "(step 6)" in msg
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step000003.ckpt", "step000006.ckpt"]  # nothing after the bad step
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    # The bad batch never reached the optimizer: the weights are still finite.
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.global_step == BAD_STEP - 1


def test_the_message_names_a_command_that_continues_from_the_checkpoint(tmp_path):
    cfg = load_config("toy_aim", ["trainer.accelerator=cpu", "logger.wandb=false", "trainer.progress_bar=false",
                                  "trainer.checkpoint_every_n_steps=3", "trainer.max_steps=20",
                                  "trainer.val_check_interval=1000", f"run_root={tmp_path / 'runs'}"])
    save_config(cfg, tmp_path / "config.yaml")  # as `mmict train` does in the run folder
    trainer, _ = build_trainer(cfg, tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(Tiny(BAD_STEP), datamodule=VectorData())
    msg = str(info.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    command = shlex.split(msg[msg.index("mmict train"):])
    # The run's own config (overrides included), the last good checkpoint, a tenth of the optimizer's lr (SGD 0.1).
    assert command == ["mmict", "train", str(tmp_path / "config.yaml"), f"resume={last}", "optim.lr=0.01"]
    continued = load_config(command[2], command[3:])
    assert continued.optim.lr == pytest.approx(0.01) and continued.trainer.max_steps == 20
    resume = find_resume(continued, None)
    assert resume is not None and resume.checkpoint == last and resume.run_dir == tmp_path


def test_finite_losses_run_to_the_end(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(Tiny(bad_at=10_000), datamodule=VectorData())
    assert trainer.global_step == 20


def test_cli_reports_it_as_an_error(monkeypatch, capsys):
    from mmict import cli

    def boom(argv):
        raise NonFiniteLossError("train/loss is nan at training step 8")

    monkeypatch.setattr("mmict.train.main", boom)
    assert cli.main(["train", "toy_aim"]) == 1
    assert "error: train/loss is nan at training step 8" in capsys.readouterr().err
