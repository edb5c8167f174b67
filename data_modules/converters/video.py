"""Video converters: MSVD and MSR-VTT captions, MSVD-QA and MSRVTT-QA, into downstream video shards.

Each sample holds ``--frames N`` frames sampled uniformly over its clip (`sample_frames`, decoded with PyAV)
as members ``frame_000.jpg``, ``frame_001.jpg``, ... and a ``json``:

- captions (``msvd_caption``, ``msrvtt_caption``): one sample per video,
  ``{id, task, video_id, captions: [...]}`` (MSVD also keeps the YouTube ``clip`` name);
- questions (``msvd_qa``, ``msrvtt_qa``): one sample per question,
  ``{id, task, video_id, question, answers: [answer]}`` (MSVD-QA also ``clip``, MSRVTT-QA ``category_id``).

``task`` is the converter's name, ``id`` a string, ``video_id`` the dataset's own video name (``vid1301``,
``video7010``), the same in the caption and the QA shards of a video. The public layouts read:

MSVD (Chen & Dolan 2011)::

    YouTubeClips/<clip>.avi          clip = <youtube id>_<start>_<end> (or vid<N>.avi; or in video/)
    AllVideoDescriptions.txt         "<clip> <caption>" per line, header lines start with '#'
    youtube_mapping.txt              "<clip> vid<N>" per line; split by N: train 1-1200, val 1201-1300,
                                     test 1301-1970

MSVD-QA (Xu et al. 2017): ``{train,val,test}_qa.json`` (``[{id, question, answer, video_id: N}]``),
videos in ``video/`` or ``YouTubeClips/``, named as the release names them, ``vid<N>.avi`` (question
``video_id`` N), or by YouTube clip (``<clip>.avi``) through ``youtube_mapping.txt``. Without the mapping
file the videos must be ``vid<N>.avi`` (and the json has no ``clip``).

MSR-VTT (Xu et al. 2016): ``train_val_videodatainfo.json`` (split "train" / "validate") and
``test_videodatainfo.json`` (split "test"), each ``{"videos": [{video_id, split, ...}], "sentences":
[{video_id, caption, sen_id}]}``; videos ``TrainValVideo/video<N>.mp4`` and ``TestVideo/video<N>.mp4``.

MSRVTT-QA (Xu et al. 2017): ``{train,val,test}_qa.json`` (``[{id, question, answer, video_id: N,
category_id}]``), videos in ``video/`` (or ``TrainValVideo/`` and ``TestVideo/``).

``--images DIR`` replaces the video folder(s) of any of them. A missing video is skipped as "missing
video", one that PyAV cannot decode as "video does not decode" (for QA: each of its questions counts).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av

from .common import Context, ConvertError, Sample, register, require_file, safe_key

JPEG_QUALITY = 90
# Frame members are sorted by name when read back (downstream._frame_keys): three digits keep that order.
MAX_FRAMES = 1000
MSVD_SPLITS = {"train": (1, 1200), "val": (1201, 1300), "test": (1301, 1970)}  # vid<N> ranges, inclusive
MSRVTT_SPLITS = {"train": "train", "val": "validate", "test": "test"}  # our split -> the json's "split"
QA_SPLITS = ("train", "val", "test")

MSVD_LAYOUT = """\
<in>/
    YouTubeClips/<clip>.avi        clip = <youtube id>_<start>_<end>; or vid<N>.avi; or in video/
                                     (--images DIR: the videos there)
    AllVideoDescriptions.txt       "<clip> <caption>" per line; lines starting with # are a header
    youtube_mapping.txt            "<clip> vid<N>" per line; by N: train 1-1200, val 1201-1300, test 1301-1970"""

MSVD_QA_LAYOUT = """\
<in>/
    {train,val,test}_qa.json       [{"id", "question", "answer", "video_id": N}, ...]
    video/vid<N>.avi               as released: question video_id N -> vid<N>.avi (or YouTubeClips/;
                                     --images DIR: the videos there)
    youtube_mapping.txt            "<clip> vid<N>" per line: needed only for videos named <clip>.avi"""

MSRVTT_LAYOUT = """\
<in>/
    train_val_videodatainfo.json   {"videos": [{"video_id": "video0", "split": "train"|"validate", ...}],
                                    "sentences": [{"video_id", "caption", "sen_id"}, ...]}
    test_videodatainfo.json        the same, split "test"
    TrainValVideo/video<N>.mp4     train and val videos  (--images DIR: video<N>.mp4 there)
    TestVideo/video<N>.mp4         test videos"""

MSRVTT_QA_LAYOUT = """\
<in>/
    {train,val,test}_qa.json       [{"id", "question", "answer", "video_id": N, "category_id"}, ...]
    video/video<N>.mp4             or TrainValVideo/ and TestVideo/  (--images DIR: video<N>.mp4 there)"""


# ---------------------------------------------------------------------------------------------------
# Frame sampling


def frame_indices(total: int, n: int) -> list[int]:
    """The ``n`` frames kept of ``total``: the centre of each of ``n`` equal segments of the clip.

    With fewer frames than ``n`` some indices repeat (3 frames, n=4 -> 0, 1, 1, 2), so every sample has
    exactly ``n`` frames.
    """
    if total < 1 or n < 1:
        raise ValueError(f"frame_indices needs total >= 1 and n >= 1 (got total={total}, n={n})")
    return [int((i + 0.5) * total / n) for i in range(n)]


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise ValueError(f"{path} has no video stream")
    return container.streams.video[0]


def _header_frame_count(path: Path) -> int:
    """The frame count the container states (0 when it does not: mkv, mpeg-ts, some avi)."""
    with av.open(str(path)) as container:
        return int(_video_stream(container, path).frames or 0)


def _jpeg(frame: av.VideoFrame) -> bytes:
    out = io.BytesIO()
    frame.to_image().save(out, format="JPEG", quality=JPEG_QUALITY)  # to_image(): RGB, whatever the pix_fmt
    return out.getvalue()


def _decode_pass(path: Path, wanted: set[int]) -> tuple[dict[int, bytes], int]:
    """One sequential decode of the whole clip: the ``wanted`` frames as JPEG, and how many frames decoded.

    Clips are short (MSVD ~10 s, MSR-VTT 10-30 s), so a full pass costs little and, unlike seeking, lands
    on exact frames whatever the codec's keyframe spacing.
    """
    picked: dict[int, bytes] = {}
    count = 0
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame threads: same frames, decoded faster
        for frame in container.decode(stream):
            if count in wanted:
                picked[count] = _jpeg(frame)
            count += 1
    return picked, count


def sample_frames(path: Path | str, n: int) -> list[bytes]:
    """``n`` frames sampled uniformly over the video at ``path`` (`frame_indices`), as JPEG bytes.

    The frame count is the container's when it states one, else counted by decoding the clip once. A clip
    shorter than ``n`` frames repeats frames, so the result always has ``n``. Raises ValueError when the
    file does not decode (garbage, truncated, empty, no video stream).
    """
    path = Path(path)
    if n < 1:
        raise ValueError(f"need at least one frame (got n={n})")
    try:
        total = _header_frame_count(path)
        if total <= 0:  # the container does not say: count by decoding once
            total = _decode_pass(path, set())[1]
            if total == 0:
                raise ValueError(f"{path}: no video frames decode")
        wanted = frame_indices(total, n)
        picked, decoded = _decode_pass(path, set(wanted))
        if decoded != total:
            # The header's count was wrong (an mp4 edit list hides frames, an avi index lists dropped ones):
            # sample again over the frames that really decode, so the spacing stays uniform.
            if decoded == 0:
                raise ValueError(f"{path}: no video frames decode")
            wanted = frame_indices(decoded, n)
            picked, _ = _decode_pass(path, set(wanted))
    except av.FFmpegError as err:
        raise ValueError(f"video does not decode: {path}: {err}") from err
    return [picked[i] for i in wanted]


# ---------------------------------------------------------------------------------------------------
# Shared by the four converters


@dataclass
class _VideoGroup:
    """One video and the samples (key, json) that show it: decoded once for all of them."""

    video: Path | None  # None: not found
    items: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _frames_option(ctx: Context) -> int:
    n = ctx.options.frames
    if not 1 <= n <= MAX_FRAMES:
        raise ConvertError(f"--frames must be between 1 and {MAX_FRAMES} (got {n})")
    return n


def _check_split(ctx: Context, splits: Collection[str], name: str, layout: str) -> str:
    split = ctx.options.split
    if split not in splits:
        raise ConvertError(f"{name} needs --split, one of: {', '.join(splits)} (got {split!r})\n"
                           f"expected layout:\n{layout}")
    return split


def _video_dirs(ctx: Context, names: Iterable[str], layout: str) -> list[Path]:
    """Where videos are looked up: ``--images`` alone, else those of the layout's folders that exist.

    No video folder at all is a user error (a wrong --in), not thousands of "missing video" skips.
    """
    if ctx.options.images is not None:
        if not ctx.options.images.is_dir():
            raise ConvertError(f"--images {ctx.options.images} is not a folder")
        return [ctx.options.images]
    dirs = [ctx.options.src / name for name in names if (ctx.options.src / name).is_dir()]
    if not dirs:
        looked = ", ".join(str(ctx.options.src / name) for name in names)
        raise ConvertError(f"no video folder found (looked for {looked}); pass --images DIR if the videos are "
                           f"elsewhere\nexpected layout:\n{layout}")
    return dirs


def _find_video(dirs: list[Path], filenames: str | tuple[str, ...]) -> Path | None:
    """The first of ``filenames`` found in one of ``dirs`` (MSR-VTT keeps train/val and test videos apart;
    an MSVD video is ``<clip>.avi`` or ``vid<N>.avi`` depending on where it comes from)."""
    for filename in (filenames,) if isinstance(filenames, str) else filenames:
        for folder in dirs:
            if (folder / filename).is_file():
                return folder / filename
    return None


def _load_json(path: Path, what: str, layout: str) -> Any:
    require_file(path, what, layout)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConvertError(f"{what} {path} is not valid JSON ({err})\nexpected layout:\n{layout}") from err


def _read_lines(path: Path, what: str, layout: str) -> list[str]:
    require_file(path, what, layout)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConvertError(f"{what} {path} is not UTF-8 text ({err})") from err


def _video_sample(key: str, meta: dict[str, Any], frames: list[bytes]) -> Sample:
    sample: Sample = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    sample.update({f"frame_{i:03d}.jpg": data for i, data in enumerate(frames)})
    return sample


def _emit(ctx: Context, groups: list[_VideoGroup]) -> Iterator[Sample]:
    """Decode each group's video once and yield one sample per item; skips count every item they drop."""
    n = _frames_option(ctx)
    ctx.total(sum(len(group.items) for group in groups))
    for group in groups:
        if group.video is None:
            ctx.skip("missing video", len(group.items))
            ctx.advance(len(group.items))
            continue
        try:
            frames = sample_frames(group.video, n)
        except ValueError:
            ctx.skip("video does not decode", len(group.items))
            ctx.advance(len(group.items))
            continue
        for key, meta in group.items:
            yield _video_sample(key, meta, frames)
            ctx.advance()


