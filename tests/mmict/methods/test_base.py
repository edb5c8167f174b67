"""A resume trains with the command's optimisation settings, not the checkpoint's, and says what it changed."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmict.config import load_config
from mmict.methods.base import FrozenBackboneModule
from mmict.train import build_trainer


class _Stub(torch.nn.Module):
    """What the checkpoint hooks read of a backbone; no weights."""

    name_or_path, family, hidden_size = "stub", "llava", 4


class Tiny(FrozenBackboneModule):
    """The shared module's optimizer, schedule and checkpoint hooks around one linear layer."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=_Stub())
        self.net = torch.nn.Linear(4, 1)
        self.lrs: dict[int, float] = {}  # global_step -> the learning rate its update used

    def training_step(self, batch, batch_idx):
        self.lrs[self.global_step] = self.trainer.optimizers[0].param_groups[0]["lr"]
        loss = self.net(batch["x"]).pow(2).mean()
        self.log("train/loss", loss)
        return loss


class Data(L.LightningDataModule):
    shot_policy = None  # the DemoSampler callback hands its policy here

    def train_dataloader(self):
        torch.manual_seed(0)
        return DataLoader([{"x": torch.randn(4)} for _ in range(64)], batch_size=2)


def _config(*extra: str):
    return load_config("toy_aim", ["trainer.accelerator=cpu", "logger.wandb=false", "trainer.progress_bar=false",
                                   "trainer.checkpoint_every_n_steps=4", "trainer.max_steps=8",
                                   "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
                                   "optim.warmup_steps=2", "optim.lr=1e-3", *extra])


def _fit(cfg, run_dir, ckpt_path=None) -> Tiny:
    module = Tiny(cfg)
    trainer, _ = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=Data(), ckpt_path=ckpt_path)
    return module


def test_a_resume_trains_with_the_commands_learning_rate_and_says_so(tmp_path, caplog):
    first = _fit(_config(), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step000004.ckpt"
    lower = ("optim.lr=1e-4", "optim.weight_decay=0.1")
    straight = _fit(_config(*lower), tmp_path / "b")  # trained at the new settings from the start
    with caplog.at_level(logging.WARNING, logger="mmict.methods.base"):
        resumed = _fit(_config(*lower), tmp_path / "c", ckpt_path=str(ckpt))
    # Without the fix the restored scheduler kept the checkpoint's base rate: the first run's learning rates.
    for step in range(4, 8):
        assert resumed.lrs[step] == pytest.approx(straight.lrs[step], rel=1e-9), step
        assert resumed.lrs[step] != pytest.approx(first.lrs[step], rel=1e-3), step
    optimizer = resumed.trainer.optimizers[0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # the decay group's and the bias's
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-4, 1e-4]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert "optim.lr 0.001 (checkpoint) -> 0.0001 (now)" in line
    assert "optim.weight_decay 0.0 (checkpoint) -> 0.1 (now)" in line and "from step 4 on" in line


def test_a_resume_with_the_same_settings_changes_nothing(tmp_path, caplog):
    first = _fit(_config(), tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="mmict.methods.base"):
        resumed = _fit(_config(), tmp_path / "b", ckpt_path=str(tmp_path / "a" / "checkpoints" / "step000004.ckpt"))
    assert not [r for r in caplog.records if r.getMessage().startswith("resume:")]
    assert all(resumed.lrs[s] == pytest.approx(first.lrs[s], rel=1e-9) for s in range(4, 8))
