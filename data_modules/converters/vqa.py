"""VQA-style sets -> downstream shards: OK-VQA, VQAv2, VizWiz, TextVQA, each in its released layout.

OK-VQA (``okvqa``) and VQAv2 (``vqav2``), COCO 2014 images, splits train and val, flat or in the official
VQA API tree (https://github.com/GT-Vision-Lab/VQA: ``Questions/``, ``Annotations/``, ``Images/mscoco/``)::

    <in>/
        OpenEnded_mscoco_{split}2014_questions.json     VQAv2: v2_OpenEnded_mscoco_{split}2014_questions.json
                                                        (or Questions/<the same name>)
        mscoco_{split}2014_annotations.json             VQAv2: v2_mscoco_{split}2014_annotations.json
                                                        (or Annotations/<the same name>)
        {split}2014/COCO_{split}2014_{image_id:012d}.jpg      (or Images/mscoco/{split}2014/...,
                                                               or --images DIR: DIR/COCO_...jpg)

VQA v1 names its files as OK-VQA does; a questions file far larger than OK-VQA's is refused as VQA v1's.

VizWiz (``vizwiz``), splits train and val (test answers are not public), as the official zips unpack::

    <in>/
        Annotations/{split}.json     (or annotations/{split}.json, or {split}.json)
                                     [{"image", "question", "answers": [{"answer", ...}], ...}]
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
<in>/                                    flat, or the VQA API tree (Questions/ Annotations/ Images/mscoco/)
    {prefix}OpenEnded_mscoco_{{split}}2014_questions.json   {{"questions": [{{image_id, question, question_id}}]}}
                                         (or Questions/<that name>)
    {prefix}mscoco_{{split}}2014_annotations.json           {{"annotations": [{{question_id, answers, ...}}]}}
                                         (or Annotations/<that name>)
    {{split}}2014/COCO_{{split}}2014_{{image_id:012d}}.jpg     (or Images/mscoco/{{split}}2014/COCO_...jpg;
                                         or --images DIR: DIR/COCO_...jpg)"""


OKVQA_LAYOUT = coco_vqa_layout("")
VQAV2_LAYOUT = coco_vqa_layout("v2_")
# OK-VQA has 9,009 train and 5,046 val questions; VQA v1, whose files have OK-VQA's names, 248,349 and
# 121,512. A questions file between the two is neither: refused above this many, it cannot be VQA v1 unseen.
OKVQA_MAX_QUESTIONS = 20_000


def find_in(src: Path, name: str, folders: tuple[str, ...], what: str, layout: str) -> Path:
    """``src/<folder>/name`` for the first of ``folders`` ("" = ``src`` itself) holding it; else a ConvertError
    naming every place looked at (the last one ends the first line) and the files of a similar name there."""
    candidates = [src / folder / name if folder else src / name for folder in folders]
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        return found
    tail = name.split("_", 1)[-1] if name.startswith("v2_") else name
    near = sorted({str(p.relative_to(src)) for folder in folders for p in (src / folder).glob(f"*{tail}")
                   if (src / folder).is_dir()})
    hint = f"\nfound instead: {', '.join(near)}" if near else ""
    looked = " nor ".join(str(path) for path in candidates)
    raise ConvertError(f"{what} not found: {'neither ' if len(candidates) > 1 else ''}{looked}\n"
                       f"expected layout:\n{layout}{hint}")


def image_folder(ctx: Context, folders: list[str], layout: str) -> Path:
    """``--images`` when given, else the first of ``folders`` (relative to ``--in``) that exists.

    No image folder at all is a wrong --in (or images kept elsewhere), said once rather than as one
    "missing image" per question.
    """
    if ctx.options.images is not None:
        return ctx.options.images
    src = ctx.options.src
    found = next((src / folder for folder in folders if (src / folder).is_dir()), None)
    if found is None:
        looked = ", ".join(str(src / folder) for folder in folders)
        raise ConvertError(f"no image folder found (looked for {looked}); pass --images DIR if the images are "
                           f"elsewhere\nexpected layout:\n{layout}")
    return found


def _coco_vqa(ctx: Context, task: str, prefix: str, layout: str, keep: tuple[str, ...]) -> Iterator[Sample]:
    """Questions joined with their annotations; ``keep``: annotation fields copied into the json."""
    extra_options(ctx, {})
    src, split = ctx.options.src, ctx.options.split
    questions_path = find_in(src, f"{prefix}OpenEnded_mscoco_{split}2014_questions.json", ("", "Questions"),
                             f"{task} questions", layout)
    annotations_path = find_in(src, f"{prefix}mscoco_{split}2014_annotations.json", ("", "Annotations"),
                               f"{task} annotations", layout)
    questions = _field(load_json(questions_path, f"{task} questions", layout), "questions", questions_path, layout)
    if task == "okvqa" and len(questions) > OKVQA_MAX_QUESTIONS:
        raise ConvertError(f"{questions_path} holds {len(questions):,} questions; OK-VQA has 9,009 (train) and "
                           f"5,046 (val): these are VQA v1's files, which have OK-VQA's names. Put OK-VQA's own "
                           f"files (okvqa.allenai.org) in another folder and pass it as --in")
    annotations = _field(load_json(annotations_path, f"{task} annotations", layout), "annotations",
                         annotations_path, layout)
    by_question = {a["question_id"]: a for a in annotations if isinstance(a, dict) and "question_id" in a}
    images = image_folder(ctx, [f"{split}2014", f"Images/mscoco/{split}2014"], layout)
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
<in>/                      as the official Annotations.zip, train.zip, val.zip unpack
    Annotations/{split}.json   (or annotations/{split}.json, or <in>/{split}.json)
                               [{"image": "VizWiz_val_00000000.jpg", "question",
                                 "answers": [{"answer", "answer_confidence"}], "answerable", "answer_type"}]
    {split}/<image>            (or --images DIR: DIR/<image>)"""
VIZWIZ_ANNOTATIONS = ("Annotations", "annotations", "")  # the official zip's folder name first


def _vizwiz_annotations(src: Path, split: str | None) -> Path:
    return find_in(src, f"{split}.json", VIZWIZ_ANNOTATIONS, "vizwiz annotations", VIZWIZ_LAYOUT)


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
    images = image_folder(ctx, [str(split)], VIZWIZ_LAYOUT)
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
