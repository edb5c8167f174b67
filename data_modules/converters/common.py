"""What every converter shares: the registry, the shard sink, image members, and the run summary.

A converter reads one dataset in its own public file layout and yields webdataset samples (dicts with
``__key__``, ``json`` and image members). It never writes files itself: `convert` owns the output, so
every converter gets the same progress bar, the same refusal to overwrite, the same summary of what was
written and what was skipped (and why), and a ``<split>.summary.json`` next to the shards.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

Sample = dict[str, Any]

# Formats PIL may report -> the member extension webdataset's decoders and our readers know.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ConvertError(ValueError):
    """A user error in a conversion (missing input file, wrong split, existing output): one clear message."""


@dataclass
class ConvertOptions:
    """The command-line options of `mmict data convert`; each converter reads the ones it needs."""

    src: Path  # --in: the dataset's folder (or file) in its public layout
    split: str | None = None  # --split: which of the dataset's own splits to read
    images: Path | None = None  # --images: image (or video) folder when it is not where the layout puts it
    frames: int = 8  # --frames: frames sampled uniformly per video clip
    url_map: Path | None = None  # --url-map: OBELICS image url -> local file (tsv/csv/jsonl)
    limit: int | None = None  # --limit: stop after this many written samples (a quick look)
    extra: dict[str, str] = field(default_factory=dict)  # --set key=value: converter-specific options


class Context:
    """Handed to a converter: its options, skip counting, and the progress bar's total."""

    def __init__(self, options: ConvertOptions, bar: tqdm | None = None) -> None:
        self.options = options
        self.skipped: Counter[str] = Counter()
        self._bar = bar

    def skip(self, reason: str, n: int = 1) -> None:
        """Count ``n`` source records that are not written, under a short readable reason."""
        self.skipped[reason] += n

    def total(self, n: int) -> None:
        """The number of source records the converter will go through (for the progress bar)."""
        if self._bar is not None:
            self._bar.total = n
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        """One more source record processed (written or skipped)."""
        if self._bar is not None:
            self._bar.update(n)


Reader = Callable[[Context], Iterable[Sample]]


@dataclass(frozen=True)
class Converter:
    name: str  # `mmict data convert <name>`; for a downstream task also its TASK_DIRS key
    kind: str  # web | image | video
    read: Reader
    layout: str  # the public layout it expects, shown by `mmict data convert --help` and in errors
    splits: tuple[str, ...] = ()  # the dataset's own split names (--split); empty: it has none


CONVERTERS: dict[str, Converter] = {}


def register(name: str, kind: str, layout: str, splits: tuple[str, ...] = ()) -> Callable[[Reader], Reader]:
    """Decorator: make ``read(ctx)`` the converter ``name``."""

    def wrap(read: Reader) -> Reader:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} registered twice")
        CONVERTERS[name] = Converter(name=name, kind=kind, read=read, layout=layout, splits=splits)
        return read

    return wrap


# ---------------------------------------------------------------------------------------------------
# Helpers for converters


def require_file(path: Path, what: str, layout: str) -> Path:
    """``path`` if it exists, else a ConvertError naming it and the expected layout."""
    if not path.exists():
        raise ConvertError(f"{what} not found: {path}\nexpected layout:\n{layout}")
    return path


def image_member(data: bytes) -> tuple[str, bytes]:
    """Image bytes -> (member extension, bytes to store). Raises ValueError if they do not decode.

    JPEG/PNG/WEBP are stored as they are (no re-encoding loss); anything else PIL reads (GIF, BMP, TIFF)
    is re-encoded as PNG so every reader downstream can decode it.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.load()  # the full decode: a truncated file fails here, not at training time
            if fmt in IMAGE_EXTENSIONS:
                return IMAGE_EXTENSIONS[fmt], data
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return "png", out.getvalue()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad bytes
        raise ValueError(f"image does not decode: {err}") from err


def read_image_file(path: Path, ctx: Context) -> tuple[str, bytes] | None:
    """An image file as (extension, bytes); None (counted as a skip) when missing or undecodable."""
    if not path.is_file():
        ctx.skip("missing image")
        return None
    try:
        return image_member(path.read_bytes())
    except ValueError:
        ctx.skip("image does not decode")
        return None


def example_sample(key: str, meta: dict[str, Any], image: tuple[str, bytes]) -> Sample:
    """A downstream sample: ``json`` metadata + one image member."""
    ext, data = image
    return {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"), ext: data}


def safe_key(text: str) -> str:
    """A webdataset key: no dots (webdataset splits keys from extensions at the first dot) or slashes."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


