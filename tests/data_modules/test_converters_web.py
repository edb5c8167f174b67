"""Converters of web corpora (MMC4, OBELICS) into web shards, read back by the web-corpus data module."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from data_modules import WebCorpusDataModule, drain_skips
from data_modules.converters import ConvertError, ConvertOptions, convert
from data_modules.converters.common import summary_path
from data_modules.converters.web import obelics_pairs
from data_modules.web_documents import document_pairs
from mmict.cli import main as cli_main

RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20),
       "white": (245, 245, 245), "black": (10, 10, 10)}


@pytest.fixture(autouse=True)
def _clean_skips():
    drain_skips()
    yield
    drain_skips()


def _image(path: Path, colour: str, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), RGB[colour]).save(path)  # format from the suffix: .jpg JPEG, .png PNG


def _colour(image: Image.Image | np.ndarray) -> str:
    """The named colour nearest to an image's mean (JPEG shifts colours a little)."""
    array = np.asarray(image, dtype=float)
    if array.shape[0] == 3:  # a CHW tensor's array
        array = array.transpose(1, 2, 0)
    mean = array.reshape(-1, 3).mean(axis=0)
    return min(RGB, key=lambda name: float(np.sum((np.array(RGB[name]) - mean) ** 2)))


def _samples(out_dir: Path) -> list[dict]:
    shards = sorted(str(p) for p in out_dir.glob("*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))


def _pairs(sample: dict) -> list[tuple[str, str]]:
    pairs = document_pairs(sample)
    assert pairs is not None
    return [(_colour(image), text) for image, text in pairs]


# ---------------------------------------------------------------------------------------------------
# MMC4


def _mmc4_doc(url: str, texts: list[str], images: list[dict], sim: list[list[float]]) -> dict:
    return {"url": url, "text_list": texts, "image_info": images, "similarity_matrix": sim}


def _info(name: str, index: int | None = None, sim: float | None = None) -> dict:
    info: dict = {"image_name": name, "raw_url": f"http://example.com/{name}", "face_detections": None}
    if index is not None:
        info["matched_text_index"], info["matched_sim"] = index, sim
    return info


@pytest.fixture()
def mmc4(tmp_path: Path) -> tuple[Path, Path]:
    """A zipped MMC4 shard (as released) and its image folder, with good and bad documents."""
    images = tmp_path / "images"
    for name, colour in [("r.jpg", "red"), ("g.jpg", "green"), ("b.png", "blue"), ("y.png", "yellow"),
                         ("w.jpg", "white"), ("k.png", "black")]:
        _image(images / name, colour)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    docs = [
        # Out of text order, with their similarities: read back in text order.
        _mmc4_doc("http://a", ["t0", "t1", "t2"], [_info("r.jpg", 2, 0.31), _info("g.jpg", 0, 0.27),
                                                   _info("b.png", 1, 0.25)], [[0.1, 0.2, 0.31]] * 3),
        # No matched_text_index: the argmax of the image's similarity row, and that value.
        _mmc4_doc("http://b", ["u0", "u1"], [_info("y.png"), _info("w.jpg")], [[0.1, 0.3], [0.4, 0.2]]),
        # One missing and one undecodable image dropped; two pairs remain.
        _mmc4_doc("http://c", ["v0", "v1", "v2"], [_info("k.png", 0, 0.3), _info("gone.jpg", 1, 0.3),
                                                   _info("broken.jpg", 1, 0.3), _info("r.jpg", 2, 0.3)], []),
        # One usable pair left: skipped.
        _mmc4_doc("http://d", ["w0", "w1"], [_info("g.jpg", 0, 0.3), _info("gone.jpg", 1, 0.3)], []),
        # Matched to a text that is not there: that image goes, and with it the document.
        _mmc4_doc("http://e", ["x0"], [_info("g.jpg", 0, 0.3), _info("b.png", 5, 0.3)], []),
        {"url": "http://f", "image_info": []},  # no text_list
    ]
    lines = [json.dumps(doc) for doc in docs]
    lines.insert(3, '{"url": "http://broken", "text_list": [')  # a truncated line
    src = tmp_path / "mmc4"
    src.mkdir()
    with zipfile.ZipFile(src / "docs_shard_7_v2.jsonl.zip", "w") as archive:
        archive.writestr("docs_shard_7_v2.jsonl", "\n".join(lines) + "\n")
    return src, images


MMC4_SKIPS = {"image dropped: missing file": 2, "image dropped: does not decode": 1,
              "image dropped: matched to no text": 1, "fewer than 2 image-text pairs": 2,
              "json does not parse": 1, "malformed document": 1}


def test_mmc4_documents_in_text_order_with_bad_records_counted(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    src, images = mmc4
    out = tmp_path / "shards" / "web"
    summary = convert("mmc4", ConvertOptions(src=src, images=images), str(out / "train-%06d.tar"), progress=False)
    assert summary.written == 3
    assert summary.skipped == MMC4_SKIPS
    assert json.loads(summary_path(str(out / "train-%06d.tar")).read_text())["skipped"] == MMC4_SKIPS

    a, b, c = _samples(out)
    assert a["__key__"] == "docs_shard_7_v2-0000001"
    assert sorted(k for k in a if k.startswith("img_")) == ["img_0.jpg", "img_1.jpg", "img_2.png"]
    doc = json.loads(a["json"])
    assert doc["url"] == "http://a" and doc["text_list"] == ["t0", "t1", "t2"]
    assert doc["image_info"] == [{"image_name": "img_0.jpg", "matched_text_index": 2, "matched_sim": 0.31},
                                 {"image_name": "img_1.jpg", "matched_text_index": 0, "matched_sim": 0.27},
                                 {"image_name": "img_2.png", "matched_text_index": 1, "matched_sim": 0.25}]
    assert _pairs(a) == [("green", "t0"), ("blue", "t1"), ("red", "t2")]

    fallback = json.loads(b["json"])["image_info"]
    assert [(i["matched_text_index"], i["matched_sim"]) for i in fallback] == [(1, 0.3), (0, 0.4)]
    assert _pairs(b) == [("white", "u0"), ("yellow", "u1")]

    assert _pairs(c) == [("black", "v0"), ("red", "v2")]
    assert drain_skips() == {}  # every document the converter kept reads back whole


def test_mmc4_threshold_on_kept_similarity(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    src, images = mmc4
    out = tmp_path / "web"
    convert("mmc4", ConvertOptions(src=src, images=images), str(out / "train-%06d.tar"), progress=False)
    pairs = document_pairs(_samples(out)[0], min_similarity=0.26)
    assert pairs is not None and [text for _, text in pairs] == ["t0", "t2"]  # t1's image: 0.25 < 0.26


def test_mmc4_episodes_through_the_data_module(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    src, images = mmc4
    convert("mmc4", ConvertOptions(src=src, images=images), str(tmp_path / "web" / "val-%06d.tar"), progress=False)
    dm = WebCorpusDataModule(tmp_path, image_transform=pil_to_tensor, batch_size=1, max_shots=4)
    batches = list(dm.val_dataloader())
    assert [b.demo_texts + b.query_targets for b in batches] == [["t0", "t1", "t2"], ["u0", "u1"],
                                                                        ["v0", "v2"]]
    first = batches[0]
    assert [_colour(image.numpy()) for image in first.demo_images + first.query_images] == \
        ["green", "blue", "red"]


def test_mmc4_folder_of_shards_plain_and_zipped(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    src, images = mmc4
    doc = _mmc4_doc("http://p", ["p0", "p1"], [_info("r.jpg", 0, 0.3), _info("g.jpg", 1, 0.3)], [])
    (src / "docs_shard_8_v2.jsonl").write_text(json.dumps(doc) + "\n")
    (src / "README.txt").write_text("not a shard")
    out = tmp_path / "web"
    summary = convert("mmc4", ConvertOptions(src=src, images=images), str(out / "train-%06d.tar"), progress=False,
                      shard_size=2)
    assert summary.written == 4 and len(summary.shards) == 2
    assert [s["__key__"] for s in _samples(out)][-1] == "docs_shard_8_v2-0000001"


def test_mmc4_images_per_shard(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    src, images = mmc4
    (tmp_path / "by_shard").mkdir()
    images.rename(tmp_path / "by_shard" / "7")  # where download_images.py --input_shards puts shard 7's images
    options = ConvertOptions(src=src, images=tmp_path / "by_shard", extra={"images": "per_shard"})
    summary = convert("mmc4", options, str(tmp_path / "web" / "train-%06d.tar"), progress=False)
    assert summary.written == 3 and summary.skipped == MMC4_SKIPS


def test_mmc4_needs_images(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = mmc4
    with pytest.raises(ConvertError, match="--images"):
        convert("mmc4", ConvertOptions(src=src), str(tmp_path / "web" / "train-%06d.tar"), progress=False)
    assert not list((tmp_path / "web").glob("*.tar"))  # a failed conversion leaves no shard behind


def test_mmc4_folder_without_jsonl_names_the_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="expected layout"):
        convert("mmc4", ConvertOptions(src=tmp_path / "empty", images=tmp_path), str(tmp_path / "o" / "t-%06d.tar"),
                progress=False)


# ---------------------------------------------------------------------------------------------------
# OBELICS


def _row(images: list, texts: list, url: str) -> dict:
    return {"images": images, "texts": texts, "metadata": json.dumps([None] * len(images)),
            "general_metadata": json.dumps({"url": url, "warc_filename": "x.warc.gz"})}


OBELICS_ROWS = [
    _row([None, "https://cdn.x.org/a/red.jpg", None, "https://cdn.x.org/b/green.png?w=300", None],
         ["first", None, "second", None, "third"], "https://page/1"),
    # No text after the last image: it falls back to the previous text.
    _row(["https://cdn.x.org/blue.png", None, "https://cdn.x.org/yellow.jpg"], [None, "only", None], "https://page/2"),
    # A path instead of a url; a url whose file is not there.
    _row(["local/white.jpg", None, "https://cdn.x.org/nothere.jpg", None], [None, "w", None, "n"], "https://page/3"),
    _row(["https://cdn.x.org/red.jpg"], ["too", "long"], "https://page/4"),  # lists of unequal length
    _row([None, "https://cdn.x.org/black.png", None], ["k0", None, "k1"], "https://page/5"),  # one pair
]


@pytest.fixture()
def obelics_images(tmp_path: Path) -> Path:
    images = tmp_path / "obelics_images"
    for name, colour in [("red.jpg", "red"), ("green.png", "green"), ("blue.png", "blue"), ("yellow.jpg", "yellow"),
                         ("local/white.jpg", "white"), ("black.png", "black")]:
        _image(images / name, colour)
    return images


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups, read one by one
    return path


OBELICS_SKIPS = {"image dropped: missing file": 1, "fewer than 2 image-text pairs": 2, "malformed document": 1}


def test_obelics_parquet_pairs_with_next_text(obelics_images: Path, tmp_path: Path) -> None:
    src = _parquet(tmp_path / "obelics" / "train-00000-of-01335.parquet", OBELICS_ROWS)
    out = tmp_path / "web"
    summary = convert("obelics", ConvertOptions(src=src.parent, images=obelics_images), str(out / "train-%06d.tar"),
                      progress=False)
    assert summary.written == 2 and summary.skipped == OBELICS_SKIPS
    first, second = _samples(out)
    assert first["__key__"] == "train-00000-of-01335-0000001"
    doc = json.loads(first["json"])
    assert doc["url"] == "https://page/1" and doc["text_list"] == ["first", "second", "third"]
    assert doc["image_info"] == [{"image_name": "img_0.jpg", "matched_text_index": 1},
                                 {"image_name": "img_1.png", "matched_text_index": 2}]
    assert _pairs(first) == [("red", "second"), ("green", "third")]
    assert _pairs(second) == [("blue", "only"), ("yellow", "only")]


def test_obelics_jsonl_previous_text_and_url_map(obelics_images: Path, tmp_path: Path) -> None:
    src = tmp_path / "obelics.jsonl"
    src.write_text("\n".join(json.dumps(row) for row in OBELICS_ROWS[:3]) + "\n{not json\n")
    # The map sends the url that was missing to a file that is there.
    url_map = tmp_path / "map.tsv"
    url_map.write_text("url\tpath\textra\nhttps://cdn.x.org/nothere.jpg\tblack.png\t1\n"
                       "https://cdn.x.org/a/red.jpg\tred.jpg\t1\nhttps://cdn.x.org/b/green.png?w=300\tgreen.png\t1\n")
    out = tmp_path / "web"
    options = ConvertOptions(src=src, images=obelics_images, url_map=url_map, extra={"pair": "previous"})
    summary = convert("obelics", options, str(out / "train-%06d.tar"), progress=False)
    # Row 2's urls are not in the map: it keeps no image and is skipped.
    assert summary.skipped == {"image dropped: url not in --url-map": 2, "fewer than 2 image-text pairs": 1,
                               "json does not parse": 1}
    first, third = _samples(out)
    assert _pairs(first) == [("red", "first"), ("green", "second")]
    assert _pairs(third) == [("white", "w"), ("black", "w")]  # the first image has no previous text: the next


def test_obelics_pairing_rule() -> None:
    images = ["i0", None, "i2", "i3", None]
    texts = [None, "a", None, None, "b"]
    assert obelics_pairs(images, texts, "next") == (["a", "b"], [(0, 0), (2, 1), (3, 1)])
    assert obelics_pairs(images, texts, "previous") == (["a", "b"], [(0, 0), (2, 0), (3, 0)])
    assert obelics_pairs(["i"], [None], "next") == ([], [(0, None)])


def test_obelics_rejects_unknown_options(obelics_images: Path, tmp_path: Path) -> None:
    src = _parquet(tmp_path / "o.parquet", OBELICS_ROWS)
    for extra, message in [({"pair": "nearest"}, "next, previous"), ({"pairing": "next"}, "unknown --set")]:
        with pytest.raises(ConvertError, match=message):
            convert("obelics", ConvertOptions(src=src, images=obelics_images, extra=extra),
                    str(tmp_path / "web" / "train-%06d.tar"), progress=False)
    bad_map = tmp_path / "map.csv"
    bad_map.write_text("https://cdn.x.org/red.jpg,red.jpg\n")
    with pytest.raises(ConvertError, match="header"):
        convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=bad_map),
                str(tmp_path / "web" / "train-%06d.tar"), progress=False)


# ---------------------------------------------------------------------------------------------------
# OBELICS --url-map: img2dataset's own output, and files that are not text


def _img2dataset(out: Path, shards: dict[str, list[tuple[str, str | None]]], ext: str = "jpg") -> Path:
    """img2dataset --output_format files: <out>/<shard>.parquet (url, key, status, ...) and <out>/<shard>/<key>.<ext>
    (+ .txt/.json beside each image) for (url, colour or None = failed download) rows, keys as img2dataset makes
    them (shard number, then the row's number in it)."""
    for shard, rows in shards.items():
        records = []
        for i, (url, colour) in enumerate(rows):
            key = f"{shard}{i:04d}"
            ok = colour is not None
            records.append({"url": url, "key": key, "status": "success" if ok else "failed_to_download",
                            "error_message": None if ok else "HTTP Error 404: Not Found", "width": 12 if ok else None,
                            "height": 12 if ok else None, "caption": None, "sha256": None})
            if ok:
                _image(out / shard / f"{key}.{ext}", colour)
                (out / shard / f"{key}.json").write_text(json.dumps({"url": url, "key": key}))
                (out / shard / f"{key}.txt").write_text("")
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records), out / f"{shard}.parquet")
    (out / "00000_stats.json").write_text("{}")
    return out


I2D_SHARDS = {
    "00000": [("https://cdn.x.org/a/red.jpg", "red"), ("https://cdn.x.org/b/green.png?w=300", "green"),
              ("https://cdn.x.org/blue.png", None)],  # a failed download: not counted as a missing file
    "00001": [("https://cdn.x.org/blue.png", "blue"), ("https://cdn.x.org/yellow.jpg", "yellow")],
}


@pytest.mark.parametrize("which, ext", [("folder", "jpg"), ("folder", "webp"), ("file", "png")])
def test_obelics_url_map_from_img2dataset_output(obelics_images: Path, tmp_path: Path, which: str, ext: str) -> None:
    i2d = _img2dataset(tmp_path / "i2d", I2D_SHARDS, ext)
    url_map = i2d if which == "folder" else i2d / "00000.parquet"
    src = _parquet(tmp_path / "obelics" / "train-00000-of-01335.parquet", OBELICS_ROWS[:2])
    out = tmp_path / "web"
    # --images is not where img2dataset wrote: its files are found beside its parquet files.
    summary = convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=url_map),
                      str(out / "train-%06d.tar"), progress=False)
    samples = _samples(out)
    assert json.loads(samples[0]["json"])["url"] == "https://page/1"
    assert _pairs(samples[0]) == [("red", "second"), ("green", "third")]
    if which == "folder":  # both shards: the url that failed in 00000 was downloaded in 00001
        assert summary.written == 2 and summary.skipped == {}
        assert _pairs(samples[1]) == [("blue", "only"), ("yellow", "only")]
    else:  # 00000 only: blue failed there, yellow is not in it; document 2 keeps no pair
        assert summary.written == 1
        assert summary.skipped == {"image dropped: not downloaded (img2dataset status)": 1,
                                   "image dropped: url not in --url-map": 1, "fewer than 2 image-text pairs": 1}


def test_obelics_url_map_img2dataset_webdataset_output_names_the_fix(obelics_images: Path, tmp_path: Path) -> None:
    i2d = _img2dataset(tmp_path / "i2d", {"00000": I2D_SHARDS["00000"]})
    shutil.make_archive(str(i2d / "00000"), "tar", i2d / "00000")  # as --output_format webdataset leaves it
    shutil.rmtree(i2d / "00000")
    src = _parquet(tmp_path / "o.parquet", OBELICS_ROWS)
    with pytest.raises(ConvertError, match=r"00000\.tar.*mkdir .*00000 && tar -xf .*--output_format files"):
        convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=i2d / "00000.parquet"),
                str(tmp_path / "web" / "train-%06d.tar"), progress=False)


