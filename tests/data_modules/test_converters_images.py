"""Converters of image downstream sets (VQA, captions, Hateful Memes), read back by `load_examples`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from data_modules import drain_skips, load_examples
from data_modules.converters import ConvertError, ConvertOptions, Summary, convert
from data_modules.downstream import Example
from mmict.eval.tasks import get_task

RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}
ANSWERS = ["race"] * 6 + ["motocross"] * 2 + ["ride"] * 2


@pytest.fixture(autouse=True)
def _clean_skips():
    drain_skips()
    yield
    drain_skips()


def _image(path: Path, colour: str, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), RGB[colour]).save(path)  # format from the suffix


def _broken(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def _colour(example: Example) -> str:
    mean = np.asarray(example.image, dtype=float).reshape(3, -1).mean(axis=1)
    return min(RGB, key=lambda name: float(np.sum((np.array(RGB[name]) - mean) ** 2)))


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _convert(task: str, tmp_path: Path, **options) -> tuple[Summary, list[Example]]:
    """Convert into ``shards/<task folder>/<split>-*.tar`` and read the examples back."""
    split = options.get("split") or "train"
    out = tmp_path / "shards" / get_task(task).folder / f"{split}-%06d.tar"
    summary = convert(task, ConvertOptions(**options), str(out), progress=False)
    examples = load_examples(sorted(str(p) for p in out.parent.glob(f"{split}-*.tar")), pil_to_tensor)
    assert drain_skips() == {}  # everything written reads back
    assert {e.task for e in examples} == {task}
    return summary, examples


# ---------------------------------------------------------------------------------------------------
# OK-VQA, VQAv2


def _coco_vqa(root: Path, prefix: str, split: str, questions: str = "", annotations: str = "",
              images: str = "") -> None:
    """Four questions on COCO images: a good one, a missing image, a broken image, no annotation.

    ``questions``/``annotations``/``images``: their folders under ``root`` (flat by default; the VQA API
    tree puts them in Questions/, Annotations/ and Images/mscoco/).
    """
    questions_dir, annotations_dir, images_dir = questions, annotations, images
    question_list = [{"image_id": 297147 + i, "question": f"question {i}?", "question_id": 2971470 + i}
                     for i in range(4)]
    annotation_list = [
        {"question_id": 2971470 + i, "image_id": 297147 + i, "question_type": "other", "answer_type": "other",
         "multiple_choice_answer": "race", "confidence": 2,
         "answers": [{"answer": a, "raw_answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                     for j, a in enumerate(ANSWERS)]}
        for i in range(3)
    ]
    _write_json(root / questions_dir / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json",
                {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "questions": question_list})
    _write_json(root / annotations_dir / f"{prefix}mscoco_{split}2014_annotations.json",
                {"info": {}, "annotations": annotation_list})
    _image(root / images_dir / f"{split}2014" / f"COCO_{split}2014_000000297147.jpg", "green")
    _broken(root / images_dir / f"{split}2014" / f"COCO_{split}2014_000000297149.jpg")


VQA_SKIPS = {"missing image": 1, "image does not decode": 1, "question has no annotation": 1}


def test_okvqa(tmp_path: Path) -> None:
    _coco_vqa(tmp_path / "okvqa", "", "val")
    summary, examples = _convert("okvqa", tmp_path, src=tmp_path / "okvqa", split="val")
    assert summary.written == 1 and summary.skipped == VQA_SKIPS
    (example,) = examples
    assert (example.id, example.question, example.answers) == ("2971470", "question 0?", ANSWERS)
    assert _colour(example) == "green"


def test_vqav2_keeps_answer_type_and_refuses_test(tmp_path: Path) -> None:
    _coco_vqa(tmp_path / "vqav2", "v2_", "train")
    summary, (example,) = _convert("vqav2", tmp_path, src=tmp_path / "vqav2", split="train")
    assert summary.skipped == VQA_SKIPS
    assert example.answers == ANSWERS and _colour(example) == "green"
    shard = next((tmp_path / "shards" / "vqav2").glob("train-*.tar"))
    meta = json.loads(next(iter(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())))["json"])
    assert meta == {"id": "2971470", "task": "vqav2", "question": "question 0?", "answers": ANSWERS,
                    "image_id": 297147, "question_id": 2971470, "answer_type": "other",
                    "multiple_choice_answer": "race", "question_type": "other"}
    with pytest.raises(ConvertError, match="not public"):
        convert("vqav2", ConvertOptions(src=tmp_path / "vqav2", split="test"), str(tmp_path / "t" / "t-%06d.tar"))


def test_missing_annotation_file_names_it_and_the_layout(tmp_path: Path) -> None:
    _coco_vqa(tmp_path / "okvqa", "", "val")
    (tmp_path / "okvqa" / "mscoco_val2014_annotations.json").unlink()
    with pytest.raises(ConvertError, match=r"(?s)mscoco_val2014_annotations\.json\nexpected layout"):
        convert("okvqa", ConvertOptions(src=tmp_path / "okvqa", split="val"), str(tmp_path / "o" / "val-%06d.tar"),
                progress=False)
    assert not list((tmp_path / "o").glob("*.tar"))  # nothing half written
    with pytest.raises(ConvertError, match="one of: train, val"):
        convert("okvqa", ConvertOptions(src=tmp_path / "okvqa", split="validation"), str(tmp_path / "o" / "t-%06d.tar"))


@pytest.mark.parametrize("task, prefix, other", [("okvqa", "", "v2_"), ("vqav2", "v2_", "")])
def test_vqa_api_tree(tmp_path: Path, task: str, prefix: str, other: str) -> None:
    """The official VQA API tree: Questions/, Annotations/, Images/mscoco/{split}2014/, holding the other
    version's files too (as it does when VQAv2 and OK-VQA / VQA v1 are unpacked in the same tree)."""
    root = tmp_path / "VQA"
    _coco_vqa(root, prefix, "val", questions="Questions", annotations="Annotations", images="Images/mscoco")
    _write_json(root / "Questions" / f"{other}OpenEnded_mscoco_val2014_questions.json",
                {"questions": [{"image_id": 297147, "question": "the other file's?", "question_id": 1}]})
    _write_json(root / "Annotations" / f"{other}mscoco_val2014_annotations.json",
                {"annotations": [{"question_id": 1, "answers": [{"answer": "no"}]}]})
    _image(root / "Images" / "mscoco" / "val2014" / "COCO_val2014_000000297150.jpg", "blue")
    _write_json(root / "Questions" / f"{prefix}OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 297147, "question": "question 0?", "question_id": 2971470},
        {"image_id": 297150, "question": "what colour?", "question_id": 2971500}]})
    annotations = json.loads((root / "Annotations" / f"{prefix}mscoco_val2014_annotations.json").read_text())
    annotations["annotations"].append({"question_id": 2971500, "answers": [{"answer": "blue"}] * 10})
    _write_json(root / "Annotations" / f"{prefix}mscoco_val2014_annotations.json", annotations)
    summary, examples = _convert(task, tmp_path, src=root, split="val")
    assert summary.skipped == {}
    assert [(e.id, e.question, e.answers, _colour(e)) for e in examples] == [
        ("2971470", "question 0?", ANSWERS, "green"), ("2971500", "what colour?", ["blue"] * 10, "blue")]


