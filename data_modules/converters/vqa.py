"""VQA-style sets -> downstream shards: OK-VQA, VQAv2, VizWiz, TextVQA, each in its released layout.

OK-VQA (``okvqa``) and VQAv2 (``vqav2``), COCO 2014 images, splits train and val::

    <in>/
        OpenEnded_mscoco_{split}2014_questions.json     VQAv2: v2_OpenEnded_mscoco_{split}2014_questions.json
        mscoco_{split}2014_annotations.json             VQAv2: v2_mscoco_{split}2014_annotations.json
        {split}2014/COCO_{split}2014_{image_id:012d}.jpg      (or --images DIR: DIR/COCO_...jpg)

VizWiz (``vizwiz``), splits train and val (test answers are not public)::

    <in>/
        annotations/{split}.json     (or {split}.json) [{"image", "question", "answers": [{"answer", ...}], ...}]
        {split}/VizWiz_{split}_00000000.jpg                   (or --images DIR: DIR/<image>)

TextVQA (``textvqa``) 0.5.1, splits train and val (val images are in train_images, as released)::

    <in>/
        TextVQA_0.5.1_{split}.json   {"data": [{"question", "image_id", "question_id", "answers": [str], ...}]}
        train_images/{image_id}.jpg                           (or --images DIR: DIR/{image_id}.jpg)

One sample per question: its image and a ``json`` such as::

    {"id": "2971475", "task": "okvqa", "question": "What sport can you use this for?",
     "answers": ["race", "race", "race", "race", "race", "race", "motocross", "motocross", "ride", "ride"],
     "image_id": 297147, "question_id": 2971475}

A question whose image is missing or does not decode, or that has no answers, is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import (
    Context,
    ConvertError,
    Sample,
    each_sample,
    example_sample,
    extra_options,
    read_image_file,
    register,
    require_file,
    safe_key,
)

SPLITS = ("train", "val")
NO_TEST = {"test": "the test split's answers are not public (it is scored on the EvalAI server)"}


def load_json(path: Path, what: str, layout: str) -> Any:
    """A released annotation file, parsed; a ConvertError naming it when it is missing or does not parse."""
    require_file(path, what, layout)
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConvertError(f"{what} {path} does not parse as json ({err})\nexpected layout:\n{layout}") from err


def _field(data: Any, key: str, path: Path, layout: str) -> list:
    """``data[key]``, a list; ConvertError when the file is not shaped so (a wrong file given)."""
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise ConvertError(f"{path}: expected a json object with a {key!r} list\nexpected layout:\n{layout}")
    return value


def _answer_strings(answers: Any) -> list[str]:
    """The ``answer`` strings of a VQA answers list (dicts) or the strings of a plain list."""
    if not isinstance(answers, list):
        return []
    values = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    return [v for v in values if isinstance(v, str)]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _vqa_sample(ctx: Context, id_: str, task: str, question: str, answers: Any, image_path: Path,
                fields: dict[str, Any]) -> Sample | None:
    """A question's sample (``fields`` follow the answers in its json); None, counted, without answers or image."""
    answer_strings = _answer_strings(answers)
    if not answer_strings:
        ctx.skip("no answers")
        return None
    image = read_image_file(image_path, ctx)
    if image is None:
        return None
    meta = {"id": id_, "task": task, "question": question, "answers": answer_strings, **fields}
    return example_sample(safe_key(id_), meta, image)


# ---------------------------------------------------------------------------------------------------
# OK-VQA, VQAv2: questions and annotations in two files, joined on question_id


def coco_vqa_layout(prefix: str) -> str:
    return f"""\
<in>/
    {prefix}OpenEnded_mscoco_{{split}}2014_questions.json   {{"questions": [{{image_id, question, question_id}}]}}
    {prefix}mscoco_{{split}}2014_annotations.json           {{"annotations": [{{question_id, answers, ...}}]}}
    {{split}}2014/COCO_{{split}}2014_{{image_id:012d}}.jpg     (or --images DIR: DIR/COCO_...jpg)"""


OKVQA_LAYOUT = coco_vqa_layout("")
VQAV2_LAYOUT = coco_vqa_layout("v2_")


def _coco_vqa(ctx: Context, task: str, prefix: str, layout: str, keep: tuple[str, ...]) -> Iterator[Sample]:
    """Questions joined with their annotations; ``keep``: annotation fields copied into the json."""
    extra_options(ctx, {})
    src, split = ctx.options.src, ctx.options.split
    questions_path = src / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json"
    annotations_path = src / f"{prefix}mscoco_{split}2014_annotations.json"
    questions = _field(load_json(questions_path, f"{task} questions", layout), "questions", questions_path, layout)
    annotations = _field(load_json(annotations_path, f"{task} annotations", layout), "annotations",
                         annotations_path, layout)
    by_question = {a["question_id"]: a for a in annotations if isinstance(a, dict) and "question_id" in a}
    images = ctx.options.images or src / f"{split}2014"
    yield from _each(questions, lambda record: _coco_vqa_sample(record, by_question, images, task, split, keep, ctx),
                     ctx)


