"""Validation episodes of a task's val split: nearly every example is a query once, a small split still
validates (warned), none crashes training."""

from __future__ import annotations

from data_modules.task_episodes import TaskEpisodeDataModule
from mmict.eval.tasks import get_task
from mmict.toy.world import write_toy_world


def val_episodes(root, max_shots: int):
    dm = TaskEpisodeDataModule(root, task=get_task("toy_vqa"), val_split="test", image_transform=lambda im: im.size,
                               batch_size=1, min_shots=1, max_shots=max_shots, epoch_size=8, shuffle_buffer=4,
                               seed=0, val_episodes=100)
    dm.setup("fit")
    return [b for b in dm.val_dataloader()]


def test_every_example_after_the_first_k_is_a_query(tmp_path):
    write_toy_world(tmp_path, num_docs=4, val_docs=2, vqa_train=8, vqa_test=10, binding_episodes=2)
    batches = val_episodes(tmp_path, max_shots=3)
    assert len(batches) == 10 - 3  # a sliding window: 7 queries, not 10 // 4 = 2
    assert all(b.demo_counts == [3] for b in batches)
    assert len({b.sources[0] for b in batches}) == 7


def test_a_split_smaller_than_max_shots_plus_one_validates_at_the_shots_it_has(tmp_path, caplog):
    write_toy_world(tmp_path, num_docs=4, val_docs=2, vqa_train=8, vqa_test=3, binding_episodes=2)
    with caplog.at_level("WARNING"):
        batches = val_episodes(tmp_path, max_shots=4)
    assert len(batches) == 3 and all(b.demo_counts == [2] for b in batches)  # each example the query once
    assert "3 usable examples, fewer than max_shots + 1 = 5: validating at 2 shots" in caplog.text