def _group_by_video(items: Iterable[tuple[str, str | tuple[str, ...], tuple[str, dict[str, Any]]]],
                    dirs: list[Path]) -> list[_VideoGroup]:
    """(video name, file name(s), (key, json)) -> groups in order of each video's first appearance.

    QA files are not sorted by video and many questions share one: grouping first decodes each video
    exactly once whatever the order, holding one video's frames at a time, where an LRU cache would
    decode a video again once it fell out. The order stays deterministic: videos by first question,
    questions in file order within a video.
    """
    groups: dict[str, _VideoGroup] = {}
    for name, filenames, item in items:
        if name not in groups:
            groups[name] = _VideoGroup(_find_video(dirs, filenames))
        groups[name].items.append(item)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------
# MSVD


def _msvd_files(vid: int, clip: str | None) -> tuple[str, ...]:
    """The names an MSVD video may have: its YouTube clip's (MSVD's own) or ``vid<N>.avi`` (MSVD-QA's)."""
    return (f"{clip}.avi", f"vid{vid}.avi") if clip else (f"vid{vid}.avi",)


def _msvd_mapping(src: Path, layout: str) -> dict[int, str]:
    """youtube_mapping.txt -> {N: clip} for lines "<clip> vid<N>"."""
    path = src / "youtube_mapping.txt"
    mapping: dict[int, str] = {}
    for number, line in enumerate(_read_lines(path, "MSVD clip mapping", layout), 1):
        if not line.strip():
            continue
        parts = line.split()
        match = re.fullmatch(r"vid(\d+)", parts[-1]) if len(parts) == 2 else None
        if match is None:
            raise ConvertError(f"{path}:{number}: expected '<clip> vid<N>', got {line!r}\nexpected layout:\n{layout}")
        mapping[int(match.group(1))] = parts[0]
    return mapping


