"""Video converters: tiny MSVD / MSVD-QA / MSR-VTT / MSRVTT-QA layouts with videos written here by PyAV.

Every video frame is one flat colour from a palette spaced 85 apart per channel, so the colour of a frame
read back (after MPEG-4 and JPEG) names the source frame it came from.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_modules.converters import video
from data_modules.converters.common import CONVERTERS, ConvertError, ConvertOptions, convert

LEVELS = (0, 85, 170, 255)
PALETTE = np.array([(r, g, b) for r in LEVELS for g in LEVELS for b in LEVELS], dtype=np.int64)
SIZE = 32


def write_video(path: Path, colours: list[int], fmt: str | None = None) -> None:
    """A SIZE x SIZE MPEG-4 clip whose frame i is PALETTE[colours[i]]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for index in colours:
            pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
            pixels[:] = PALETTE[index]
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def colour_of(jpeg: bytes) -> int:
    """The palette index nearest to an image's mean colour."""
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    return int(np.argmin(((PALETTE - mean) ** 2).sum(1)))


def clip(start: int, length: int) -> list[int]:
    """``length`` distinct palette colours, neighbours far apart (step 7 is coprime with 64)."""
    return [(start + 7 * i) % len(PALETTE) for i in range(length)]


def expected(colours: list[int], n: int) -> list[int]:
    return [colours[int((i + 0.5) * len(colours) / n)] for i in range(n)]


def run(dataset: str, src: Path, out_root: Path, split: str, frames: int = 4, **kw):
    out = str(out_root / dataset / f"{split}-%06d.tar")
    options = ConvertOptions(src=src, split=split, frames=frames, **kw)
    return convert(dataset, options, out, progress=False), out_root / dataset