def test_obelics_url_map_parquet_by_content_and_binary_maps(obelics_images: Path, tmp_path: Path) -> None:
    src = _parquet(tmp_path / "o.parquet", OBELICS_ROWS[:1])
    out = str(tmp_path / "web" / "train-%06d.tar")
    # A url,path parquet whose name does not say so (its magic bytes do).
    url_map = tmp_path / "urls.map"
    pq.write_table(pa.table({"url": ["https://cdn.x.org/a/red.jpg", "https://cdn.x.org/b/green.png?w=300"],
                             "path": ["red.jpg", "green.png"]}), url_map)
    summary = convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=url_map), out,
                      progress=False)
    assert summary.written == 1
    assert _pairs(_samples(tmp_path / "web")[0]) == [("red", "second"), ("green", "third")]
    # Binary that is not parquet (a gzip given as a tsv): a clear error, not a UnicodeDecodeError.
    gz = tmp_path / "urls.tsv"
    gz.write_bytes(gzip.compress(b"url\tpath\n" * 100))
    with pytest.raises(ConvertError, match="not UTF-8 text.*parquet"):
        convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=gz), out, progress=False,
                force=True)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"link": ["x"], "file": ["y"]}), other)
    with pytest.raises(ConvertError, match=r"url and path columns.*\['file', 'link'\]"):
        convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=other), out, progress=False,
                force=True)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 and then nothing a parquet reader wants")
    with pytest.raises(ConvertError, match="not a readable parquet file"):
        convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=broken), out, progress=False,
                force=True)


