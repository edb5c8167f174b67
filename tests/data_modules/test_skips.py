"""What a downstream split lost is reported, not only counted: skipped samples by reason, shards that broke off or
are empty, and samples missing against the size the split was written with (toy manifest, converter summary)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from torchvision.transforms.functional import to_tensor

from data_modules import DownstreamDataModule, drain_skips
from data_modules.skips import SplitLoss, recorded_size, skip_line, skip_record
from mmict.toy.world import draw_shape, write_toy_world

# A toy world with the vqa splits the tests read (24 train, 12 test) and as little else as it allows.
TOY = dict(num_docs=4, val_docs=2, vqa_train=24, vqa_test=12, binding_episodes=1, concept_episodes=1,
           concept_tuning_episodes=1, concept_tuning_val_episodes=1, samples_per_shard=20)
NOUNS = {"queries": "test queries", "pool": "pool examples"}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    draw_shape("circle", "red", "center").save(buf, format="JPEG")
    return buf.getvalue()


def _meta(i: int) -> bytes:
    return json.dumps({"id": f"extra{i}", "question": "what shape is it ?", "answers": ["circle"] * 10}).encode()


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy world's vqa splits, then broken: 4 corrupt test queries (3 images that do not decode, 1 json that
    does not parse) in a shard after the toy's; the first train shard cut in half, an empty file and an empty tar."""
    root = tmp_path_factory.mktemp("broken")
    write_toy_world(root, **TOY)
    vqa = root / "vqa"
    assert [p.name for p in sorted(vqa.glob("*.tar"))] == ["test-000000.tar", "train-000000.tar", "train-000001.tar"]
    with wds.TarWriter(str(vqa / "test-000001.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"badimg{i}", "jpg": b"not a jpeg", "json": _meta(i)})
        sink.write({"__key__": "badjson", "jpg": _jpeg(), "json": b'{"id": "unterminated'})
    shard = vqa / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    (vqa / "train-000002.tar").write_bytes(b"")
    with wds.TarWriter(str(vqa / "train-000003.tar")):
        pass  # a valid tar without a sample
    return root


@pytest.fixture(autouse=True)
def _clean_skips():
    drain_skips()
    yield
    drain_skips()


def test_the_pool_and_the_queries_say_what_they_lost(broken_root: Path) -> None:
    dm = DownstreamDataModule(broken_root, folder="vqa", image_transform=to_tensor)
    dm.setup()
    queries, pool = dm.query_loss, dm.pool_loss
    assert queries.reasons == {"image does not decode": 3, "json does not parse": 1}
    assert queries.kept == len(dm.queries) == 12 and queries.shards == {}
    # the pool: every one of the 24 examples the manifest records is either kept or skipped under a reason
    assert pool.recorded == 24 and pool.kept == len(dm.pool) < 24
    assert pool.kept + pool.skipped == 24
    assert pool.reasons["lost with broken or missing shards"] == 24 - len(dm.indexed("train")) > 0
    assert set(pool.shards) == {"train-000000.tar", "train-000002.tar", "train-000003.tar"}
    assert pool.shards["train-000000.tar"].startswith("broke off after ")
    assert "the rest of it is lost" in pool.shards["train-000000.tar"]
    assert pool.shards["train-000002.tar"].startswith("is unreadable or empty (tar: ")
    assert pool.shards["train-000003.tar"] == "is empty"
    line = skip_line({"queries": queries, "pool": pool}, NOUNS)
    assert line.startswith("Skipped: 4 test queries (image does not decode: 3, json does not parse: 1); ")
    assert f"; {pool.skipped} pool examples (" in line and "shards train-000000.tar broke off after" in line
    record = skip_record({"queries": queries, "pool": pool})
    assert record["queries"] == {"image does not decode": 3, "json does not parse": 1}
    assert record["pool"] == pool.reasons and record["detail"]["pool"]["shards"] == pool.shards
    assert json.loads(json.dumps(record)) == record


def test_queries_drawn_by_position_report_their_own_skips(broken_root: Path) -> None:
    dm = DownstreamDataModule(broken_root, folder="vqa", image_transform=to_tensor, load_queries=False)
    dm.setup()
    assert dm.query_loss is None and dm.count_queries() == 16  # the toy's 12, then the 4 corrupt ones
    drawn = dm.query_loss_at([0, 12, 13, 15])
    assert drawn.kept == 1 and drawn.reasons == {"image does not decode": 2, "json does not parse": 1}
    assert not dm.query_loss_at([0, 1, 2])  # nothing lost where nothing broken was drawn


def test_the_first_queries_report_what_was_read_up_to_the_last(broken_root: Path) -> None:
    dm = DownstreamDataModule(broken_root, folder="vqa", image_transform=to_tensor, num_queries=5)
    dm.setup()
    assert len(dm.queries) == 5 and not dm.query_loss  # the corrupt ones lie after the fifth query
    assert skip_line({"queries": dm.query_loss, "pool": SplitLoss(kept=24)}, NOUNS) is None


def test_a_converter_summary_gives_the_size_and_names_a_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "okvqa"
    folder.mkdir()
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i}", "jpg": _jpeg(), "json": _meta(i)})
    summary = {"written": 5, "shards": ["train-000000.tar", "train-000001.tar"], "skipped": {}}
    (folder / "train.summary.json").write_text(json.dumps(summary))
    assert recorded_size(tmp_path, "okvqa", "train") == (5, ["train-000000.tar", "train-000001.tar"])
    assert recorded_size(tmp_path, "okvqa", "test") is None
    dm = DownstreamDataModule(tmp_path, folder="okvqa", image_transform=to_tensor, load_queries=False)
    dm.setup()
    assert dm.pool_loss.reasons == {"lost with broken or missing shards": 2}
    assert dm.pool_loss.shards == {"train-000001.tar": "is missing"}
    # without a recorded size the broken shards are named and their loss said to be uncounted
    loss = SplitLoss(kept=3, shards={"train-000001.tar": "is empty"})
    assert loss.describe("pool examples").startswith("pool examples: shards train-000001.tar is empty (what they lost")


def test_nothing_lost_says_nothing() -> None:
    clean = {"queries": SplitLoss(kept=12), "pool": SplitLoss(kept=24, recorded=24)}
    assert skip_line(clean, NOUNS) is None
    assert skip_record(clean) == {"queries": {}, "pool": {}, "detail": {
        "queries": {"kept": 12, "skipped": 0, "reasons": {}, "shards": {}, "recorded": None},
        "pool": {"kept": 24, "skipped": 0, "reasons": {}, "shards": {}, "recorded": 24}}}


def test_a_shard_cut_at_a_member_boundary_is_named_broken(tmp_path: Path) -> None:
    """tarfile ends such a stream quietly (no error): only the missing end-of-archive marker gives it away."""
    folder = tmp_path / "okvqa"
    folder.mkdir()
    shard = folder / "train-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(6):
            sink.write({"__key__": f"s{i}", "jpg": _jpeg(), "json": _meta(i)})
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[6].offset  # the header of sample 3's first member
    shard.write_bytes(shard.read_bytes()[:cut])
    dm = DownstreamDataModule(tmp_path, folder="okvqa", image_transform=to_tensor, load_queries=False)
    dm.setup()
    assert len(dm.pool) == 3
    assert dm.pool_loss.shards == {
        "train-000000.tar": "broke off after 3 samples (tar: no end-of-archive marker): the rest of it is lost"}