def test_okvqa_names_the_other_versions_file_and_refuses_vqa_v1(tmp_path: Path) -> None:
    _coco_vqa(tmp_path / "VQA", "v2_", "val", questions="Questions", annotations="Annotations",
              images="Images/mscoco")
    out = str(tmp_path / "o" / "val-%06d.tar")
    with pytest.raises(ConvertError, match=r"(?s)OpenEnded_mscoco_val2014_questions\.json\nexpected layout.*"
                                           r"found instead: Questions/v2_OpenEnded_mscoco_val2014_questions\.json"):
        convert("okvqa", ConvertOptions(src=tmp_path / "VQA", split="val"), out, progress=False)
    # VQA v1's files have OK-VQA's names: far more questions than OK-VQA's 5,046 (val) give them away.
    root = tmp_path / "v1"
    _coco_vqa(root, "", "val")
    _write_json(root / "OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 297147, "question": "q?", "question_id": 297147000 + i} for i in range(20_001)]})
    with pytest.raises(ConvertError, match="VQA v1"):
        convert("okvqa", ConvertOptions(src=root, split="val"), out, progress=False)


def test_vqa_without_an_image_folder_names_images_option(tmp_path: Path) -> None:
    _coco_vqa(tmp_path / "VQA", "v2_", "val", questions="Questions", annotations="Annotations", images="Images/x")
    with pytest.raises(ConvertError, match=r"(?s)no image folder found.*Images/mscoco/val2014.*--images DIR"):
        convert("vqav2", ConvertOptions(src=tmp_path / "VQA", split="val"), str(tmp_path / "o" / "val-%06d.tar"),
                progress=False)
    # --images reads them wherever they are.
    summary, (example,) = _convert("vqav2", tmp_path, src=tmp_path / "VQA", split="val",
                                   images=tmp_path / "VQA" / "Images" / "x" / "val2014")
    assert example.id == "2971470" and _colour(example) == "green"


# ---------------------------------------------------------------------------------------------------
# VizWiz, TextVQA


def _vizwiz_record(image: str, answers: list[str]) -> dict:
    return {"image": image, "question": f"what is {image}?", "answerable": 1, "answer_type": "other",
            "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}


@pytest.mark.parametrize("annotations", ["Annotations/val.json", "annotations/val.json", "val.json"])
def test_vizwiz(tmp_path: Path, annotations: str) -> None:
    root = tmp_path / "vizwiz"
    records = [_vizwiz_record("VizWiz_val_00000000.jpg", ["soup"] * 10),
               _vizwiz_record("VizWiz_val_00000001.jpg", []),
               _vizwiz_record("VizWiz_val_00000002.jpg", ["unanswerable"] * 10)]
    _write_json(root / annotations, records)
    _image(root / "val" / "VizWiz_val_00000000.jpg", "red")
    _image(root / "val" / "VizWiz_val_00000001.jpg", "red")
    _image(root / "val" / "VizWiz_val_00000002.jpg", "blue")
    summary, examples = _convert("vizwiz", tmp_path, src=root, split="val")
    assert summary.skipped == {"no answers": 1}
    assert [(e.id, e.answers[0], _colour(e)) for e in examples] == [
        ("VizWiz_val_00000000", "soup", "red"), ("VizWiz_val_00000002", "unanswerable", "blue")]
    assert examples[0].question == "what is VizWiz_val_00000000.jpg?"


def test_vizwiz_official_zips_unpacked(tmp_path: Path) -> None:
    """Annotations.zip, train.zip, val.zip, test.zip unpacked side by side: Annotations/{train,val,test}.json
    and the train/, val/, test/ image folders."""
    root = tmp_path / "vizwiz"
    _write_json(root / "Annotations" / "train.json", [_vizwiz_record("VizWiz_train_00000000.jpg", ["red"] * 10),
                                                      _vizwiz_record("VizWiz_train_00000001.jpg", ["blue"] * 9)])
    _write_json(root / "Annotations" / "val.json", [_vizwiz_record("VizWiz_val_00000000.jpg", ["green"] * 10)])
    _write_json(root / "Annotations" / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "what?"}])
    _image(root / "train" / "VizWiz_train_00000000.jpg", "red")
    _image(root / "train" / "VizWiz_train_00000001.jpg", "blue")
    _image(root / "val" / "VizWiz_val_00000000.jpg", "green")
    _image(root / "test" / "VizWiz_test_00000000.jpg", "yellow")
    summary, examples = _convert("vizwiz", tmp_path, src=root, split="train")
    assert summary.written == 2 and summary.skipped == {}
    assert [(e.id, e.question, e.answers, _colour(e)) for e in examples] == [
        ("VizWiz_train_00000000", "what is VizWiz_train_00000000.jpg?", ["red"] * 10, "red"),
        ("VizWiz_train_00000001", "what is VizWiz_train_00000001.jpg?", ["blue"] * 9, "blue")]
    _, (val,) = _convert("vizwiz", tmp_path, src=root, split="val")
    assert (val.id, val.answers, _colour(val)) == ("VizWiz_val_00000000", ["green"] * 10, "green")