def test_parquet_without_pyarrow_says_what_to_install(obelics_images: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url_map = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["https://cdn.x.org/a/red.jpg"], "path": ["red.jpg"]}), url_map)
    src = tmp_path / "o.jsonl"
    src.write_text(json.dumps(OBELICS_ROWS[0]) + "\n")
    rows = _parquet(tmp_path / "rows" / "train-00000-of-01335.parquet", OBELICS_ROWS[:1])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet -> ImportError
    with pytest.raises(ConvertError, match="urls.parquet.*pip install pyarrow.*tsv with a url,path header"):
        convert("obelics", ConvertOptions(src=src, images=obelics_images, url_map=url_map),
                str(tmp_path / "web" / "train-%06d.tar"), progress=False)
    with pytest.raises(ConvertError, match="train-00000-of-01335.parquet.*pip install pyarrow.*jsonl"):
        convert("obelics", ConvertOptions(src=rows.parent, images=obelics_images),
                str(tmp_path / "web" / "train-%06d.tar"), progress=False)


# ---------------------------------------------------------------------------------------------------
# The command line, overwriting, names


def test_cli_convert_refuses_to_overwrite_without_force(mmc4: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    src, images = mmc4
    out = tmp_path / "shards" / "mmc4" / "train-%06d.tar"
    argv = ["data", "convert", "mmc4", "--in", str(src), "--images", str(images), "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 samples" in printed and "fewer than 2 image-text pairs" in printed
    shards = sorted(out.parent.glob("*.tar"))
    assert len(shards) == 1

    assert cli_main(argv + ["--limit", "1"]) == 1
    assert "--force" in capsys.readouterr().err
    assert len(_samples(out.parent)) == 3  # untouched

    assert cli_main(argv + ["--limit", "1", "--force"]) == 0
    assert "removed 1 existing shards" in capsys.readouterr().out
    assert len(_samples(out.parent)) == 1


def test_unknown_dataset_suggests_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="did you mean 'obelics'"):
        convert("obelix", ConvertOptions(src=tmp_path), str(tmp_path / "o" / "t-%06d.tar"), progress=False)


def test_nothing_written_is_an_error_that_leaves_no_shard(mmc4: tuple[Path, Path], tmp_path: Path) -> None:
    _, images = mmc4
    src = tmp_path / "one.jsonl"
    src.write_text(json.dumps(_mmc4_doc("http://z", ["z0"], [_info("r.jpg", 0, 0.3)], [])) + "\n")
    out = tmp_path / "web" / "train-%06d.tar"
    with pytest.raises(ConvertError, match="(?s)no sample written.*fewer than 2 image-text pairs"):
        convert("mmc4", ConvertOptions(src=src, images=images), str(out), progress=False)
    assert not list(out.parent.glob("*.tar"))
    assert json.loads(summary_path(str(out)).read_text())["skipped"] == {"fewer than 2 image-text pairs": 1}
