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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

Sample = dict[str, Any]

# Formats PIL may report -> the member extension webdataset's decoders and our readers know.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# The jsonl files `iter_jsonl` reads: plain, gzipped, or one inside a zip (as MMC4 ships them).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zip")


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
    name: str  # `mmict data convert <name>`; a downstream task's converter has the task's name (mmict/eval/tasks.py)
    kind: str  # web | image | video
    read: Reader
    layout: str  # the public layout it expects, shown by `mmict data convert --help` and in errors
    splits: tuple[str, ...] = ()  # the dataset's own split names (--split); empty: it has none
    # Splits the dataset has but that cannot be converted -> why (e.g. "test": "no public answers").
    unavailable: Mapping[str, str] = field(default_factory=dict)


CONVERTERS: dict[str, Converter] = {}


def register(
    name: str, kind: str, layout: str, splits: tuple[str, ...] = (), unavailable: Mapping[str, str] | None = None,
) -> Callable[[Reader], Reader]:
    """Decorator: make ``read(ctx)`` the converter ``name``.

    ``unavailable`` names splits the dataset has but that cannot be converted, with the reason `convert`
    gives when one is asked for (a test split without public answers).
    """

    def wrap(read: Reader) -> Reader:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} registered twice")
        CONVERTERS[name] = Converter(name=name, kind=kind, read=read, layout=layout, splits=splits,
                                     unavailable=dict(unavailable or {}))
        return read

    return wrap


# ---------------------------------------------------------------------------------------------------
# Helpers for converters


def require_file(path: Path, what: str, layout: str) -> Path:
    """``path`` if it exists, else a ConvertError naming it and the expected layout."""
    if not path.exists():
        raise ConvertError(f"{what} not found: {path}\nexpected layout:\n{layout}")
    return path


def pyarrow_parquet(path: Path, instead: str = "") -> Any:
    """``pyarrow.parquet`` (a dependency of this package), or a ConvertError saying how to get it (and
    ``instead``: what to pass in place of the parquet file ``path``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # a broken or partial environment
        raise ConvertError(f"reading {path} (parquet) needs pyarrow, which is not importable here ({err}): "
                           f"pip install pyarrow (pinned in requirements/lock.txt){instead}") from err
    return pq


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


def read_image_file(path: Path, ctx: Context, missing: str = "missing image",
                    undecodable: str = "image does not decode") -> tuple[str, bytes] | None:
    """An image file as (extension, bytes); None, counted under ``missing`` or ``undecodable``, otherwise."""
    if not path.is_file():
        ctx.skip(missing)
        return None
    try:
        return image_member(path.read_bytes())
    except ValueError:
        ctx.skip(undecodable)
        return None


def extra_options(ctx: Context, choices: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """The converter's ``--set key=value`` options, each known key's first choice its default.

    An unknown key or value is a ConvertError: a misspelt option must not quietly convert with defaults.
    """
    given = ctx.options.extra
    unknown = sorted(set(given) - set(choices))
    if unknown:
        known = ", ".join(f"{k}={'|'.join(v)}" for k, v in choices.items()) or "none"
        raise ConvertError(f"unknown --set option(s) {', '.join(unknown)}; this converter takes: {known}")
    values = {key: given.get(key, allowed[0]) for key, allowed in choices.items()}
    for key, value in values.items():
        if value not in choices[key]:
            raise ConvertError(f"--set {key}={value}: expected one of {', '.join(choices[key])}")
    return values


def example_sample(key: str, meta: dict[str, Any], image: tuple[str, bytes]) -> Sample:
    """A downstream sample: ``json`` metadata + one image member."""
    ext, data = image
    return {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"), ext: data}


def each_sample(records: Iterable[Any], make: Callable[[Any], Sample | None], ctx: Context) -> Iterator[Sample]:
    """The samples ``make`` builds from ``records`` (None: skipped), advancing the progress once per record."""
    for record in records:
        sample = make(record)
        ctx.advance()
        if sample is not None:
            yield sample


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
    if options.split in converter.unavailable:
        raise ConvertError(f"{dataset} --split {options.split}: {converter.unavailable[options.split]}")
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

    import webdataset as wds  # here, not at the top: it imports torch, which `mmict data convert --help` needs not

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
        except BaseException:
            # A conversion that stopped half way leaves no shards behind: the next run would otherwise
            # refuse to overwrite them, or (with --force) a reader could take them for a whole split.
            writer.close()
            _remove(shards)
            raise
        writer.close()
    summary = Summary(dataset=dataset, split=options.split, source=str(options.src), out=out, written=written,
                      shards=[Path(s).name for s in shards], skipped=dict(ctx.skipped),
                      seconds=time.perf_counter() - start,
                      options={k: str(v) for k, v in asdict(options).items() if v not in (None, {})})
    summary_path(out).write_text(json.dumps(asdict(summary), indent=2))
    if written == 0:
        _remove(shards)  # the writer opened an (empty) first shard; the summary stays to say what was skipped
        raise ConvertError(f"{dataset}: no sample written\n{summary.text()}\nexpected layout:\n{converter.layout}")
    return summary


def _remove(shards: list[str]) -> None:
    for shard in shards:
        Path(shard).unlink(missing_ok=True)


def _jsonl_bytes(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a jsonl file, plain or .gz, or the .jsonl inside a .zip; blanks left out."""
    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rb") as handle:
            yield from ((n, line) for n, line in enumerate(handle, 1) if line.strip())
    elif path.suffix == ".zip":
        import zipfile

        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise ConvertError(f"{path} is not a readable zip file ({err})") from err
        with archive:
            names = [n for n in archive.namelist() if n.endswith(".jsonl")]
            if not names:
                raise ConvertError(f"{path} holds no .jsonl file")
            with archive.open(names[0]) as handle:
                yield from ((n, line) for n, line in enumerate(handle, 1) if line.strip())
    else:
        with path.open("rb") as handle:
            yield from ((n, line) for n, line in enumerate(handle, 1) if line.strip())


def iter_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a jsonl file (plain or .zip/.gz as MMC4 ships them), blank lines left out.

    A line that is not UTF-8 comes with U+FFFD in place of its bad bytes (one bad line must not end the
    file); `iter_json_lines` counts such a line as a skip instead.
    """
    for number, raw in _jsonl_bytes(path):
        yield number, raw.decode("utf-8", errors="replace")


def iter_json_lines(path: Path, ctx: Context) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of a jsonl file (as `iter_jsonl` reads it).

    A line that is not UTF-8 or does not parse is a source record that is not written: it is counted
    (``ctx.skip``) and advanced past here; the caller advances for each line it is given.
    """
    for number, raw in _jsonl_bytes(path):
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:  # before ValueError: it is one
            ctx.skip("line is not UTF-8")
            ctx.advance()
            continue
        except ValueError:
            ctx.skip("json does not parse")
            ctx.advance()
            continue
        yield number, value