def _msvd_captions(src: Path, layout: str, ctx: Context) -> dict[str, list[str]]:
    """AllVideoDescriptions.txt -> {clip: [caption, ...]} in file order."""
    captions: dict[str, list[str]] = {}
    for line in _read_lines(src / "AllVideoDescriptions.txt", "MSVD descriptions", layout):
        if not line.strip() or line.startswith("#"):
            continue
        clip, _, caption = line.strip().partition(" ")
        if not caption.strip():
            ctx.skip("empty caption")
            continue
        captions.setdefault(clip, []).append(caption.strip())
    return captions


@register("msvd_caption", "video", MSVD_LAYOUT, tuple(MSVD_SPLITS))
def read_msvd_caption(ctx: Context) -> Iterator[Sample]:
    split = _check_split(ctx, MSVD_SPLITS, "msvd_caption", MSVD_LAYOUT)
    src = ctx.options.src
    mapping = _msvd_mapping(src, MSVD_LAYOUT)
    captions = _msvd_captions(src, MSVD_LAYOUT, ctx)
    dirs = _video_dirs(ctx, ["YouTubeClips", "video"], MSVD_LAYOUT)
    unmapped = set(captions) - set(mapping.values())
    if unmapped:  # in no split: said in the summary rather than dropped unseen
        ctx.skip("clip not in youtube_mapping.txt", len(unmapped))
    low, high = MSVD_SPLITS[split]
    groups = []
    for vid in sorted(n for n in mapping if low <= n <= high):
        clip = mapping[vid]
        if clip not in captions:
            ctx.skip("no captions")
            continue
        meta = {"id": f"vid{vid}", "task": "msvd_caption", "video_id": f"vid{vid}", "clip": clip,
                "captions": captions[clip]}
        groups.append(_VideoGroup(_find_video(dirs, _msvd_files(vid, clip)), [(safe_key(f"vid{vid}"), meta)]))
    yield from _emit(ctx, groups)


