"""Cluster-safe streaming: disjoint shards per rank and worker, equal batch counts, exact resume, shot policy."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torchvision.transforms.functional import to_tensor

from callbacks import DemoSampler
from data_modules import WebCorpusDataModule, drain_skips
from data_modules.shots import ShotPolicy, ShotStage
from data_modules.streaming import EpisodeLoader
from data_modules.web_documents import EpisodeStream


def _png(value: int, size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _doc(name: str, pairs: int, sims: list[float] | None = None, sizes: list[int] | None = None) -> dict:
    texts = [f"{name} text {i}" for i in range(pairs)]
    infos = [{"matched_text_index": i, "image_base64": _png(i, (sizes or [8] * pairs)[i]),
              **({"matched_sim": sims[i]} if sims else {})} for i in range(pairs)]
    return {"text_list": texts, "image_info": infos}


def write_corpus(root: Path, docs_per_shard: list[int], pairs: int = 5, split: str = "train") -> list[str]:
    """Shards ``root/web/<split>-%06d.tar`` with the given numbers of documents, each ``pairs`` pairs long."""
    (root / "web").mkdir(parents=True, exist_ok=True)
    urls = []
    for s, n in enumerate(docs_per_shard):
        url = str(root / "web" / f"{split}-{s:06d}.tar")
        with wds.TarWriter(url) as sink:
            for d in range(n):
                sink.write({"__key__": f"s{s}d{d}", "json": json.dumps(_doc(f"s{s}d{d}", pairs)).encode()})
        urls.append(url)
    return urls


def _stream(urls: list[str], *, rank: int = 0, world_size: int = 1, train: bool = True, batch_size: int = 2,
            batches_per_rank: int = 4, policy: ShotPolicy | None = None, **kw) -> EpisodeStream:
    return EpisodeStream(urls, image_transform=to_tensor, batch_size=batch_size,
                         policy=policy or ShotPolicy.uniform(1, 3), seed=0, train=train,
                         shuffle_buffer=kw.pop("shuffle_buffer", 4), batches_per_rank=batches_per_rank, rank=rank,
                         world_size=world_size, **kw)


def _batches(stream: EpisodeStream, num_workers: int, **kw) -> list[dict]:
    return list(EpisodeLoader(stream, batch_size=None, num_workers=num_workers, **kw))


def _shard(source: str) -> str:
    return source.split("#")[0]


# ---------------------------------------------------------------------------------------------------
# Disjoint and equal


def test_two_ranks_two_workers_read_disjoint_shards_and_equal_batches(tmp_path: Path) -> None:
    urls = write_corpus(tmp_path, [6, 2, 9, 4, 7, 3, 5, 8])  # uneven shards, more of them than 2 x 2 readers
    per_rank = {}
    for rank in (0, 1):
        batches = _batches(_stream(urls, rank=rank, world_size=2, batches_per_rank=7), num_workers=2)
        per_rank[rank] = batches
    assert len(per_rank[0]) == len(per_rank[1]) == 7  # equal batch counts: no DDP rank waits forever
    shards_of_slot: dict[tuple[int, int], set[str]] = {}
    for rank, batches in per_rank.items():
        for batch in batches:
            slot = (rank, batch.resume["worker"])
            shards_of_slot.setdefault(slot, set()).update(_shard(s) for s in batch.sources)
    assert len(shards_of_slot) == 4
    slots = list(shards_of_slot.values())
    for i, a in enumerate(slots):
        for b in slots[i + 1 :]:
            assert not a & b  # no shard is read by two readers in one epoch
    # Steps follow the DataLoader's turn-taking: rank 0's batches are for steps 0..6 in order.
    assert [b.step for b in per_rank[0]] == list(range(7))


def test_fewer_shards_than_readers_split_documents(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_corpus(tmp_path, [12, 12])  # 2 shards for 2 ranks x 2 workers
    sources = []
    counts = []
    for rank in (0, 1):
        dm = WebCorpusDataModule(tmp_path, image_transform=to_tensor, batch_size=2, num_workers=2, epoch_size=8,
                                 shuffle_buffer=0)
        dm._rank_and_world = lambda rank=rank: (rank, 2)  # a simulated 2-rank run
        dm.setup("fit")
        with caplog.at_level("WARNING"):
            batches = list(dm.train_dataloader())
        counts.append(len(batches))
        sources += [s for b in batches for s in b.sources]
    assert "every reader reads every shard" in caplog.text
    assert counts == [2, 2]
    assert len(sources) == len(set(sources)) == 8  # disjoint documents (one pass over 24 covers 8)


def test_validation_on_two_ranks_gives_equal_batches_and_disjoint_documents(tmp_path: Path) -> None:
    urls = write_corpus(tmp_path, [5, 4, 3], split="val")
    seen, counts = [], []
    for rank in (0, 1):
        stream = _stream(urls, rank=rank, world_size=2, train=False, batch_size=2, val_episodes=6)
        batches = _batches(stream, num_workers=2)
        counts.append([len(b.query_targets) for b in batches])
        seen.append({s for b in batches for s in b.sources})
    assert sum(counts[0]) == sum(counts[1]) == 3 and len(counts[0]) == len(counts[1])
    assert not seen[0] & seen[1]
    with pytest.raises(ValueError, match="data.val_episodes"):
        _batches(_stream(urls, rank=0, world_size=2, train=False, val_episodes=None), num_workers=0)


# ---------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("consumed", [3, 4])
def test_resumed_stream_continues_exactly(tmp_path: Path, consumed: int) -> None:
    urls = write_corpus(tmp_path, [7, 5, 6, 4])
    full = _batches(_stream(urls, batches_per_rank=7), num_workers=2, start_epoch=1)
    # What a checkpoint after `consumed` batches holds: each worker's last trained record.
    states = {b.resume["worker"]: b.resume for b in full[:consumed]}
    resumed = _batches(_stream(urls, batches_per_rank=7), num_workers=2, start_epoch=1, resume=states)
    assert [b.sources for b in resumed] == [b.sources for b in full[consumed:]]
    assert [b.demo_counts for b in resumed] == [b.demo_counts for b in full[consumed:]]
    assert [b.step for b in resumed] == [b.step for b in full[consumed:]]
    for a, b in zip(resumed, full[consumed:]):
        assert all(torch.equal(x, y) for x, y in zip(a.query_images, b.query_images))


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[str], list[int]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.global_step, batch.sources, batch.demo_counts))
        return (self.weight - torch.stack(batch.query_images).mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, max_steps: int, ckpt_dir: Path, ckpt_path: str | None = None) -> _Probe:
    dm = WebCorpusDataModule(root, image_transform=to_tensor, batch_size=2, num_workers=2, epoch_size=8,
                             shuffle_buffer=4)
    module = _Probe()
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1,
                                                   filename="{step}"),
                                   DemoSampler(ShotPolicy((ShotStage(0, 1, 1), ShotStage(5, 2, 3)), seed=1))])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_lightning_resume_mid_epoch_trains_on_the_same_batches(tmp_path: Path) -> None:
    write_corpus(tmp_path, [7, 5, 6, 4])
    straight = _fit(tmp_path, 10, tmp_path / "a")
    _fit(tmp_path, 5, tmp_path / "b")  # stops after step 5; its last checkpoint is at step 3 (mid-epoch 0)
    ckpt = tmp_path / "b" / "step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["WebCorpusDataModule"]["ranks"][0]["epoch"] == 0
    assert any("DemoSampler" in key for key in saved["callbacks"])
    resumed = _fit(tmp_path, 10, tmp_path / "c", ckpt_path=str(ckpt))
    assert [s for s in resumed.seen] == straight.seen[3:]
    # The schedule's switch at step 5 holds after the resume too.
    assert all(k == 1 for step, _, counts in straight.seen if step < 5 for k in counts)
    assert all(2 <= k <= 3 for step, _, counts in straight.seen if step >= 5 for k in counts)


# ---------------------------------------------------------------------------------------------------
# Shot policy


def test_shot_policy_fixed_schedule_and_per_step() -> None:
    fixed = ShotPolicy.uniform(4, 4)
    assert {fixed.shots(s, e) for s in range(20) for e in range(4)} == {(4, 4)}
    schedule = ShotPolicy((ShotStage(0, 0, 2), ShotStage(100, 8, 8)), seed=3)
    assert {schedule.shots(s, e)[0] for s in range(100) for e in range(4)} == {0, 1, 2}
    assert schedule.shots(100, 0) == (8, 8) and schedule.max_shots == 8 and schedule.val_shots == 8
    per_step = ShotPolicy.uniform(1, 6, per="step")
    for step in range(10):
        assert len({per_step.shots(step, e) for e in range(8)}) == 1  # one k for the whole batch
    assert len({per_step.shots(step, 0) for step in range(30)}) > 1
    assert ShotPolicy.uniform(1, 6).shots(7, 2) == ShotPolicy.uniform(1, 6).shots(7, 2)  # a pure function
    with pytest.raises(ValueError, match="start at step 0"):
        ShotPolicy((ShotStage(5, 1, 2),))
    with pytest.raises(ValueError, match="min_shots <= max_shots"):
        ShotPolicy.uniform(3, 2)


def test_fixed_shots_drop_short_documents(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    with wds.TarWriter(str(tmp_path / "web" / "train-000000.tar")) as sink:
        for d in range(6):
            sink.write({"__key__": f"d{d}", "json": json.dumps(_doc(f"d{d}", 3 if d % 2 else 6)).encode()})
    drain_skips()
    stream = _stream([str(tmp_path / "web" / "train-000000.tar")], policy=ShotPolicy.uniform(4, 4),
                     batches_per_rank=2, shuffle_buffer=0)
    batches = _batches(stream, num_workers=0)
    assert all(k == 4 for b in batches for k in b.demo_counts)
    skipped = Counter(drain_skips())
    for b in batches:
        skipped.update(b.skipped)
    assert skipped["too few image-text pairs"] >= 2


def test_similarity_and_size_filters_are_counted(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    doc = _doc("d", 4, sims=[0.3, 0.1, 0.3, 0.3], sizes=[16, 16, 4, 16])
    with wds.TarWriter(str(tmp_path / "web" / "val-000000.tar")) as sink:
        sink.write({"__key__": "d", "json": json.dumps(doc).encode()})
    drain_skips()
    stream = _stream([str(tmp_path / "web" / "val-000000.tar")], train=False, min_similarity=0.24,
                     min_image_size=8)
    batches = _batches(stream, num_workers=0)
    assert batches[0].demo_texts == ["d text 0"] and batches[0].query_targets == ["d text 3"]
    assert batches[0].skipped == {"image-text similarity below data.min_similarity": 1,
                                     "image smaller than data.min_image_size": 1}


def test_missing_web_shards_name_the_convert_command(tmp_path: Path) -> None:
    dm = WebCorpusDataModule(tmp_path / "mmc4", image_transform=to_tensor)
    with pytest.raises(FileNotFoundError, match="mmict data convert mmc4"):
        dm.setup("fit")


def test_a_tar_error_drops_the_document_it_cut_short_and_names_the_shard(tmp_path: Path) -> None:
    import tarfile

    (tmp_path / "web").mkdir()
    shard = tmp_path / "web" / "val-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for d in range(8):  # two members per document: the json, then a second member the error will cut
            sink.write({"__key__": f"d{d}", "json": json.dumps(_doc(f"d{d}", 3)).encode(), "pad": b"x" * 3000})
    with tarfile.open(shard) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "d5.pad").offset_data + 100
    shard.write_bytes(shard.read_bytes()[:cut])  # d5's json is whole, its second member cut: d5 is incomplete
    drain_skips()
    batches = _batches(_stream([str(shard)], train=False, batch_size=4), num_workers=0)
    keys = [source.split("#")[1] for b in batches for source in b.sources]
    assert keys == ["d0", "d1", "d2", "d3", "d4"]  # d5, cut short, is not taken for a whole document
    assert _skips(batches) == {"tar: ReadError in val-000000.tar: the document it cut short is dropped; the "
                               "documents after it in the shard are lost too (how many is not known)": 1}


def _skips(batches) -> Counter:
    """What the batches report skipped, plus what the stream's readers left in the drain."""
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    skipped.update(drain_skips())
    return skipped


def test_an_unreadable_shard_is_counted_and_named(tmp_path: Path) -> None:
    urls = write_corpus(tmp_path, [3], split="val")
    missing = str(tmp_path / "web" / "val-000001.tar")
    drain_skips()
    batches = _batches(_stream([*urls, missing], train=False, batch_size=4), num_workers=0)
    assert sum(len(b) for b in batches) == 3
    assert _skips(batches) == {"tar: FileNotFoundError in val-000001.tar: the shard does not read; its documents "
                               "are lost (how many is not known)": 1}
