"""Training augmentation as MMICT's reference (LAVIS blip2_image_train): crop boxes as torchvision's
RandomResizedCrop draws them, from the stream's own generator."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from data_modules.augment import ReferenceAugment, crop_box, transform_size


def test_crop_boxes_stay_in_the_image_with_the_reference_scale_and_ratio():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = crop_box(320, 240, rng)
        assert 0 <= left and 0 <= top and left + w <= 320 and top + h <= 240 and w > 0 and h > 0
        areas.append(w * h / (320 * 240))
        ratios.append(w / h)
    assert 0.49 <= min(areas) and max(areas) <= 1.0  # scale (0.5, 1.0), up to rounding
    assert min(ratios) >= 3 / 4 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    # the same distribution as torchvision's RandomResizedCrop.get_params (the reference's transform)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = Image.new("RGB", (320, 240))
    ref = [RandomResizedCrop.get_params(image, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) for _ in range(2000)]
    ref_areas = [h * w / (320 * 240) for _, _, h, w in ref]
    ref_ratios = [w / h for _, _, h, w in ref]
    assert abs(sum(areas) / 2000 - sum(ref_areas) / 2000) < 0.01
    assert abs(sum(ratios) / 2000 - sum(ref_ratios) / 2000) < 0.02


def test_same_generator_same_crops_and_flips_differ_by_draw():
    image = Image.linear_gradient("L").rotate(90).convert("RGB").resize((64, 48))  # varies left to right

    def to_tensor(im):
        return torch.tensor(list(im.getdata()), dtype=torch.float32).reshape(im.height, im.width, 3)

    a = ReferenceAugment(to_tensor, 32, random.Random(3))
    b = ReferenceAugment(to_tensor, 32, random.Random(3))
    outs = [a(image) for _ in range(8)]
    assert all(torch.equal(x, b(image)) for x in outs)  # a resumed stream (same generator state) draws the same
    assert all(x.shape == (32, 32, 3) for x in outs)
    flipped = [torch.equal(x, x.flip(1)) for x in outs]
    assert len({tuple(x.flatten()[:50].tolist()) for x in outs}) > 1 and not all(flipped)


def test_transform_size_reads_the_processor_and_refuses_what_it_cannot():
    class T:
        def __init__(self, size):
            self.image_processor = type("P", (), {"size": size})()

    assert transform_size(T({"height": 224, "width": 224})) == 224
    assert transform_size(T({"shortest_edge": 336})) == 336
    with pytest.raises(ValueError, match="data.augment=none"):
        transform_size(T({"longest_edge": 980}))


def test_task_episodes_augment_training_images_only_and_resume_draws_the_same(tmp_path):
    from data_modules.task_episodes import TaskEpisodeDataModule
    from mmict.eval.tasks import get_task
    from mmict.toy.world import write_toy_world

    write_toy_world(tmp_path, num_docs=4, val_docs=2, vqa_train=30, vqa_test=6, binding_episodes=2,
                    samples_per_shard=50)

    def first_batches(augment_size):
        dm = TaskEpisodeDataModule(tmp_path, task=get_task("toy_vqa"), val_split="test",
                                   image_transform=lambda im: (im.size, im.tobytes()[:24]), batch_size=4,
                                   min_shots=1, max_shots=2, epoch_size=40, shuffle_buffer=8, seed=0,
                                   augment_size=augment_size)
        dm.setup("fit")
        return list(dm.train_dataloader()), list(dm.val_dataloader())

    train, val = first_batches(augment_size=8)
    sizes = {img[0] for b in train for img in b.query_images + list(b.demo_images)}
    assert sizes == {(8, 8)}  # cropped and resized to the augmentation's size
    assert {img[0] for b in val for img in b.query_images} != {(8, 8)}  # validation is not augmented
    again, _ = first_batches(augment_size=8)
    assert [b.query_images for b in again] == [b.query_images for b in train]  # the stream's generator decides
    plain, _ = first_batches(augment_size=None)
    assert {img[0] for b in plain for img in b.query_images} != {(8, 8)}