def _qa_records(path: Path, what: str, layout: str) -> list[Any]:
    records = _load_json(path, what, layout)
    if not isinstance(records, list):
        raise ConvertError(f"{path}: expected a list of questions\nexpected layout:\n{layout}")
    return records


def _qa_fields(record: Any) -> tuple[str, str, str, int] | None:
    """(id, question, answer, video number) of a QA record, None when malformed."""
    if not isinstance(record, dict):
        return None
    try:
        qid, question, answer, video = record["id"], record["question"], record["answer"], record["video_id"]
    except KeyError:
        return None
    if not isinstance(question, str) or not isinstance(answer, str) or isinstance(video, bool):
        return None
    try:
        return str(qid), question, answer, int(video)
    except (TypeError, ValueError):
        return None


# A QA record's video number -> (video_id, video file name(s), meta fields that follow video_id), or None.
_QaVideo = Callable[[int], tuple[str, str | tuple[str, ...], dict[str, Any]] | None]


def _qa_items(records: list[Any], task: str, video: _QaVideo, ctx: Context, *, no_video: str = "no video",
              keep: tuple[str, ...] = ()) -> list[tuple[str, str | tuple[str, ...], tuple[str, dict[str, Any]]]]:
    """(video_id, file name(s), (key, meta)) of each QA record, for `_group_by_video`; ``keep``: record fields
    copied after the answers. A malformed record, or one ``video`` finds none for (``no_video``), is skipped."""
    items = []
    for record in records:
        fields = _qa_fields(record)
        if fields is None:
            ctx.skip("malformed question")
            continue
        qid, question, answer, number = fields
        found = video(number)
        if found is None:
            ctx.skip(no_video)
            continue
        video_id, file_name, video_fields = found
        meta = {"id": qid, "task": task, "video_id": video_id, **video_fields, "question": question,
                "answers": [answer]}
        meta.update({key: record[key] for key in keep if key in record})
        items.append((video_id, file_name, (safe_key(qid), meta)))
    return items