def test_vizwiz_missing_annotations_names_every_place_looked(tmp_path: Path) -> None:
    (tmp_path / "vizwiz" / "val").mkdir(parents=True)
    with pytest.raises(ConvertError, match=r"neither .*Annotations/val\.json nor .*annotations/val\.json nor "
                                           r".*vizwiz/val\.json"):
        convert("vizwiz", ConvertOptions(src=tmp_path / "vizwiz", split="val"), str(tmp_path / "o" / "v-%06d.tar"),
                progress=False)


def test_vizwiz_test_split_has_no_answers(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="not public"):
        convert("vizwiz", ConvertOptions(src=tmp_path, split="test"), str(tmp_path / "o" / "test-%06d.tar"))


def test_textvqa_val_images_in_train_images(tmp_path: Path) -> None:
    root = tmp_path / "textvqa"
    data = [{"question": "what brand?", "image_id": "003a8ae2ef43b901", "question_id": 34602, "set_name": "val",
             "answers": ["nokia"] * 10, "image_classes": ["Vehicle"]},
            {"question": "what time?", "image_id": "00a5b4d2e7a4c5f0", "question_id": 34603, "answers": ["9"] * 10},
            {"question": "which?", "image_id": "0ab1", "question_id": 34604, "answers": "not a list"}]
    _write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": data})
    _image(root / "train_images" / "003a8ae2ef43b901.jpg", "yellow")
    _image(root / "train_images" / "0ab1.jpg", "yellow")
    summary, (example,) = _convert("textvqa", tmp_path, src=root, split="val")
    assert summary.skipped == {"missing image": 1, "no answers": 1}
    assert (example.id, example.question, example.answers, _colour(example)) == (
        "34602", "what brand?", ["nokia"] * 10, "yellow")


