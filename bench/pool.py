"""The demo pool's memory: every encoded image in RAM (`load_examples`, how evaluation held it before) against the
indexed pool (`DownstreamDataModule`: metadata in RAM, images read from the shards by offset).

For two pool sizes, on synthetic shards of noise JPEGs (a real photo's size), both pools are opened in this process
and every example's image is read once (as RICES and the demo bank do); tracemalloc gives what each still holds
afterwards (retained) and its peak while it was built, and the encoded image bytes the examples keep are summed.
The indexed pool is opened from its cached index, as every run after the first does; the one-off index build (one
pass decoding every image, so corrupt samples are known) is timed separately. Random access: reading a random
example's image bytes from its shard against decoding those bytes, which every use of an image does next (both
timed in turns, median of repeats; the shards were just written, so they are in the page cache: a cold disk adds
its seek time).
"""

from __future__ import annotations

import gc
import io
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from bench import Context, Result, markdown, register, target

MIB = 2**20
RATIO_TARGET = 5.0


def _images(count: int, px: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_split(folder: Path, n: int, images: list[bytes], per_shard: int = 100) -> list[str]:
    """``n`` VQA-like examples in shards of ``per_shard`` under ``folder`` (train-*.tar)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for start in range(0, n, per_shard):
        url = str(folder / f"train-{start // per_shard:06d}.tar")
        with wds.TarWriter(url) as writer:
            for i in range(start, min(n, start + per_shard)):
                meta = {"id": f"q{i}", "task": "bench", "question": f"what is in picture {i}?",
                        "answers": [f"answer {i % 7}"] * 10}
                writer.write({"__key__": f"{i:08d}", "jpg": images[i % len(images)], "json": json.dumps(meta).encode()})
        urls.append(url)
    return urls


def _transform(image: Image.Image) -> Any:
    return image.size  # what the backbone's transform would get; its cost is not what is measured here


def measure(open_pool: Callable[[], Any]) -> dict[str, float]:
    """Memory retained by the pool ``open_pool()`` returns after every image was read once, its peak, and the
    encoded image bytes its examples keep."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        pool = open_pool()
        read = sum(len(ex.image_bytes) for ex in pool)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = sum(len(ex.__dict__.get("_image_bytes") or b"") for ex in pool)
    return {"retained": current - base, "peak": peak - base, "held": held, "read": read, "n": len(pool)}


def access_costs(pool: Any, positions: list[int], repeats: int) -> dict[str, list[float]]:
    """Seconds per example: reading the image bytes of ``positions`` from the shards, and decoding them."""
    from data_modules.episodes import decode_image

    data = [pool[i].image_bytes for i in positions]  # warm-up (and every Example made)
    times: dict[str, list[float]] = {"read": [], "decode": []}
    for _ in range(repeats):  # in turns, so a change of load on the machine hits both
        start = time.perf_counter()
        for i in positions:
            pool[i].image_bytes  # noqa: B018 - the read is what is timed
        times["read"].append((time.perf_counter() - start) / len(positions))
        start = time.perf_counter()
        for raw in data:
            decode_image(raw)
        times["decode"].append((time.perf_counter() - start) / len(positions))
    return times


@register("pool", "the demo pool's memory: all images in RAM vs the indexed pool (images read from the shards)")
def run(ctx: Context) -> Result:
    from data_modules.downstream import IndexedSplit, load_examples

    sizes = (20, 80) if ctx.smoke else (200, 800) if ctx.quick else (500, 2000)
    px = 32 if ctx.smoke else 160
    images = _images(8 if ctx.smoke else 64, px)
    image_kb = statistics.fmean(len(b) for b in images) / 1024
    rows: list[dict[str, Any]] = []
    pools = {}
    for n in sizes:
        urls = write_split(ctx.workdir / "pool_bench" / str(n), n, images)
        start = time.perf_counter()
        IndexedSplit(urls)  # the one-off build (every image decoded once), cached next to the shards
        build_s = time.perf_counter() - start
        index_bytes = sum(Path(u + ".idx.json").stat().st_size for u in urls)
        full = measure(lambda u=urls: load_examples(u, _transform))
        indexed = measure(lambda u=urls: IndexedSplit(u).examples(_transform))
        pools[n] = IndexedSplit(urls).examples(_transform)
        rows.append({
            "pool_size": n, "image_kb": image_kb,
            "full_retained_mib": full["retained"] / MIB, "full_peak_mib": full["peak"] / MIB,
            "full_image_bytes_held_mib": full["held"] / MIB,
            "indexed_retained_mib": indexed["retained"] / MIB, "indexed_peak_mib": indexed["peak"] / MIB,
            "indexed_image_bytes_held_mib": indexed["held"] / MIB,
            "indexed_bytes_per_example": indexed["retained"] / n, "full_bytes_per_example": full["retained"] / n,
            "retained_ratio": full["retained"] / max(1, indexed["retained"]),
            "index_build_ms_per_example": 1000 * build_s / n, "index_file_bytes_per_example": index_bytes / n,
        })
        ctx.log(f"  pool {n}: in RAM {full['retained'] / MIB:.1f} MiB retained, indexed "
                f"{indexed['retained'] / MIB:.2f} MiB")
    large = pools[sizes[-1]]
    positions = random.Random(0).sample(range(len(large)), min(200, len(large)))
    costs = access_costs(large, positions, ctx.repeats)
    read_us, decode_us = (1e6 * statistics.median(costs[k]) for k in ("read", "decode"))
    access = {"pool_size": sizes[-1], "examples": len(positions), "read_us": read_us, "decode_us": decode_us,
              "read_vs_decode": read_us / decode_us, "read_us_all": [round(1e6 * t, 2) for t in costs["read"]],
              "decode_us_all": [round(1e6 * t, 2) for t in costs["decode"]]}
    table = markdown(rows, [
        ("pool_size", "pool", "d"), ("image_kb", "image KB", ".1f"),
        ("full_retained_mib", "in RAM: retained MiB", ".2f"), ("full_peak_mib", "in RAM: peak MiB", ".2f"),
        ("indexed_retained_mib", "indexed: retained MiB", ".3f"), ("indexed_peak_mib", "indexed: peak MiB", ".3f"),
        ("indexed_image_bytes_held_mib", "indexed: image bytes held MiB", ".3f"),
        ("indexed_bytes_per_example", "indexed B / example", ".0f"), ("retained_ratio", "in RAM / indexed", ".1f"),
        ("index_build_ms_per_example", "index build ms / example (once)", ".2f"),
    ]) + "\n\n" + markdown([access], [
        ("pool_size", "pool", "d"), ("examples", "random examples", "d"), ("read_us", "read from shard µs", ".1f"),
        ("decode_us", "decode µs", ".1f"), ("read_vs_decode", "read / decode", ".2f"),
    ])
    small_row, large_row = rows
    held = max(r["indexed_image_bytes_held_mib"] for r in rows)
    per_example_growth = large_row["indexed_bytes_per_example"] / small_row["indexed_bytes_per_example"]
    targets = [
        target("encoded image bytes held by the indexed pool after every image was read", "0 at both sizes", held,
               held == 0, "MiB"),
        target(f"retained memory, all images in RAM / indexed ({sizes[-1]} examples)", f">= {RATIO_TARGET:g}x",
               large_row["retained_ratio"], large_row["retained_ratio"] >= RATIO_TARGET, "x"),
        target("indexed pool: bytes per example, larger pool / smaller (metadata only: flat)", "<= 1.25x",
               per_example_growth, per_example_growth <= 1.25, "x"),
        target("reading a random example's image from its shard / decoding it", "<= 1x", access["read_vs_decode"],
               access["read_vs_decode"] <= 1.0, "x"),
    ]
    notes = ["tracemalloc counts Python allocations (the bytes objects and metadata), not the process's RSS",
             "the in-RAM pool grows by one encoded image per example; the indexed one by its metadata only (id, "
             "question, 10 answers, offsets), whatever the image size",
             "random reads hit the page cache (shards just written): a cold disk adds a seek per example"]
    return Result(rows, table, targets, notes,
                  settings={"sizes": list(sizes), "image_px": px, "repeats": ctx.repeats,
                            "distinct_images": len(images), "random_access": access})
