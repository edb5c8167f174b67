"""The indexed demo pool: the same examples as a full read, random access, a cache that is never stale, no image
bytes held, corrupt samples skipped and counted (data_modules/shard_index.py, downstream.IndexedSplit)."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import random
import tarfile
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import to_tensor

from data_modules import drain_skips, load_examples
from data_modules import shard_index as shard_index_module
from data_modules.downstream import DownstreamDataModule, Example, IndexedSplit, ShardExamples
from data_modules.shard_index import SUFFIX, StaleShardError
from mmict.bank import image_source
from mmict.eval.runner import at_view
from mmict.toy.world import write_toy_world


@pytest.fixture(autouse=True)
def _clean_skips():
    drain_skips()
    yield
    drain_skips()


def _image(seed: int, size: int = 16, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _meta(i: int, **extra) -> bytes:
    return json.dumps({"id": f"ex{i}", "task": "t", "question": f"q{i}?", "answers": [f"a{i}", "b"], **extra}).encode()


def _write(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _mixed_split(folder: Path) -> list[str]:
    """Three train shards: images of every kind with every metadata field, corrupt samples, videos."""
    folder.mkdir(parents=True, exist_ok=True)
    first = [{"__key__": f"s{i:03d}", "jpg": _image(i), "json": _meta(i)} for i in range(5)]
    first += [
        {"__key__": "png", "png": _image(50, fmt="PNG"), "json": _meta(50, episode="ep1", label=1)},
        {"__key__": "karp", "jpg": _image(51), "json": _meta(51, karpathy_split="restval", captions=["c"])},
        {"__key__": "meme", "webp": _image(52, fmt="WEBP"), "json": json.dumps({"id": "m", "text": "w", "label": 0})
         .encode()},
    ]
    second = [
        {"__key__": "badimg", "jpg": b"not a jpeg", "json": _meta(60)},
        {"__key__": "noimg", "json": _meta(61)},
        {"__key__": "badjson", "jpg": _image(62), "json": b"{"},
        {"__key__": "noanswer", "jpg": _image(63), "json": json.dumps({"id": "x"}).encode()},
        {"__key__": "list", "jpg": _image(64), "json": b"[1]"},
        {"__key__": "nojson", "jpg": _image(65)},
        {"__key__": "after", "jpg": _image(66), "json": _meta(66)},
    ]
    third = [
        {"__key__": f"vid{v}", **{f"frame_{f:03d}.jpg": _image(100 * v + f) for f in range(3)}, "json": _meta(70 + v)}
        for v in range(3)
    ]
    third.insert(1, {"__key__": "badvid", "frame_000.jpg": _image(9), "frame_001.jpg": b"xx", "json": _meta(80)})
    return [_write(folder / f"train-{n:06d}.tar", s) for n, s in enumerate([first, second, third])]


def _same(indexed: list[Example], full: list[Example]) -> None:
    assert [e.id for e in indexed] == [e.id for e in full]
    assert indexed == full  # every metadata field (Example compares all but its images)
    for a, b in zip(indexed, full, strict=True):
        assert a.image_bytes == b.image_bytes and a.frames_bytes == b.frames_bytes
        assert a.stored is not None and b.stored is None


def test_index_gives_the_examples_a_full_read_gives_in_order_and_counts_the_same_skips(tmp_path: Path) -> None:
    urls = _mixed_split(tmp_path / "task")
    full = load_examples(urls, to_tensor)
    full_skips = drain_skips()
    assert full_skips == {"image does not decode": 2, "missing image": 1, "json does not parse": 1,
                          "missing answers": 1, "malformed example": 1, "missing json": 1}
    split = IndexedSplit(urls)
    assert drain_skips() == {}  # built, not yet counted
    pool = split.examples(to_tensor)
    _same(list(pool), full)
    assert split.count_skips() == sum(full_skips.values()) and drain_skips() == full_skips
    assert len(split) == len(full) + sum(full_skips.values())  # positions number every sample, as a full read
    video = next(e for e in pool if e.id == "ex70")
    assert len(video.frames_bytes) == 3 and video.image_bytes == video.frames_bytes[0]
    assert [t.shape for t in video.image] == [(3, 16, 16)] * 3
    # the bank and RICES read the same bytes from an indexed example as from one read in full
    assert [image_source(e) for e in pool] == [image_source(e) for e in full]
    # read again from the cache (nothing rebuilt): the same examples
    assert all(Path(u + SUFFIX).is_file() for u in urls)
    again = IndexedSplit(urls)
    _same(list(again.examples(to_tensor)), full)


def test_truncated_shard_loses_what_a_full_read_loses(tmp_path: Path) -> None:
    urls = _mixed_split(tmp_path / "task")
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) // 2])
    full = load_examples(urls, to_tensor)
    full_skips = drain_skips()
    split = IndexedSplit(urls)
    _same(list(split.examples(to_tensor)), full)
    split.count_skips()
    assert drain_skips() == full_skips and any(k.startswith("tar: ") for k in full_skips)


def test_random_access_by_position_and_id(tmp_path: Path) -> None:
    root = tmp_path / "toy"
    write_toy_world(root, num_docs=4, val_docs=2, vqa_train=40, vqa_test=15, binding_episodes=2,
                    samples_per_shard=7)
    train = sorted(str(p) for p in (root / "vqa").glob("train-*.tar"))
    full = load_examples(train, to_tensor)
    dm = DownstreamDataModule(root, folder="vqa", image_transform=to_tensor, num_queries=5)
    dm.setup()
    pool = dm.pool
    assert isinstance(pool, ShardExamples) and len(pool) == len(full) == 40
    for i in random.Random(0).sample(range(40), 15) + [-1, -40]:
        assert pool[i] == full[i] and pool[i].image_bytes == full[i].image_bytes
        assert dm.pool_by_id[full[i].id] is pool[i]  # made once, then the same object
    assert pool[5:12:3] == full[5:12:3] and pool[-3:] == full[-3:]
    with pytest.raises(IndexError):
        pool[40]
    assert set(dm.pool_by_id) == {e.id for e in full} and len(dm.pool_by_id) == 40
    # queries by position, through the same index
    test = sorted(str(p) for p in (root / "vqa").glob("test-*.tar"))
    all_queries = load_examples(test, to_tensor)
    assert dm.count_queries() == 15 and dm.queries == all_queries[:5]
    at = dm.queries_at([14, 3, 7, 3])
    assert sorted(at) == [3, 7, 14] and [at[p] for p in (3, 7, 14)] == [all_queries[p] for p in (3, 7, 14)]
    assert at[7].image_bytes == all_queries[7].image_bytes


def test_queries_at_skips_and_counts_a_corrupt_position(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    _write(folder / "test-000000.tar", [
        {"__key__": "a", "jpg": _image(1), "json": _meta(1)},
        {"__key__": "b", "jpg": b"broken", "json": _meta(2)},
        {"__key__": "c", "jpg": _image(3), "json": _meta(3)},
    ])
    _write(folder / "train-000000.tar", [{"__key__": "p", "jpg": _image(4), "json": _meta(4)}])
    dm = DownstreamDataModule(tmp_path, folder="task", image_transform=to_tensor, load_queries=False)
    dm.setup()
    assert dm.count_queries() == 3
    found = dm.queries_at([0, 1, 2])
    assert [e.id for e in found.values()] == ["ex1", "ex3"] and sorted(found) == [0, 2]
    assert drain_skips() == {"image does not decode": 1}


def test_pool_setup_counts_corrupt_samples_every_time_it_opens(tmp_path: Path, caplog) -> None:
    _mixed_split(tmp_path / "task")
    _write(tmp_path / "task" / "test-000000.tar", [{"__key__": "q", "jpg": _image(1), "json": _meta(1)}])
    for _ in range(2):  # built, then read from the cache: the same count
        dm = DownstreamDataModule(tmp_path, folder="task", image_transform=to_tensor)
        with caplog.at_level(logging.WARNING, logger="data_modules.downstream"):
            dm.setup()
        assert len(dm.pool) == 12 and "ex60" not in dm.pool_by_id
        assert drain_skips() == {"image does not decode": 2, "missing image": 1, "json does not parse": 1,
                                 "missing answers": 1, "malformed example": 1, "missing json": 1}
        assert "7 corrupt or unusable samples skipped" in caplog.text


def test_a_rewritten_shard_invalidates_its_index(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    shard = folder / "train-000000.tar"
    _write(shard, [{"__key__": f"k{i}", "jpg": _image(i), "json": _meta(i)} for i in range(4)])
    old = IndexedSplit([str(shard)]).examples(to_tensor)
    first = old[1]  # made before the shard changes
    assert first.id == "ex1"
    cached = json.loads((folder / ("train-000000.tar" + SUFFIX)).read_text())
    # rewritten with other content (and the same number of samples): the cached index must not be used
    _write(shard, [{"__key__": f"k{i}", "jpg": _image(10 + i), "json": _meta(10 + i)} for i in range(4)])
    os.utime(shard, ns=(cached["mtime_ns"] + 1_000_000, cached["mtime_ns"] + 1_000_000))
    new = IndexedSplit([str(shard)])
    assert [e.id for e in new.examples(to_tensor)] == ["ex10", "ex11", "ex12", "ex13"]
    assert new.examples(to_tensor)[2].image_bytes == _image(12)
    # the pool opened before the rewrite refuses to read other bytes than it indexed
    with pytest.raises(StaleShardError, match="changed after its index was read"):
        first.image_bytes  # noqa: B018
    with pytest.raises(StaleShardError):
        old[3].image  # noqa: B018


def test_same_size_rewrite_is_caught_by_the_member_header(tmp_path: Path) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    shard = folder / "train-000000.tar"
    _write(shard, [{"__key__": f"k{i}", "jpg": _image(i), "json": _meta(i)} for i in range(3)])
    pool = IndexedSplit([str(shard)]).examples(to_tensor)
    assert pool[2].image_bytes == _image(2)
    stored = pool[2].stored
    st = shard.stat()
    shard.write_bytes(bytes(st.st_size))  # the same size, no tar header anywhere
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as indexed
    with pytest.raises(StaleShardError, match="tar header"):
        stored.first()


def test_read_only_folder_caches_the_index_in_the_user_cache(tmp_path: Path, monkeypatch, caplog) -> None:
    folder = tmp_path / "task"
    urls = _mixed_split(folder)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(shard_index_module, "folder_writable", lambda path: path != folder)
    with caplog.at_level(logging.INFO, logger="data_modules.shard_index"):
        split = IndexedSplit(urls)
    assert not list(folder.glob(f"*{SUFFIX}"))
    assert len(list((cache / "mmict" / "shard-index").glob(f"*{SUFFIX}"))) == 3
    assert "is read-only: its index is cached at" in caplog.text
    again = shard_index_module.index_shards(urls, lambda s: "unused", recipe="downstream-example/1")
    assert not any(ix.built for ix in again)  # found in the user cache
    assert [e.id for e in IndexedSplit(urls).examples(to_tensor)] == [e.id for e in split.examples(to_tensor)]


def test_a_changed_recipe_rebuilds_the_index(tmp_path: Path) -> None:
    urls = _mixed_split(tmp_path / "task")
    IndexedSplit(urls)
    seen = []
    rebuilt = shard_index_module.index_shards(urls[:1], lambda s: seen.append(s["__key__"]) or "no", recipe="other")
    assert rebuilt[0].built and len(seen) == 8


def _bytes_reachable(root: object) -> int:
    """Total length of the bytes objects reachable from ``root`` (what it holds in encoded images), not counting
    what its functions (the image transform) reach through their modules."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType | types.BuiltinFunctionType
                                          | types.MethodType):
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray):
            total += len(obj)
            continue
        stack.extend(gc.get_referents(obj))
    return total