def read_samples(folder: Path, split: str) -> list[dict]:
    """Shard samples in order: {"key", "json", "frames": [bytes, ...]} (frame members sorted by name)."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {"key": key, "frames": {}})
                if ext == "json":
                    samples[key]["json"] = json.loads(data)
                else:
                    samples[key]["frames"][ext] = data
    for sample in samples.values():
        sample["frames"] = [sample["frames"][name] for name in sorted(sample["frames"])]
    return list(samples.values())


# MSVD: vid -> (clip, colours or "missing"/"corrupt")
MSVD_CLIPS = {
    1: ("aaa-x_1_10", clip(0, 20)),
    2: ("bbb_0_5", "missing"),
    3: ("fff_0_4", clip(5, 15)),
    1201: ("ccc_2_8", clip(11, 12)),
    1301: ("ddd_3_9", "corrupt"),
    1302: ("eee_4_7", clip(30, 3)),  # shorter than --frames 4
}


@pytest.fixture(scope="module")
def msvd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msvd")
    descriptions = ["# MSVD English descriptions", "# clip caption"]
    mapping = []
    for vid, (name, content) in MSVD_CLIPS.items():
        mapping.append(f"{name} vid{vid}")
        descriptions += [f"{name} a person does thing {vid}", f"{name} someone is doing thing {vid}"]
        if content == "corrupt":
            (root / "YouTubeClips").mkdir(exist_ok=True)
            (root / "YouTubeClips" / f"{name}.avi").write_bytes(b"\x00garbage, not a video" * 50)
        elif content != "missing":
            write_video(root / "YouTubeClips" / f"{name}.avi", content)
    descriptions.append("zzz_0_1 a clip the mapping does not know")
    (root / "AllVideoDescriptions.txt").write_text("\n".join(descriptions) + "\n")
    (root / "youtube_mapping.txt").write_text("\n".join(mapping) + "\n")
    # Questions out of video order: vid1, vid3, vid1 again, a missing video, an unknown video number.
    train_qa = [{"answer": "dog", "id": 10, "question": "what is shown?", "video_id": 1},
                {"answer": "cat", "id": 11, "question": "who runs?", "video_id": 3},
                {"answer": "run", "id": 12, "question": "what does it do?", "video_id": 1},
                {"answer": "man", "id": 13, "question": "who is there?", "video_id": 2},
                {"answer": "car", "id": 14, "question": "what drives?", "video_id": 99}]
    (root / "train_qa.json").write_text(json.dumps(train_qa))
    return root


MSRVTT_VIDEOS = {0: ("train", clip(1, 20)), 1: ("train", clip(2, 30)), 2: ("validate", clip(3, 12)),
                 3: ("test", clip(4, 16))}


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("msrvtt")
    infos: dict[str, dict] = {"train_val": {"videos": [], "sentences": []}, "test": {"videos": [], "sentences": []}}
    sen_id = 0
    for number, (split, colours) in MSRVTT_VIDEOS.items():
        info = infos["test" if split == "test" else "train_val"]
        info["videos"].append({"category": 1, "url": "https://example.invalid", "video_id": f"video{number}",
                               "start time": 0.0, "end time": 10.0, "split": split, "id": number})
        for k in range(3):
            info["sentences"].append({"caption": f"caption {k} of video {number}", "video_id": f"video{number}",
                                      "sen_id": sen_id})
            sen_id += 1
        folder = "TestVideo" if split == "test" else "TrainValVideo"
        write_video(root / folder / f"video{number}.mp4", colours)
    for name, info in infos.items():
        (root / f"{name}_videodatainfo.json").write_text(json.dumps(info))
    # MSRVTT-QA over the same videos (TrainValVideo/ + TestVideo/ layout): a test question per folder.
    test_qa = [{"answer": "red", "category_id": 2, "id": 7, "question": "what color?", "video_id": 3},
               {"answer": "blue", "category_id": 2, "id": 8, "question": "what color is it?", "video_id": 0},
               {"answer": "no", "category_id": 0, "id": 9, "question": "is it here?", "video_id": 42}]
    (root / "test_qa.json").write_text(json.dumps(test_qa))
    return root


# ---------------------------------------------------------------------------------------------------
# Frame sampling


def test_frame_indices_centre_of_segments_and_repeat_for_short_clips():
    assert video.frame_indices(20, 4) == [2, 7, 12, 17]
    assert video.frame_indices(3, 4) == [0, 1, 1, 2]
    assert video.frame_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        video.frame_indices(0, 4)


def test_sample_frames_with_and_without_a_stated_frame_count(tmp_path, monkeypatch):
    colours = clip(9, 17)
    write_video(tmp_path / "clip.mkv", colours)  # matroska states no frame count: counted by decoding
    assert video._header_frame_count(tmp_path / "clip.mkv") == 0
    assert [colour_of(f) for f in video.sample_frames(tmp_path / "clip.mkv", 5)] == expected(colours, 5)

    write_video(tmp_path / "clip.avi", colours)
    assert video._header_frame_count(tmp_path / "clip.avi") == 17
    assert [colour_of(f) for f in video.sample_frames(tmp_path / "clip.avi", 4)] == expected(colours, 4)
    # A header that states the wrong count: sampled again over the frames that really decode.
    monkeypatch.setattr(video, "_header_frame_count", lambda path: 40)
    assert [colour_of(f) for f in video.sample_frames(tmp_path / "clip.avi", 4)] == expected(colours, 4)


@pytest.mark.parametrize("data", [b"", b"\x00\x01 not a video at all" * 20])
def test_sample_frames_rejects_undecodable_files(tmp_path, data):
    (tmp_path / "bad.avi").write_bytes(data)
    with pytest.raises(ValueError):
        video.sample_frames(tmp_path / "bad.avi", 4)


# ---------------------------------------------------------------------------------------------------
# Converters


def test_registered_names_splits_and_layouts():
    for name, splits in [("msvd_caption", ("train", "val", "test")), ("msvd_qa", ("train", "val", "test")),
                         ("msrvtt_caption", ("train", "val", "test")), ("msrvtt_qa", ("train", "val", "test"))]:
        assert CONVERTERS[name].kind == "video"
        assert CONVERTERS[name].splits == splits
        assert CONVERTERS[name].layout.startswith("<in>/")


def test_msvd_caption_splits_frames_skips_and_read_back(msvd, tmp_path):
    from torchvision.transforms.functional import pil_to_tensor

    from data_modules.downstream import load_examples

    summary, folder = run("msvd_caption", msvd, tmp_path, "train")
    assert summary.written == 2
    assert summary.skipped == {"missing video": 1, "clip not in youtube_mapping.txt": 1}
    samples = read_samples(folder, "train")
    assert [s["key"] for s in samples] == ["vid1", "vid3"]
    assert samples[0]["json"] == {"id": "vid1", "task": "msvd_caption", "video_id": "vid1", "clip": "aaa-x_1_10",
                                  "captions": ["a person does thing 1", "someone is doing thing 1"]}
    for sample, vid in zip(samples, (1, 3), strict=True):
        assert len(sample["frames"]) == 4
        assert [colour_of(f) for f in sample["frames"]] == expected(MSVD_CLIPS[vid][1], 4)

    examples = load_examples(str(folder / "train-000000.tar"), pil_to_tensor)
    assert [e.id for e in examples] == ["vid1", "vid3"]
    assert isinstance(examples[0].image, list) and len(examples[0].image) == 4
    assert all(tuple(frame.shape) == (3, SIZE, SIZE) for frame in examples[0].image)
    assert examples[0].answers == ["a person does thing 1", "someone is doing thing 1"]
    assert examples[0].task == "msvd_caption"

    summary, folder = run("msvd_caption", msvd, tmp_path, "val", frames=2)
    assert summary.written == 1
    assert [len(s["frames"]) for s in read_samples(folder, "val")] == [2]

    # test: vid1301 is garbage bytes, vid1302 has 3 frames for 4 asked (frame 1 repeats).
    summary, folder = run("msvd_caption", msvd, tmp_path, "test")
    assert summary.written == 1
    assert summary.skipped["video does not decode"] == 1
    (short,) = read_samples(folder, "test")
    assert short["json"]["id"] == "vid1302"
    assert [colour_of(f) for f in short["frames"]] == [MSVD_CLIPS[1302][1][i] for i in (0, 1, 1, 2)]


def test_msvd_qa_groups_questions_by_video_and_decodes_each_once(msvd, tmp_path, monkeypatch):
    decoded: list[str] = []
    real = video.sample_frames

    def counting(path, n):
        decoded.append(Path(path).name)
        return real(path, n)

    monkeypatch.setattr(video, "sample_frames", counting)
    summary, folder = run("msvd_qa", msvd, tmp_path, "train")
    assert sorted(decoded) == ["aaa-x_1_10.avi", "fff_0_4.avi"]
    assert summary.written == 3
    assert summary.skipped == {"missing video": 1, "video_id not in youtube_mapping.txt": 1}
    samples = read_samples(folder, "train")
    # Videos in order of first question, questions in file order within a video.
    assert [s["json"]["id"] for s in samples] == ["10", "12", "11"]
    assert samples[0]["json"] == {"id": "10", "task": "msvd_qa", "video_id": "vid1", "clip": "aaa-x_1_10",
                                  "question": "what is shown?", "answers": ["dog"]}
    assert [colour_of(f) for f in samples[2]["frames"]] == expected(MSVD_CLIPS[3][1], 4)
    assert samples[0]["frames"] == samples[1]["frames"]  # the same video's frames, once per question

    # --images replaces the video folder: here it holds only vid1's clip.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(msvd / "YouTubeClips" / "aaa-x_1_10.avi", elsewhere)
    summary, _ = run("msvd_qa", msvd, tmp_path / "other", "train", images=elsewhere)
    assert summary.written == 2
    assert summary.skipped["missing video"] == 2


def test_msrvtt_caption_splits(msrvtt, tmp_path):
    counts = {}
    for split in ("train", "val", "test"):
        summary, folder = run("msrvtt_caption", msrvtt, tmp_path, split)
        counts[split] = summary.written
        assert summary.skipped == {}
    assert counts == {"train": 2, "val": 1, "test": 1}
    samples = read_samples(tmp_path / "msrvtt_caption", "train")
    assert samples[1]["json"] == {"id": "video1", "task": "msrvtt_caption", "video_id": "video1",
                                  "captions": [f"caption {k} of video 1" for k in range(3)]}
    assert [colour_of(f) for f in samples[1]["frames"]] == expected(MSRVTT_VIDEOS[1][1], 4)


def test_msrvtt_qa_finds_videos_in_either_layout(msrvtt, tmp_path):
    summary, folder = run("msrvtt_qa", msrvtt, tmp_path, "test")
    assert summary.written == 2 and summary.skipped == {"missing video": 1}
    samples = read_samples(folder, "test")
    assert samples[0]["json"] == {"id": "7", "task": "msrvtt_qa", "video_id": "video3", "question": "what color?",
                                  "answers": ["red"], "category_id": 2}
    assert [colour_of(f) for f in samples[1]["frames"]] == expected(MSRVTT_VIDEOS[0][1], 4)

    # The MSRVTT-QA release's own layout: video/video<N>.mp4
    qa = tmp_path / "msrvtt_qa_release"
    (qa / "video").mkdir(parents=True)
    shutil.copy(msrvtt / "TestVideo" / "video3.mp4", qa / "video")
    shutil.copy(msrvtt / "test_qa.json", qa)
    summary, _ = run("msrvtt_qa", qa, tmp_path / "release", "test")
    assert summary.written == 1 and summary.skipped == {"missing video": 2}


def test_user_errors_name_the_file_and_the_layout(msvd, msrvtt, tmp_path):
    with pytest.raises(ConvertError, match=r"val_qa\.json(.|\n)*expected layout(.|\n)*youtube_mapping\.txt"):
        run("msvd_qa", msvd, tmp_path, "val")
    with pytest.raises(ConvertError, match=r"test_videodatainfo\.json(.|\n)*TrainValVideo"):
        run("msrvtt_caption", msvd, tmp_path, "test")
    with pytest.raises(ConvertError, match="--split"):
        run("msvd_caption", msvd, tmp_path, "validate")
    bare = tmp_path / "questions_only"
    bare.mkdir()
    shutil.copy(msrvtt / "test_qa.json", bare)
    with pytest.raises(ConvertError, match="no video folder"):
        run("msrvtt_qa", bare, tmp_path, "test")
    with pytest.raises(ConvertError, match="--frames"):
        run("msvd_caption", msvd, tmp_path, "train", frames=0)


def test_msvd_qa_release_names_videos_vid_n(msvd, tmp_path):
    """MSVD-QA as released: video/vid<N>.avi for question video_id N; youtube_mapping.txt not needed."""
    release = tmp_path / "MSVD-QA"
    (release / "video").mkdir(parents=True)
    for vid in (1, 3):  # vid2's video is missing, vid99 has none either
        shutil.copy(msvd / "YouTubeClips" / f"{MSVD_CLIPS[vid][0]}.avi", release / "video" / f"vid{vid}.avi")
    shutil.copy(msvd / "train_qa.json", release)
    summary, folder = run("msvd_qa", release, tmp_path / "out", "train")
    assert summary.written == 3 and summary.skipped == {"missing video": 2}
    samples = read_samples(folder, "train")
    assert [s["json"]["id"] for s in samples] == ["10", "12", "11"]
    assert samples[0]["json"] == {"id": "10", "task": "msvd_qa", "video_id": "vid1", "question": "what is shown?",
                                  "answers": ["dog"]}
    assert samples[2]["json"]["question"] == "who runs?" and samples[2]["json"]["answers"] == ["cat"]
    assert [colour_of(f) for f in samples[0]["frames"]] == expected(MSVD_CLIPS[1][1], 4)
    assert [colour_of(f) for f in samples[2]["frames"]] == expected(MSVD_CLIPS[3][1], 4)

    # With the mapping file next to it, vid<N>.avi still reads, and the json names the clip.
    shutil.copy(msvd / "youtube_mapping.txt", release)
    summary, folder = run("msvd_qa", release, tmp_path / "mapped", "train")
    assert summary.written == 3
    assert summary.skipped == {"missing video": 1, "video_id not in youtube_mapping.txt": 1}
    assert read_samples(folder, "train")[0]["json"]["clip"] == "aaa-x_1_10"


def test_msvd_caption_reads_vid_n_videos(msvd, tmp_path):
    src = tmp_path / "msvd"
    (src / "video").mkdir(parents=True)
    for name in ("AllVideoDescriptions.txt", "youtube_mapping.txt"):
        shutil.copy(msvd / name, src)
    shutil.copy(msvd / "YouTubeClips" / "aaa-x_1_10.avi", src / "video" / "vid1.avi")
    summary, folder = run("msvd_caption", src, tmp_path / "out", "train")
    assert summary.written == 1 and summary.skipped["missing video"] == 2
    (sample,) = read_samples(folder, "train")
    assert sample["json"]["id"] == "vid1" and sample["json"]["clip"] == "aaa-x_1_10"
    assert [colour_of(f) for f in sample["frames"]] == expected(MSVD_CLIPS[1][1], 4)


def test_msvd_qa_clip_named_videos_without_mapping_name_the_file(msvd, tmp_path):
    src = tmp_path / "msvd_qa"
    src.mkdir()
    shutil.copy(msvd / "train_qa.json", src)
    shutil.copytree(msvd / "YouTubeClips", src / "YouTubeClips")
    with pytest.raises(ConvertError, match=r"no youtube_mapping\.txt.*no vid<N>\.avi"):
        run("msvd_qa", src, tmp_path, "train")