# ---------------------------------------------------------------------------------------------------
# Captions (Karpathy splits)


def _karpathy_image(filename: str, split: str, captions: list[str], **ids) -> dict:
    return {"filename": filename, "split": split, "sentids": [], **ids,
            "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": 0, "sentid": 0} for c in captions]}


def test_coco_caption_train_includes_restval(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    images = [
        _karpathy_image("COCO_train2014_000000000009.jpg", "train", ["A plate.", "Food on a plate."],
                        filepath="train2014", cocoid=9, imgid=0),
        _karpathy_image("COCO_val2014_000000000042.jpg", "restval", ["A dog."], filepath="val2014", cocoid=42,
                        imgid=1),
        _karpathy_image("COCO_val2014_000000000073.jpg", "test", ["A bike."], filepath="val2014", cocoid=73, imgid=2),
        _karpathy_image("COCO_val2014_000000000074.jpg", "train", [], filepath="val2014", cocoid=74, imgid=3),
        _karpathy_image("COCO_val2014_000000000075.jpg", "restval", ["Gone."], filepath="val2014", cocoid=75, imgid=4),
    ]
    _write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    _image(root / "train2014" / "COCO_train2014_000000000009.jpg", "red")
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg", "green")
    _image(root / "val2014" / "COCO_val2014_000000000073.jpg", "blue")
    _image(root / "val2014" / "COCO_val2014_000000000074.jpg", "blue")
    summary, examples = _convert("coco_caption", tmp_path, src=root, split="train")
    assert summary.skipped == {"no captions": 1, "missing image": 1}
    assert [(e.id, e.answers, _colour(e)) for e in examples] == [
        ("9", ["A plate.", "Food on a plate."], "red"), ("42", ["A dog."], "green")]
    _, (test,) = _convert("coco_caption", tmp_path, src=root / "dataset_coco.json", split="test")
    assert (test.id, test.answers, _colour(test)) == ("73", ["A bike."], "blue")


def test_flickr30k(tmp_path: Path) -> None:
    root = tmp_path / "flickr"
    images = [_karpathy_image("1000092795.jpg", "val", ["Two young guys.", "Two men."], imgid=0),
              _karpathy_image("10002456.jpg", "val", ["Workers."], imgid=1),
              _karpathy_image("1000268201.jpg", "train", ["A child."], imgid=2)]
    _write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    _image(root / "flickr30k-images" / "1000092795.jpg", "yellow")
    _broken(root / "flickr30k-images" / "10002456.jpg")
    summary, (example,) = _convert("flickr30k", tmp_path, src=root, split="val")
    assert summary.skipped == {"image does not decode": 1}
    assert (example.id, example.answers, _colour(example)) == ("1000092795", ["Two young guys.", "Two men."], "yellow")


# ---------------------------------------------------------------------------------------------------
# Hateful Memes


def _memes(root: Path, split: str, lines: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_hateful_memes(tmp_path: Path) -> None:
    root = tmp_path / "hateful_memes"
    _memes(root, "dev_seen", [
        json.dumps({"id": 8291, "img": "img/08291.png", "label": 1, "text": "white people is this a shooting range"}),
        json.dumps({"id": 46971, "img": "img/46971.png", "label": 0, "text": "bravery at its finest"}),
        json.dumps({"id": 3745, "img": "img/03745.png", "text": "no label here"}),
        json.dumps({"id": 1234, "img": "img/01234.png", "label": 0, "text": "image not there"}),
        '{"id": 99, "img": "img/00099.png", "lab',
    ])
    with (root / "dev_seen.jsonl").open("ab") as handle:
        handle.write(b'{"id": 7, "img": "img/00007.png", "label": 1, "text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    _image(root / "img" / "08291.png", "red")
    _image(root / "img" / "46971.png", "blue")
    _image(root / "img" / "03745.png", "blue")
    summary, examples = _convert("hateful_memes", tmp_path, src=root, split="dev_seen")
    assert summary.skipped == {"no label": 1, "missing image": 1, "json does not parse": 1, "line is not UTF-8": 1}
    assert [(e.id, e.question, e.label, e.answers, _colour(e)) for e in examples] == [
        ("8291", "white people is this a shooting range", 1, ["1"], "red"),
        ("46971", "bravery at its finest", 0, ["0"], "blue")]


def test_hateful_memes_unlabelled_split_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "hateful_memes"
    _memes(root, "test_unseen", [json.dumps({"id": 1, "img": "img/00001.png", "text": "a"})])
    _image(root / "img" / "00001.png", "red")
    with pytest.raises(ConvertError, match="no line has a label"):
        convert("hateful_memes", ConvertOptions(src=root, split="test_unseen"), str(tmp_path / "o" / "t-%06d.tar"),
                progress=False)
    assert not list((tmp_path / "o").glob("*.tar"))
    with pytest.raises(ConvertError, match="test_seen or test_unseen"):
        convert("hateful_memes", ConvertOptions(src=root, split="test"), str(tmp_path / "o" / "t-%06d.tar"))


def _phase1_memes(root: Path) -> Path:
    """The first release as its zip unpacks: data/ with train.jsonl, dev.jsonl, test.jsonl (no labels), img/."""
    data = root / "data"
    _memes(data, "train", [json.dumps({"id": 42953, "img": "img/42953.png", "label": 0, "text": "train meme"})])
    _memes(data, "dev", [json.dumps({"id": 8291, "img": "img/08291.png", "label": 1, "text": "dev meme one"}),
                         json.dumps({"id": 46971, "img": "img/46971.png", "label": 0, "text": "dev meme two"})])
    _memes(data, "test", [json.dumps({"id": 16395, "img": "img/16395.png", "text": "test meme"})])
    for name, colour in [("42953", "yellow"), ("08291", "red"), ("46971", "blue"), ("16395", "green")]:
        _image(data / "img" / f"{name}.png", colour)
    (data / "README.md").write_text("Hateful Memes\n")
    return data


@pytest.mark.parametrize("where", ["root", "data"])
def test_hateful_memes_first_release_dev(tmp_path: Path, where: str) -> None:
    data = _phase1_memes(tmp_path / "hateful_memes")
    src = data.parent if where == "root" else data  # --in the unzipped folder, or its data/ itself
    summary, examples = _convert("hateful_memes", tmp_path, src=src, split="dev")
    assert summary.written == 2 and summary.skipped == {}
    assert [(e.id, e.question, e.label, e.answers, _colour(e)) for e in examples] == [
        ("8291", "dev meme one", 1, ["1"], "red"), ("46971", "dev meme two", 0, ["0"], "blue")]
    _, (train,) = _convert("hateful_memes", tmp_path, src=src, split="train")
    assert (train.id, train.label, _colour(train)) == ("42953", 0, "yellow")


def test_hateful_memes_split_of_the_other_release_names_the_right_one(tmp_path: Path) -> None:
    first = _phase1_memes(tmp_path / "first").parent
    out = str(tmp_path / "o" / "t-%06d.tar")
    with pytest.raises(ConvertError, match="first release.*ask for --split dev$"):
        convert("hateful_memes", ConvertOptions(src=first, split="dev_seen"), out, progress=False)
    with pytest.raises(ConvertError, match="first release.*no labels.*--split dev"):
        convert("hateful_memes", ConvertOptions(src=first, split="test_unseen"), out, progress=False)
    with pytest.raises(ConvertError, match="no labels.*--split dev"):
        convert("hateful_memes", ConvertOptions(src=first, split="test"), out, progress=False)
    second = tmp_path / "second"
    for split in ("dev_seen", "dev_unseen"):
        _memes(second, split, [json.dumps({"id": 1, "img": "img/00001.png", "label": 0, "text": "a"})])
    with pytest.raises(ConvertError, match="second release.*ask for --split dev_seen or --split dev_unseen"):
        convert("hateful_memes", ConvertOptions(src=second, split="dev"), out, progress=False)