# ---------------------------------------------------------------------------------------------------
# Driver


@dataclass
class Summary:
    dataset: str
    split: str | None
    source: str
    out: str
    written: int
    shards: list[str]
    skipped: dict[str, int]
    seconds: float
    options: dict[str, Any]

    def text(self) -> str:
        lines = [f"{self.dataset}{'/' + self.split if self.split else ''}: wrote {self.written} samples "
                 f"in {len(self.shards)} shards ({self.out}) in {self.seconds:.1f} s"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())}:")
            lines += [f"  {n:8d}  {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        else:
            lines.append("skipped: none")
        return "\n".join(lines)


def _existing_shards(pattern: str) -> list[Path]:
    """Files the output pattern would (re)write: ``dir/prefix-*.tar`` for ``dir/prefix-%06d.tar``."""
    path = Path(pattern)
    if "%" not in path.name:
        raise ConvertError(f"--out must hold a shard number, like shards/okvqa/test-%06d.tar (got {pattern})")
    prefix = path.name.split("%", 1)[0]
    return sorted(path.parent.glob(f"{prefix}*.tar"))


def summary_path(pattern: str) -> Path:
    """``shards/okvqa/test-%06d.tar`` -> ``shards/okvqa/test.summary.json``."""
    path = Path(pattern)
    return path.parent / (path.name.split("%", 1)[0].rstrip("-_.") + ".summary.json")


def convert(
    dataset: str, options: ConvertOptions, out: str, *, shard_size: int = 1000, force: bool = False,
    progress: bool = True,
) -> Summary:
    """Run converter ``dataset`` over ``options.src`` into shards ``out`` (a ``%06d`` pattern)."""
    if dataset not in CONVERTERS:
        from difflib import get_close_matches

        near = get_close_matches(dataset, CONVERTERS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConvertError(f"unknown dataset {dataset!r}{hint}; known: {', '.join(sorted(CONVERTERS))}")
    converter = CONVERTERS[dataset]
    if converter.splits and options.split not in converter.splits:
        raise ConvertError(f"{dataset} needs --split, one of: {', '.join(converter.splits)} (got {options.split!r})")
    if not options.src.exists():
        raise ConvertError(f"--in {options.src} does not exist\n{dataset} expects:\n{converter.layout}")
    existing = _existing_shards(out)
    if existing and not force:
        raise ConvertError(f"{len(existing)} shards already at {Path(out).parent} ({existing[0].name}, ...); "
                           "pass --force to replace them, or choose another --out")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for path in existing:  # replaced, said so: left over, they would mix an old conversion into the new one
        path.unlink()
    if existing:
        print(f"--force: removed {len(existing)} existing shards matching {out}")

    start = time.perf_counter()
    shards: list[str] = []
    written = 0
    with tqdm(desc=f"convert {dataset}", unit="rec", disable=not progress) as bar:
        ctx = Context(options, bar)
        writer = wds.ShardWriter(out, maxcount=shard_size, verbose=0, post=shards.append)
        try:
            for sample in converter.read(ctx):
                writer.write(sample)
                written += 1
                if options.limit is not None and written >= options.limit:
                    break
        finally:
            writer.close()
    summary = Summary(dataset=dataset, split=options.split, source=str(options.src), out=out, written=written,
                      shards=[Path(s).name for s in shards], skipped=dict(ctx.skipped),
                      seconds=time.perf_counter() - start,
                      options={k: str(v) for k, v in asdict(options).items() if v not in (None, {})})
    summary_path(out).write_text(json.dumps(asdict(summary), indent=2))
    if written == 0:
        raise ConvertError(f"{dataset}: no sample written\n{summary.text()}\nexpected layout:\n{converter.layout}")
    return summary


def iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a jsonl file (plain or .zip/.gz as MMC4 ships them), blank lines left out."""
    if path.suffix == ".gz":
        import gzip

        handle: Any = gzip.open(path, "rt", encoding="utf-8")
    elif path.suffix == ".zip":
        import zipfile

        archive = zipfile.ZipFile(path)
        names = [n for n in archive.namelist() if n.endswith(".jsonl")]
        if not names:
            raise ConvertError(f"{path} holds no .jsonl file")
        handle = io.TextIOWrapper(archive.open(names[0]), encoding="utf-8")
    else:
        handle = path.open(encoding="utf-8")
    with handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line
