"""What the benchmarks share: tiny LLaVAs with real image-token counts, timing, peak memory, machine info."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench import Context
from data_modules.episodes import collate_episodes
from mmict.batch import EpisodeBatch

# ---- machine and versions --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
    with contextlib.suppress(OSError, AttributeError, ValueError):
        mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1)
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    import safetensors

    from mmict.bookkeeping.record import versions as mmict_versions

    return {**mmict_versions(), "safetensors": safetensors.__version__}


# ---- timing and memory -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `fn` takes (device work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", _PROC_STATUS.read_text())
    if match is None:
        raise OSError(f"no {field} in {_PROC_STATUS}")
    return int(match.group(1)) * 1024


class PeakMemory:
    """Peak memory one call adds above what was allocated before it (weights, inputs and the bank excluded).

    CUDA: `torch.cuda.max_memory_allocated` minus the allocation before the call (exact for tensors).
    CPU (Linux): the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
    minus the RSS before the call. torch has no CPU allocator statistics, and glibc keeps freed memory for
    reuse, which would hide new peaks: inside `precise()` its mmap threshold is pinned to 64 KiB so tensor
    buffers are mapped on allocation and returned on free, and before each call the free heap pages are given
    back (`malloc_trim`), so the RSS follows the live tensors (checked to within ~1 MiB against known
    allocations). Limits: it counts pages,
    not tensors (4 KiB granularity; the allocator's own small blocks and thread stacks are included), and
    only what was touched. Elsewhere (macOS, Windows, no /proc) memory is not measured (None).
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda" or self._proc_works()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the allocation before the call (tensors only)"
        elif self.available:
            self.method = ("Linux RSS high-water mark above the RSS before the call (VmHWM reset via "
                           "/proc/self/clear_refs; glibc mmap threshold pinned to 64 KiB while measuring so freed "
                           "tensors leave the RSS); page-granular, includes allocator overhead")
        else:
            self.method = "not measured (needs CUDA or Linux /proc)"
        self._libc: Any = None
        if device.type != "cuda":
            with contextlib.suppress(OSError):
                self._libc = ctypes.CDLL("libc.so.6")  # glibc; elsewhere the RSS is read as it comes

    @staticmethod
    def _proc_works() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
            _status_bytes("VmHWM")
            return True
        except OSError:
            return False

    def _mallopt(self, param: int, value: int) -> None:
        if self._libc:
            self._libc.mallopt(param, value)

    @contextlib.contextmanager
    def precise(self) -> Iterator[None]:
        """Measure inside this block; timings are taken outside it. glibc's dynamic threshold cannot be turned
        back on, so on exit it is pinned where the dynamic one settles (32 MiB, trim at twice that)."""
        if self.device.type != "cuda":
            self._mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
            self._mallopt(self.M_TRIM_THRESHOLD, 128 * 1024)
        try:
            yield
        finally:
            if self.device.type != "cuda":
                self._mallopt(self.M_MMAP_THRESHOLD, 32 * 2**20)
                self._mallopt(self.M_TRIM_THRESHOLD, 64 * 2**20)

    def measure(self, fn: Callable[[], Any]) -> float | None:
        """Peak MiB that one call of `fn` adds (None where memory is not measured)."""
        if not self.available:
            fn()
            return None
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        gc.collect()  # garbage of earlier calls must not be freed (and its pages reused) during this one
        if self._libc:
            self._libc.malloc_trim(0)  # free heap pages go back to the OS: reusing them shows in the RSS again
        before = _status_bytes("VmRSS")
        _CLEAR_REFS.write_text("5")  # VmHWM := current RSS
        fn()
        return max(0, _status_bytes("VmHWM") - before) / 2**20


# ---- tiny LLaVAs with real image-token counts ------------------------------------------------------------

WORDS = ("question what color is the shape on left right of this image short answer a red blue green yellow "
         "circle square triangle small large in center top bottom corner there one two three it . ? : ,").split()
DEMO_TEXT = "Question: what color is the small shape on the left of this image ? Short answer: a red circle ,"
QUERY_PROMPT = "Question: what color is the shape in the center ? Short answer:"

VARIANTS = {
    # LLaVA-1.5: CLIP ViT-L/14 at 336 px -> 24 x 24 patches = 576 image tokens (CLS dropped).
    "llava-1.5": {"family": "llava", "image_size": 336, "patch_size": 14},
    # LLaVA-NeXT AnyRes at 672 x 672: the 336 px base view + 2 x 2 tiles of 576 = 2880 patch tokens, plus the
    # 48 row-newline tokens LLaVA-NeXT inserts = 2928 positions per image.
    "llava-next": {"family": "llava_next", "image_size": 336, "patch_size": 14, "anyres": 672},
    # The harness check: 2 x 2 patches; runs in seconds, means nothing.
    "smoke": {"family": "llava", "image_size": 28, "patch_size": 14},
}


def build_tiny(folder: Path, variant: str, text_hidden: int = 64, text_layers: int = 2) -> Path:
    """Save a random-init tiny LLaVA(-NeXT) with its tokenizer and image processor: the widths are small,
    the image-token counts are the real models' (see VARIANTS)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
    )

    from mmict.toy.backbone import build_tokenizer

    spec = VARIANTS[variant]
    tokenizer = build_tokenizer(list(WORDS))
    vision = CLIPVisionConfig(image_size=spec["image_size"], patch_size=spec["patch_size"], hidden_size=32,
                              intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 3,
                       num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=1 << 17, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    common = dict(vision_config=vision, text_config=text, vision_feature_select_strategy="default",
                  vision_feature_layer=-1, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    size, crop = {"shortest_edge": spec["image_size"]}, {"height": spec["image_size"], "width": spec["image_size"]}
    torch.manual_seed(0)
    if spec["family"] == "llava_next":
        big, base = spec["anyres"], spec["image_size"]
        pinpoints = [[base, big], [big, base], [big, big]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
        processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        processor = CLIPImageProcessor(size=size, crop_size=crop)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class Env:
    """A tiny backbone, an AIM module over it, a demo pool and a query, built once per variant and run."""

    def __init__(self, ctx: Context, variant: str) -> None:
        from mmict.backbones import load_backbone

        spec = VARIANTS[variant]
        folder = build_tiny(ctx.workdir / "models" / variant, variant)
        self.attach(ctx, load_backbone(spec["family"], str(folder)), variant, spec["family"],
                    spec.get("anyres", spec["image_size"]))

    def attach(self, ctx: Context, backbone: Any, variant: str, family: str, side: int) -> None:
        """An AIM module over `backbone`, random images of its processor's shapes for `side` x `side` pictures."""
        from PIL import Image as PILImage

        from mmict.config import load_config
        from mmict.methods.aim.module import AIMModule
        from mmict.segments import Image

        self.variant, self.family, self.backbone = variant, family, backbone
        cfg = load_config("toy_aim", [f"backbone.name_or_path={backbone.name_or_path}", "backbone.toy=null",
                                      f"backbone.family={family}"])
        self.module = AIMModule(cfg, backbone=self.backbone).eval()
        self.device = self.backbone.device
        template = self.backbone.image_transform(PILImage.new("RGB", (side, side), (120, 60, 30)))
        gen = torch.Generator().manual_seed(0)

        def image() -> Any:  # random pixels of the processor's shapes: the compute is what counts
            if isinstance(template, dict):
                return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                        for k, v in template.items()}
            return torch.randn(template.shape, generator=gen)

        self.image = image
        self.query_image = image()
        self.pool: list[tuple[str, Any, str]] = []  # (id, image, text)
        self.bank = None
        self.image_tokens = int(self.backbone.assemble([[Image(self.query_image)]], add_bos=False).context_tokens)
        self.demo_text_tokens = len(self.backbone.tokenize([DEMO_TEXT])[0])

    def ensure_pool(self, n: int) -> None:
        while len(self.pool) < n:
            self.pool.append((f"demo-{len(self.pool)}", self.image(), DEMO_TEXT))

    def build_bank(self, root: Path, n: int) -> dict[str, float]:
        """The bank over the first `n` pool demos: build time, then a fresh bank's lazy load from disk."""
        self.ensure_pool(n)
        ids, images, texts = zip(*self.pool[:n])
        start = time.perf_counter()
        bank = self.module.attach_bank(root, progress=False)
        computed = bank.build(ids, images, texts)
        build_s = time.perf_counter() - start
        fresh = self.module.attach_bank(root, progress=False)  # a new process would start like this
        start = time.perf_counter()
        fresh.lookup(ids, images, texts)
        load_s = time.perf_counter() - start
        self.bank = fresh
        self.module.bank = None
        return {"demos": n, "computed": computed, "build_s": build_s, "reload_s": load_s,
                "build_ms_per_demo": 1000 * build_s / max(1, n), "reload_ms_per_demo": 1000 * load_s / max(1, n)}

    def batch(self, k: int, queries: int = 1) -> EpisodeBatch:
        """An evaluation batch (as `mmict.eval.loop.episode_batch` makes it): each query with the first k demos."""
        self.ensure_pool(k)
        demos = self.pool[:k]
        episode = {"demo_images": [d[1] for d in demos], "demo_texts": [d[2] for d in demos],
                   "query_image": self.query_image, "query_prompt": QUERY_PROMPT, "query_target": "a red circle"}
        return collate_episodes([episode] * queries, skipped={}, demo_ids=[d[0] for d in demos] * queries)

    def answer(self, batch: EpisodeBatch, mode: str, use_bank: bool, new_tokens: int = 4) -> int:
        """What evaluation does per batch of queries: prompts, left-padded assembly, greedy generation with the
        KV cache (a fixed number of new tokens, so every method decodes the same amount). Context tokens."""
        self.module.bank = self.bank if use_bank else None
        try:
            with torch.no_grad():
                prompts = self.module.batch_prompts(batch, demo_mode=mode, with_target=False)
                assembled = self.backbone.assemble(prompts, padding_side="left")
                self.backbone.generate_from(assembled, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            return int(assembled.context_tokens.max())
        finally:
            self.module.bank = None


def env(ctx: Context, variant: str) -> Env:
    """The variant's Env, shared by every benchmark of the run."""
    key = f"env:{variant}"
    if key not in ctx.shared:
        ctx.log(f"  building tiny {variant} ...")
        ctx.shared[key] = Env(ctx, variant)
    return ctx.shared[key]


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                budget_s: float | None = None) -> dict[str, list[float]]:
    """Time each call `repeats` times after one warm-up, round-robin (background load hits all alike). With
    `budget_s`, stop early once a round took longer than the budget (slow cases keep at least one repeat)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(repeats + 1):
        round_s = 0.0
        for name, fn in calls.items():
            t = timed(fn, device)
            round_s += t
            if rep > 0:
                times[name].append(t)
        if rep > 0 and budget_s is not None and round_s * (repeats - rep) > budget_s:
            break
    return times