def _coco_vqa_sample(record: Any, by_question: dict, images: Path, task: str, split: str | None,
                     keep: tuple[str, ...], ctx: Context) -> Sample | None:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
            or not _is_id(record.get("question_id")) or not _is_id(record.get("image_id")):
        ctx.skip("malformed question")
        return None
    question_id, image_id = record["question_id"], record["image_id"]
    annotation = by_question.get(question_id)
    if annotation is None:
        ctx.skip("question has no annotation")
        return None
    fields = {"image_id": image_id, "question_id": question_id}
    fields.update({key: annotation[key] for key in keep if key in annotation})
    return _vqa_sample(ctx, str(question_id), task, record["question"], annotation.get("answers"),
                       images / f"COCO_{split}2014_{image_id:012d}.jpg", fields)


@register("okvqa", kind="image", layout=OKVQA_LAYOUT, splits=SPLITS,
          unavailable={"test": "OK-VQA has no test split: evaluate on val, as is usual"})
def read_okvqa(ctx: Context) -> Iterator[Sample]:
    return _coco_vqa(ctx, "okvqa", "", OKVQA_LAYOUT, keep=())


@register("vqav2", kind="image", layout=VQAV2_LAYOUT, splits=SPLITS, unavailable=NO_TEST)
def read_vqav2(ctx: Context) -> Iterator[Sample]:
    return _coco_vqa(ctx, "vqav2", "v2_", VQAV2_LAYOUT,
                     keep=("answer_type", "multiple_choice_answer", "question_type"))


# ---------------------------------------------------------------------------------------------------
# VizWiz


VIZWIZ_LAYOUT = """\
<in>/
    annotations/{split}.json   (or <in>/{split}.json) [{"image": "VizWiz_val_00000000.jpg", "question",
                                 "answers": [{"answer", "answer_confidence"}], "answerable", "answer_type"}]
    {split}/<image>            (or --images DIR: DIR/<image>)"""


def _vizwiz_annotations(src: Path, split: str | None) -> Path:
    candidates = [src / "annotations" / f"{split}.json", src / f"{split}.json"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ConvertError(f"vizwiz annotations not found: neither {candidates[0]} nor {candidates[1]}\n"
                           f"expected layout:\n{VIZWIZ_LAYOUT}")
    return found


def _vizwiz_sample(record: Any, images: Path, ctx: Context) -> Sample | None:
    if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
            or not isinstance(record.get("question"), str):
        ctx.skip("malformed question")
        return None
    name = record["image"]
    fields = {"image": name, **{key: record[key] for key in ("answerable", "answer_type") if key in record}}
    return _vqa_sample(ctx, Path(name).stem, "vizwiz", record["question"], record.get("answers"), images / name,
                       fields)


@register("vizwiz", kind="image", layout=VIZWIZ_LAYOUT, splits=SPLITS, unavailable=NO_TEST)
def read_vizwiz(ctx: Context) -> Iterator[Sample]:
    extra_options(ctx, {})
    src, split = ctx.options.src, ctx.options.split
    path = _vizwiz_annotations(src, split)
    records = load_json(path, "vizwiz annotations", VIZWIZ_LAYOUT)
    if not isinstance(records, list):
        raise ConvertError(f"{path}: expected a json list of questions\nexpected layout:\n{VIZWIZ_LAYOUT}")
    images = ctx.options.images or src / str(split)
    yield from _each(records, lambda record: _vizwiz_sample(record, images, ctx), ctx)


# ---------------------------------------------------------------------------------------------------
# TextVQA


TEXTVQA_LAYOUT = """\
<in>/
    TextVQA_0.5.1_{split}.json   {"data": [{"question", "image_id", "question_id", "answers": [10 str]}]}
    train_images/{image_id}.jpg  val's images too, as released (or --images DIR: DIR/{image_id}.jpg)"""


def _textvqa_sample(record: Any, images: Path, ctx: Context) -> Sample | None:
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
            or not isinstance(record.get("image_id"), str) or not _is_id(record.get("question_id")):
        ctx.skip("malformed question")
        return None
    question_id = record["question_id"]
    return _vqa_sample(ctx, str(question_id), "textvqa", record["question"], record.get("answers"),
                       images / f"{record['image_id']}.jpg",
                       {"image_id": record["image_id"], "question_id": question_id})


@register("textvqa", kind="image", layout=TEXTVQA_LAYOUT, splits=SPLITS, unavailable=NO_TEST)
def read_textvqa(ctx: Context) -> Iterator[Sample]:
    extra_options(ctx, {})
    src = ctx.options.src
    path = src / f"TextVQA_0.5.1_{ctx.options.split}.json"
    records = _field(load_json(path, "textvqa questions", TEXTVQA_LAYOUT), "data", path, TEXTVQA_LAYOUT)
    images = ctx.options.images or src / "train_images"
    yield from _each(records, lambda record: _textvqa_sample(record, images, ctx), ctx)


def _each(records: list, make: Callable[[Any], Sample | None], ctx: Context) -> Iterator[Sample]:
    """The samples ``make`` builds from ``records``, the progress bar's total set to their number."""
    ctx.total(len(records))
    yield from each_sample(records, make, ctx)
