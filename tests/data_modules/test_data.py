"""Tests of the data side: toy world, web-corpus episodes, downstream examples, skip counting."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import to_tensor

from data_modules import (
    DownstreamDataModule,
    WebCorpusDataModule,
    collate_episodes,
    drain_skips,
    load_examples,
    record_skip,
    skip_handler,
)
from data_modules.web_documents import document_pairs
from mmict.toy.language import (
    BACKGROUND_RGB,
    BINDING_PROMPT,
    COLOR_RGB,
    COLORS,
    POSITION_CENTERS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    binding_vocabulary,
    tokenize,
    toy_vocabulary,
    vqa_demo_text,
    vqa_prompt,
    word_pools,
)
from mmict.toy.world import draw_shape, make_document, make_vqa_example, toy_world_exists, write_toy_world

SMALL = dict(num_docs=60, val_docs=16, vqa_train=24, vqa_test=12, samples_per_shard=20)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    write_toy_world(root, **SMALL)
    return root


@pytest.fixture(autouse=True)
def _clean_skips():
    drain_skips()  # every test starts from zero counts in this process
    yield
    drain_skips()


def _nearest_color(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda name: float(np.sum((np.array(COLOR_RGB[name]) - rgb) ** 2)))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _episode_batches(urls: list[str], **kw) -> list[dict]:
    """All batches of one validation pass over ``urls`` (finite, deterministic)."""
    dm = WebCorpusDataModule(Path(urls[0]).parent.parent, image_transform=to_tensor, **kw)
    dm.val_urls = urls
    return list(dm.val_dataloader())


def _skips_of(batches: list[dict]) -> Counter:
    # Skips after a stream's last batch stay in this process's counter: add them.
    total: Counter = Counter(drain_skips())
    for batch in batches:
        total.update(batch.skipped)
    return total


# ---------------------------------------------------------------------------------------------------
# Toy world


@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_colour_is_dominant(shape: str) -> None:
    rng = random.Random(0)
    background = np.array(BACKGROUND_RGB, dtype=float)
    for color in COLORS:
        for position in POSITIONS:
            canonical = np.asarray(draw_shape(shape, color, position), dtype=float)
            fx, fy = POSITION_CENTERS[position]
            centre = canonical[int(fy * 32), int(fx * 32)]
            assert _nearest_color(centre) == color, (shape, color, position)

            jittered = np.asarray(draw_shape(shape, color, position, rng=rng), dtype=float)
            assert jittered.shape == (32, 32, 3)
            distance = np.linalg.norm(jittered - background, axis=-1)
            foreground = distance > 60
            assert foreground.sum() > 20
            # Anti-aliased edges blend with the background: judge the colour on the shape's core.
            core = distance > 0.6 * distance.max()
            assert _nearest_color(jittered[core].mean(axis=0)) == color, (shape, color, position)
            # The shape sits where its position says.
            ys, xs = np.nonzero(foreground)
            assert abs(xs.mean() / 32 - fx) < 0.12 and abs(ys.mean() / 32 - fy) < 0.12, position


def test_drawing_is_deterministic_given_seed() -> None:
    a = draw_shape("star", "blue", "left", rng=random.Random(3))
    b = draw_shape("star", "blue", "left", rng=random.Random(3))
    assert a.tobytes() == b.tobytes()
    assert draw_shape("star", "blue", "left", size=48).size == (48, 48)
    with pytest.raises(ValueError):
        draw_shape("hexagon", "blue", "left")


def test_vocabulary_covers_every_generated_text() -> None:
    vocab = toy_vocabulary()
    assert vocab == sorted(set(vocab)) and vocab == toy_vocabulary()
    rng = random.Random(1)
    texts: list[str] = []
    for i in range(150):
        texts += make_document(rng, f"doc_{i}", image_size=8)["text_list"]
        meta, _ = make_vqa_example(rng, f"q_{i}", image_size=8)
        texts += [vqa_prompt(meta["question"]), vqa_demo_text(meta["question"], meta["answers"][0])]
    assert any(t.startswith("a ") for t in texts) and any(t.startswith("Question:") for t in texts)
    missing = {token for text in texts for token in tokenize(text)} - set(vocab)
    assert not missing
    assert (
        vqa_demo_text("what shape is it ?", "circle") == "Question: what shape is it ? Short answer: circle"
    )


def test_documents_are_thematic() -> None:
    rng = random.Random(2)
    for i in range(30):
        doc = make_document(rng, f"doc_{i}")
        assert 2 <= len(doc["text_list"]) <= 8 and len(doc["image_info"]) == len(doc["text_list"])
        assert doc["url"].startswith("toy://")
        info = doc["image_info"][0]
        assert Image.open(io.BytesIO(base64.b64decode(info["image_base64"]))).format == "JPEG"


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_write_toy_world_reuses_and_rewrites(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = dict(num_docs=12, val_docs=4, vqa_train=6, vqa_test=5, samples_per_shard=5)
    assert not toy_world_exists(tmp_path)
    manifest = write_toy_world(tmp_path, **args)
    assert toy_world_exists(tmp_path)
    assert manifest["counts"] == {"web/train": 12, "web/val": 4, "vqa/train": 6, "vqa/test": 5,
                                  "binding/train": 2 * 8 * 100, "binding/test": 3 * 100,
                                  "concept/train": 2 * 8 * 100, "concept/test": 3 * 100,
                                  "concept_tuning/train": 2 * 5 * 600, "concept_tuning/val": 2 * 5 * 50}
    assert len(list((tmp_path / "web").glob("train-*.tar"))) == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["hash"] == manifest["hash"]
    shards = [str(tmp_path / name) for name in manifest["shards"]["web/train"]]  # relative to root
    docs = list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))
    assert len(docs) == 12 and set(json.loads(docs[0]["json"])) >= {"text_list", "image_info", "doc_id"}

    before = _mtimes(tmp_path)
    with caplog.at_level(logging.INFO, logger="mmict.toy.world"):
        again = write_toy_world(tmp_path, **args)
    assert again["hash"] == manifest["hash"]
    assert _mtimes(tmp_path) == before
    assert "reusing toy world" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmict.toy.world"):
        changed = write_toy_world(tmp_path, **{**args, "samples_per_shard": 100})
    assert changed["hash"] != manifest["hash"]
    assert "changed" in caplog.text
    assert len(list((tmp_path / "web").glob("train-*.tar"))) == 1  # old shards are gone


def test_missing_shards_name_the_build_command(tmp_path: Path) -> None:
    dm = WebCorpusDataModule(tmp_path / "corpus", image_transform=to_tensor)
    with pytest.raises(FileNotFoundError, match="mmict data toy") as info:
        dm.setup("fit")
    assert "train-*.tar" in str(info.value)
    with pytest.raises(FileNotFoundError, match="mmict data toy"):
        DownstreamDataModule(tmp_path / "toy", folder="vqa", image_transform=to_tensor).setup()


# ---------------------------------------------------------------------------------------------------
# Web corpus


def _check_batch(batch: dict, batch_size: int, min_shots: int, max_shots: int) -> None:
    counts = batch.demo_counts
    assert len(counts) == batch_size == len(batch.query_targets) == len(batch.query_prompts)
    assert sum(counts) == len(batch.demo_texts) == len(batch.demo_images)
    assert all(min_shots <= k <= max_shots for k in counts)
    images = batch.demo_images + batch.query_images
    assert all(img.shape == (3, 32, 32) and img.dtype == torch.float32 for img in images)
    assert len(batch.query_images) == batch_size
    assert all(prompt == "" for prompt in batch.query_prompts) and all(batch.query_targets)
    assert isinstance(batch.skipped, dict)


def test_train_batches_have_the_episode_structure(toy_root: Path) -> None:
    dm = WebCorpusDataModule(
        toy_root, image_transform=to_tensor, batch_size=4, min_shots=1, max_shots=3, epoch_size=40, seed=1
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 10  # epoch_size // batch_size
    for batch in batches:
        _check_batch(batch, 4, 1, 3)
    assert len({k for batch in batches for k in batch.demo_counts}) > 1  # k varies
    vocab = set(toy_vocabulary() + binding_vocabulary())
    tuning = set(word_pools()["tuning"])
    texts = [t for batch in batches for t in batch.demo_texts + batch.query_targets]
    binding = [t for t in texts if t.startswith(BINDING_PROMPT)]
    assert binding and len(binding) < len(texts)  # both kinds of document are in the corpus
    # The web corpus binds words of the tuning pool only: the eval pool stays unseen in training.
    assert all(t.split()[-1] in tuning for t in binding)
    assert all(set(tokenize(text)) <= vocab for text in texts if text not in binding)


def test_train_stream_is_seeded_and_each_epoch_differs(toy_root: Path) -> None:
    def make_loader(seed: int):
        dm = WebCorpusDataModule(toy_root, image_transform=to_tensor, batch_size=4, epoch_size=16, seed=seed)
        dm.setup("fit")
        return dm.train_dataloader()

    def targets(loader) -> list[str]:
        return [t for batch in loader for t in batch.query_targets]

    loader = make_loader(0)
    first, second = targets(loader), targets(loader)
    assert first == targets(make_loader(0))  # same seed, same stream
    assert first != second  # the next epoch draws other episodes
    assert first != targets(make_loader(5))


def test_train_with_two_workers(toy_root: Path) -> None:
    dm = WebCorpusDataModule(toy_root, image_transform=to_tensor, batch_size=3, epoch_size=15, num_workers=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5  # 15 // 3 batches, shared out among the workers
    for batch in batches:
        _check_batch(batch, 3, 1, 4)
    # Workers have their own seeds: their streams differ.
    assert batches[0].query_targets != batches[1].query_targets


def test_val_is_deterministic_and_capped(toy_root: Path) -> None:
    dm = WebCorpusDataModule(toy_root, image_transform=to_tensor, batch_size=5, max_shots=3, seed=0)
    dm.setup("validate")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert sum(len(b.query_targets) for b in first) == SMALL["val_docs"]  # every toy doc is usable
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.query_targets == b.query_targets and a.demo_texts == b.demo_texts
        assert all(torch.equal(x, y) for x, y in zip(a.demo_images + a.query_images,
                                                     b.demo_images + b.query_images, strict=True))
        # k is the largest the document allows.
        assert all(1 <= k <= 3 for k in a.demo_counts)
    assert 3 in {k for b in first for k in b.demo_counts}

    two_workers = WebCorpusDataModule(
        toy_root, image_transform=to_tensor, batch_size=5, max_shots=3, num_workers=2
    )
    two_workers.setup("validate")
    targets = sorted(t for b in two_workers.val_dataloader() for t in b.query_targets)
    assert targets == sorted(t for b in first for t in b.query_targets)  # episodes don't depend on workers

    for num_workers in (0, 2):  # the cap is exact whatever the number of workers
        capped = WebCorpusDataModule(
            toy_root, image_transform=to_tensor, batch_size=5, val_episodes=7, num_workers=num_workers
        )
        capped.setup("validate")
        batches = list(capped.val_dataloader())
        assert [len(b.query_targets) for b in batches] == [5, 2]
        last = batches[-1]
        assert sum(last.demo_counts) == len(last.demo_texts) == len(last.demo_images)
        assert len(last.query_images) == 2


def _doc(texts: list[str], images: list[str]) -> dict:
    """A document whose image i matches text i; ``images`` are base64 strings."""
    infos = [
        {"image_name": f"img_{i}.jpg", "matched_text_index": i, "matched_sim": 0.3, "image_base64": data}
        for i, data in enumerate(images)
    ]
    return {"doc_id": "d", "url": "toy://d", "text_list": texts, "image_info": infos}


def _b64_image(color: str) -> str:
    return base64.b64encode(_jpeg(draw_shape("circle", color, "center"))).decode()


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    shard = str(tmp_path / "web" / "val-000000.tar")
    good = _doc(["first", "second", "third"], [_b64_image("red"), _b64_image("green"), _b64_image("blue")])
    garbage = _doc(["one", "two"], [_b64_image("red"), "bm90IGFuIGltYWdl!!%%"])
    single = _doc(["alone"], [_b64_image("red")])
    with wds.TarWriter(shard) as writer:
        writer.write({"__key__": "good", "json": json.dumps(good).encode()})
        writer.write({"__key__": "badjson", "json": b'{"text_list": ["unterminated'})
        writer.write({"__key__": "garbage", "json": json.dumps(garbage).encode()})
        writer.write({"__key__": "single", "json": json.dumps(single).encode()})

    batches = _episode_batches([shard], batch_size=8, max_shots=4)
    assert len(batches) == 1
    batch = batches[0]
    assert batch.demo_texts == ["first", "second"] and batch.query_targets == ["third"]
    assert _skips_of(batches) == {
        "json does not parse": 1,
        "image does not decode": 1,
        "too few image-text pairs": 2,
    }


def test_truncated_tar_does_not_crash(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    shard = tmp_path / "web" / "val-000000.tar"
    rng = random.Random(0)
    with wds.TarWriter(str(shard)) as writer:
        for i in range(10):
            writer.write({"__key__": f"doc{i}", "json": json.dumps(make_document(rng, f"doc{i}")).encode()})
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    batches = _episode_batches([str(shard)], batch_size=2)
    episodes = sum(len(b.query_targets) for b in batches)
    assert 1 <= episodes < 10
    skips = _skips_of(batches)
    assert any(reason.startswith("tar: ") for reason in skips), skips


def test_images_as_separate_members_sorted_by_text_index(tmp_path: Path) -> None:
    doc = {
        "text_list": ["zero", "one", "no image here", "three"],
        "image_info": [
            {"image_name": "IMG_3.jpg", "matched_text_index": 3},
            {"image_name": "img_0.jpg", "matched_text_index": 0},
            {"image_name": "img_1.png", "matched_text_index": 1},
            {"image_name": "lost.jpg", "matched_text_index": 2},
        ],
    }
    png = io.BytesIO()
    draw_shape("square", "green", "top").save(png, format="PNG")
    sample = {
        "__key__": "doc",
        "json": json.dumps(doc).encode(),
        "img_3.jpg": _jpeg(draw_shape("star", "blue", "left")),  # webdataset lower-cases member suffixes
        "img_0.jpg": _jpeg(draw_shape("circle", "red", "left")),
        "img_1.png": png.getvalue(),
    }
    pairs = document_pairs(sample)
    assert pairs is not None and [text for _, text in pairs] == ["zero", "one", "three"]
    assert all(image.mode == "RGB" for image, _ in pairs)
    assert drain_skips() == {"missing image": 1}


def test_collate_without_demos() -> None:
    episode = {
        "demo_images": [],
        "demo_texts": [],
        "query_image": torch.zeros(3, 8, 8),
        "query_prompt": "p",
        "query_target": "t",
    }
    record_skip("json does not parse", 2)
    batch = collate_episodes([episode, episode])
    assert batch.demo_images == [] and batch.demo_counts == [0, 0]
    assert [img.shape for img in batch.query_images] == [(3, 8, 8)] * 2
    assert batch.skipped == {"json does not parse": 2} and drain_skips() == {}


def test_skip_handler_counts_and_continues() -> None:
    handler = skip_handler("tar")
    assert handler(ValueError("bad")) is True
    assert drain_skips() == {"tar: ValueError": 1}


def test_lightning_fit_runs_epochs_of_epoch_size(toy_root: Path) -> None:
    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[int] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            self.seen.append(len(batch.query_targets))
            return (self.weight - torch.stack(batch.query_images).mean()) ** 2

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            self.seen.append(-len(batch.query_targets))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = WebCorpusDataModule(toy_root, image_transform=to_tensor, batch_size=4, epoch_size=12)
    model = Probe()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    train_sizes = [n for n in model.seen if n > 0]
    assert train_sizes == [4] * 6  # 2 epochs of 12 // 4 batches
    assert -sum(n for n in model.seen if n < 0) == 2 * SMALL["val_docs"]


# ---------------------------------------------------------------------------------------------------
# Downstream


def test_downstream_pool_and_queries(toy_root: Path) -> None:
    dm = DownstreamDataModule(toy_root, folder="vqa", image_transform=to_tensor, num_queries=10)
    dm.setup()
    assert len(dm.pool) == SMALL["vqa_train"] and len(dm.pool_by_id) == SMALL["vqa_train"]
    assert len(dm.queries) == 10
    assert not set(dm.pool_by_id) & {q.id for q in dm.queries}
    for example in dm.pool + dm.queries:
        assert example.task == "toy_vqa" and example.question in QUESTIONS.values()
        assert len(example.answers) == 10 and len(set(example.answers)) == 1 and example.answers[0]
        assert example.image.shape == (3, 32, 32)
    assert dm.pool_by_id[dm.pool[3].id] is dm.pool[3]

    everything = DownstreamDataModule(toy_root, folder="vqa", image_transform=to_tensor)
    everything.setup()
    assert len(everything.queries) == SMALL["vqa_test"]


def test_load_examples_skips_corrupt_samples(tmp_path: Path) -> None:
    shard = str(tmp_path / "test-000000.tar")
    meta = {"id": "q1", "task": "toy_vqa", "question": "what shape is it ?", "answers": ["circle"] * 10}
    image = _jpeg(draw_shape("circle", "red", "center"))
    with wds.TarWriter(shard) as writer:
        writer.write({"__key__": "ok", "jpg": image, "json": json.dumps(meta).encode()})
        writer.write({"__key__": "badimg", "jpg": b"not a jpeg", "json": json.dumps(meta).encode()})
        writer.write({"__key__": "noimg", "json": json.dumps(meta).encode()})
        writer.write({"__key__": "badjson", "jpg": image, "json": b"{"})
        writer.write({"__key__": "noanswer", "jpg": image, "json": json.dumps({"id": "q5"}).encode()})
        writer.write({"__key__": "ok2", "jpg": image, "json": json.dumps({**meta, "id": "q6"}).encode()})
    examples = load_examples(shard, to_tensor)
    assert [e.id for e in examples] == ["q1", "q6"]
    assert drain_skips() == {
        "image does not decode": 1,
        "missing image": 1,
        "json does not parse": 1,
        "missing answers": 1,
    }
    assert [e.id for e in load_examples([shard], to_tensor, limit=1)] == ["q1"]


def test_downstream_examples_keep_bytes_and_decode_on_access(toy_root: Path) -> None:
    calls = []

    def transform(image: Image.Image) -> torch.Tensor:
        calls.append(image.size)
        return to_tensor(image)

    dm = DownstreamDataModule(toy_root, folder="vqa", image_transform=transform, num_queries=3)
    dm.setup()
    assert calls == []  # nothing preprocessed is held: the pool costs its encoded bytes only
    example = dm.pool[0]
    assert example.image_bytes and torch.equal(example.image, example.image) and len(calls) == 2
    assert example.image.shape == (3, 32, 32)