def _split_of(folder: Path, n: int, size: int) -> list[str]:
    folder.mkdir(parents=True)
    samples = [{"__key__": f"k{i:05d}", "png": _image(i, size, "PNG"), "json": _meta(i)} for i in range(n)]
    return [_write(folder / f"train-{j:06d}.tar", samples[j : j + 50]) for j in range(0, n, 50)]


def _retained(make, urls: list[str]) -> tuple[int, object]:
    """Memory still allocated after ``make(urls)`` (whose result is kept) has built a pool and read every image."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pool = make(urls)
        for example in pool:
            assert example.image_bytes and example.image is not None
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, pool
    finally:
        tracemalloc.stop()


def test_the_pool_holds_no_image_bytes_and_its_memory_does_not_grow_with_image_size(tmp_path: Path) -> None:
    size = 48  # a 48x48 noise PNG: ~7 KB, far more than an example's metadata
    small, large = _split_of(tmp_path / "small", 40, size), _split_of(tmp_path / "large", 160, size)
    for urls in (small, large):
        IndexedSplit(urls)  # built and cached: what follows opens it as a later run does
    grown = {}
    for name, make in {"full": lambda u: load_examples(u, to_tensor),
                       "indexed": lambda u: IndexedSplit(u).examples(to_tensor)}.items():
        (kept_small, pool_small), (kept_large, pool_large) = _retained(make, small), _retained(make, large)
        grown[name] = (kept_large - kept_small) / 120  # per extra example
        held = _bytes_reachable(pool_large)
        if name == "indexed":
            assert held == 0 and _bytes_reachable(pool_small) == 0  # every image read, none kept
        else:
            assert held >= 160 * 5000
    image = len(_image(0, size, "PNG"))
    assert grown["full"] > image  # the old pool: every example's encoded image
    assert grown["indexed"] < image / 3, grown  # the indexed one: metadata only, whatever the image size


def test_at_view_keeps_an_indexed_pool_lazy(tmp_path: Path) -> None:
    urls = _mixed_split(tmp_path / "task")
    pool = IndexedSplit(urls).examples(to_tensor)

    def half(image: Image.Image):
        return to_tensor(image.resize((8, 8)))

    view = at_view(pool, half)
    assert isinstance(view, ShardExamples) and len(view) == len(pool) and view[0] == pool[0]
    assert view[0].image.shape == (3, 8, 8) and pool[0].image.shape == (3, 16, 16)
    listed = at_view(list(pool), half)  # a plain list of indexed examples: copies, bytes still not read or kept
    assert listed[3].image.shape == (3, 8, 8) and _bytes_reachable(listed) == 0


def test_the_index_reads_members_from_long_names_and_pax_headers(tmp_path: Path) -> None:
    """A member's offset is its data's, whatever headers come before it (GNU long names, pax)."""
    shard = tmp_path / "train-000000.tar"
    key = "d" * 120
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, name in enumerate([f"{key}.jpg", f"{key}.json", "short.jpg", "short.json"]):
            data = _image(i) if name.endswith("jpg") else _meta(i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    full = load_examples([str(shard)], to_tensor)
    _same(list(IndexedSplit([str(shard)]).examples(to_tensor)), full)
