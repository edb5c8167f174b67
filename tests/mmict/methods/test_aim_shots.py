"""The shots AIM trained on: counted per training batch, summed over ranks, kept in the checkpoint, written to the
run folder, read back by `trained_shots()`, and flagged above a results table where evaluation goes beyond them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import FIXTURES, episode_batch, tiny_aim_cfg
from lightning.pytorch.loggers import CSVLogger

from mmict.eval.protocol import resolve
from mmict.eval.runner import how_made
from mmict.eval.tasks import get_task
from mmict.methods.aim import shots
from mmict.methods.aim.module import AIMModule
from mmict.methods.aim.report import trained_shots_line, trained_shots_of


def fit(module: AIMModule, batches, root) -> L.Trainer:
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), default_root_dir=root,
                        logger=CSVLogger(root, name="logs", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_histogram_is_counted_checkpointed_written_and_read_back(tiny_backbone_dir, tmp_path):
    cfg = tiny_aim_cfg(tiny_backbone_dir, "trainer.max_steps=3", "optim.warmup_steps=0")
    module = AIMModule(cfg)
    assert module.trained_shots() is None  # nothing trained yet: unknown, not empty
    batch = episode_batch(module.backbone)  # 2, 1 and 0 demos
    trainer = fit(module, [batch, batch.head(2), batch.head(1)], tmp_path)
    expected = {0: 1, 1: 2, 2: 3}
    assert module.trained_shots() == expected
    # the run folder's record (the training script writes it there; a bare Trainer writes nothing to the cwd)
    assert not (tmp_path / shots.FILE_NAME).exists()
    shots.report(module.trained_shots(), tmp_path, [])
    record = json.loads((tmp_path / shots.FILE_NAME).read_text())
    assert record == {"episodes_per_shot_count": {"0": 1, "1": 2, "2": 3}, "episodes": 6, "max_shots": 2}
    # the checkpoint keeps it; a module loading it (evaluation, a resumed run) reports it
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["mmict"]["trained_shots"] == expected
    assert set(ckpt["state_dict"]) == {"projector.net.weight", "projector.net.bias"}  # weights as before
    fresh = AIMModule(cfg, backbone=module.backbone)
    fresh.on_load_checkpoint(ckpt)
    assert fresh.trained_shots() == expected and trained_shots_of(fresh) == expected
    # a resumed run counts on from the checkpoint's histogram
    fresh.shot_counts.add([2, 5])
    assert fresh.trained_shots() == {0: 1, 1: 2, 2: 4, 5: 1}


def test_old_checkpoints_have_no_histogram(tiny_backbone_dir):
    ckpt = torch.load(FIXTURES / "pre_refactor" / "toy_aim" / "step000002.ckpt", map_location="cpu",
                      weights_only=False)
    assert "trained_shots" not in ckpt.get("mmict", {})
    module = AIMModule(tiny_aim_cfg(tiny_backbone_dir))
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    assert module.trained_shots() is None
    module.shot_counts.add([1, 2])  # resuming it: part of a run is not passed off as the whole
    assert module.trained_shots() is None
    assert trained_shots_of(SimpleNamespace()) is None  # a method that keeps none


def test_demo_counts_are_gathered_over_ranks():
    other_rank = torch.tensor([3, 3, -1, -1])  # the other rank's last batch held two episodes

    def all_gather(t):
        return torch.stack([t, other_rank])

    two = SimpleNamespace(_trainer=SimpleNamespace(world_size=2), device=torch.device("cpu"), all_gather=all_gather)
    assert shots.gather_demo_counts(two, [1, 2, 0, 4], batch_size=4) == [1, 2, 0, 4, 3, 3]
    with pytest.raises(ValueError, match="larger than data.batch_size"):
        shots.gather_demo_counts(two, [1, 2, 0, 4, 1], batch_size=4)
    one = SimpleNamespace(_trainer=None)
    assert shots.gather_demo_counts(one, [1, 2], batch_size=4) == [1, 2]


def test_the_line_flags_only_evaluated_shots_beyond_training():
    trained = {1: 480, 2: 420, 3: 300}
    [line] = trained_shots_line(trained, [0, 2, 4, 8, 16])
    assert line.startswith("Trained on k demos per episode: 1: 480, 2: 420, 3: 300 (1200 episodes, mean 1.85, max 3)")
    assert line.endswith("; evaluated shots above 3: [4, 8, 16] (beyond training)")
    [within] = trained_shots_line(trained, [0, 2, 3])
    assert within.endswith("evaluated shots above 3: none") and "beyond training" not in within
    assert trained_shots_line(None, [0, 16]) == []


def test_how_made_says_it_only_for_a_module_that_knows(tiny_backbone_dir):
    cfg = tiny_aim_cfg(tiny_backbone_dir, "eval.shots=[0,2,8]")
    task = get_task(cfg.eval.task)
    protocol = resolve(cfg.eval, task, selection=cfg.eval.selection)
    backbone = SimpleNamespace(max_positions=256, max_positions_source="max_position_embeddings=256")
    drawn = {0: {"num_queries": 8, "query_subset": "first N"}}

    def trained_lines(trained):
        return [line for line in how_made(protocol, task, cfg, backbone, drawn, trained=trained)
                if line.startswith("Trained on")]

    assert trained_lines(None) == []  # an old checkpoint, or a method without the histogram
    [line] = trained_lines({1: 5, 2: 3})
    assert "evaluated shots above 2: [8] (beyond training)" in line
    [line] = trained_lines({1: 5, 8: 1})
    assert "beyond training" not in line


def test_loggers_that_take_tables_get_the_histogram(tmp_path):
    tables = []
    wandb_like = SimpleNamespace(log_table=lambda **kw: tables.append(kw))
    path = shots.report({2: 5, 1: 3}, tmp_path, [wandb_like, SimpleNamespace()])  # the second: CSV, no tables
    assert tables == [{"key": "train/trained_shots", "columns": ["shots", "episodes"], "data": [[1, 3], [2, 5]]}]
    assert json.loads(path.read_text())["episodes_per_shot_count"] == {"1": 3, "2": 5}
    assert shots.report(None, tmp_path / "none", [wandb_like]) is None and len(tables) == 1