@register("msvd_qa", "video", MSVD_QA_LAYOUT, QA_SPLITS)
def read_msvd_qa(ctx: Context) -> Iterator[Sample]:
    split = _check_split(ctx, QA_SPLITS, "msvd_qa", MSVD_QA_LAYOUT)
    src = ctx.options.src
    records = _qa_records(src / f"{split}_qa.json", f"MSVD-QA {split} questions", MSVD_QA_LAYOUT)
    dirs = _video_dirs(ctx, ["video", "YouTubeClips"], MSVD_QA_LAYOUT)
    if (src / "youtube_mapping.txt").is_file():
        mapping: dict[int, str] | None = _msvd_mapping(src, MSVD_QA_LAYOUT)
    elif any(_is_vid_file(path) for folder in dirs for path in folder.iterdir()):
        mapping = None  # the release's own naming, vid<N>.avi: no mapping needed
    else:
        raise ConvertError(f"msvd_qa: no youtube_mapping.txt in {src} and no vid<N>.avi video in "
                           f"{', '.join(map(str, dirs))}: videos named by YouTube clip (<clip>.avi) need the "
                           f"mapping file\nexpected layout:\n{MSVD_QA_LAYOUT}")

    def video_of(vid: int) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
        if mapping is None:
            return f"vid{vid}", _msvd_files(vid, None), {}
        if vid in mapping:
            return f"vid{vid}", _msvd_files(vid, mapping[vid]), {"clip": mapping[vid]}
        # Not in the mapping: still found when named vid<N>.avi, else skipped as unknown.
        return (f"vid{vid}", _msvd_files(vid, None), {}) if _find_video(dirs, f"vid{vid}.avi") else None

    items = _qa_items(records, "msvd_qa", video_of, ctx, no_video="video_id not in youtube_mapping.txt")
    yield from _emit(ctx, _group_by_video(items, dirs))


def _is_vid_file(path: Path) -> bool:
    return re.fullmatch(r"vid\d+\.avi", path.name) is not None


# ---------------------------------------------------------------------------------------------------
# MSR-VTT


@register("msrvtt_caption", "video", MSRVTT_LAYOUT, tuple(MSRVTT_SPLITS))
def read_msrvtt_caption(ctx: Context) -> Iterator[Sample]:
    split = _check_split(ctx, MSRVTT_SPLITS, "msrvtt_caption", MSRVTT_LAYOUT)
    src = ctx.options.src
    name = "test_videodatainfo.json" if split == "test" else "train_val_videodatainfo.json"
    info = _load_json(src / name, f"MSR-VTT annotations ({split})", MSRVTT_LAYOUT)
    if not isinstance(info, dict) or not isinstance(info.get("videos"), list) or \
            not isinstance(info.get("sentences"), list):
        raise ConvertError(f"{src / name}: expected {{'videos': [...], 'sentences': [...]}}\n"
                           f"expected layout:\n{MSRVTT_LAYOUT}")
    dirs = _video_dirs(ctx, ["TestVideo"] if split == "test" else ["TrainValVideo"], MSRVTT_LAYOUT)
    captions: dict[str, list[str]] = {}
    for sentence in info["sentences"]:
        if isinstance(sentence, dict) and isinstance(sentence.get("caption"), str) and sentence.get("video_id"):
            captions.setdefault(str(sentence["video_id"]), []).append(sentence["caption"].strip())
        else:
            ctx.skip("malformed sentence")
    groups = []
    for video in info["videos"]:
        if not isinstance(video, dict) or "video_id" not in video:
            ctx.skip("malformed video entry")
            continue
        if video.get("split") != MSRVTT_SPLITS[split]:
            continue
        video_id = str(video["video_id"])
        if video_id not in captions:
            ctx.skip("no captions")
            continue
        meta = {"id": video_id, "task": "msrvtt_caption", "video_id": video_id, "captions": captions[video_id]}
        groups.append(_VideoGroup(_find_video(dirs, f"{video_id}.mp4"), [(safe_key(video_id), meta)]))
    yield from _emit(ctx, groups)


@register("msrvtt_qa", "video", MSRVTT_QA_LAYOUT, QA_SPLITS)
def read_msrvtt_qa(ctx: Context) -> Iterator[Sample]:
    split = _check_split(ctx, QA_SPLITS, "msrvtt_qa", MSRVTT_QA_LAYOUT)
    src = ctx.options.src
    records = _qa_records(src / f"{split}_qa.json", f"MSRVTT-QA {split} questions", MSRVTT_QA_LAYOUT)
    dirs = _video_dirs(ctx, ["video", "TrainValVideo", "TestVideo"], MSRVTT_QA_LAYOUT)
    items = _qa_items(records, "msrvtt_qa", lambda number: (f"video{number}", f"video{number}.mp4", {}), ctx,
                      keep=("category_id",))
    yield from _emit(ctx, _group_by_video(items, dirs))
