"""MMICT's reference task setup (KDEGroup/MMICT at 3128e3b): its caption instructions and cleaning, its VQA prompt,
its decoding, and the training side (a random instruction per episode, cleaned targets)."""

from __future__ import annotations

import random
import re

import pytest
import torch
from helpers import eval_section

from data_modules.downstream import Example
from data_modules.task_episodes import task_episode
from mmict.config import ConfigError, load_config
from mmict.eval.protocol import resolve
from mmict.eval.tasks import MMICT_CAPTION_INSTRUCTIONS, clean_caption, get_task


def _reference_pre_caption(caption: str, max_words: int = 50) -> str:
    """lavis/processors/blip_processors.py BlipCaptionProcessor.pre_caption, lines 49-70, verbatim."""
    caption = re.sub(
        r"([.!\"()*#:;~])",
        " ",
        caption.lower(),
    )
    caption = re.sub(
        r"\s{2,}",
        " ",
        caption,
    )
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")

    # truncate caption
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])

    return caption


@pytest.mark.parametrize("caption", [
    "A man is Playing (a) guitar!  Outside.", "  two dogs; run: fast~ ", "Hello \"world\"#*", "x\n", "",
    " ".join(f"w{i}" for i in range(60)), "A.B.C", "tabs\tstay\tas they are",
])
def test_caption_cleaning_is_lavis_pre_caption(caption):
    assert clean_caption(caption) == _reference_pre_caption(caption)


def ex(question: str, answers: list[str], id_: str = "1") -> Example:
    return Example(id=id_, image=torch.zeros(1), question=question, answers=answers, task="")


def test_reference_prompts_per_task():
    video = get_task("msvd_caption", "mmict_reference")
    image = get_task("coco_caption", "mmict_reference")
    assert video.query_prompt(ex("", ["x"])) == "A short video caption:"  # fixed at evaluation: the list's first
    assert image.query_prompt(ex("", ["x"])) == "A short image caption:"
    assert video.demo_text(ex("", ["A Man, playing."])) == "a man, playing"  # the bare caption, cleaned
    assert video.train_prompts == MMICT_CAPTION_INSTRUCTIONS["video"] and len(video.train_prompts) == 6
    vqa = get_task("msvd_qa", "mmict_reference")
    assert vqa.query_prompt(ex("what is he doing?", ["x"])) == "Question: what is he doing?Short answer:"
    assert vqa.demo_text(ex("who?", ["a man"])) == "Question: who?Short answer:a man"
    # the default format is OpenFlamingo's, unchanged
    assert get_task("msvd_caption").query_prompt(ex("", ["x"])) == "Output:"
    with pytest.raises(ValueError, match="caption and VQA tasks"):
        get_task("hateful_memes", "mmict_reference")


def test_training_draws_an_instruction_per_episode_and_cleans_the_target():
    task = get_task("msvd_caption", "mmict_reference")
    query = ex("", ["A Dog RUNS."])
    episodes = [task_episode([], query, task, random.Random(s)) for s in range(40)]
    prompts = {e["query_prompt"] for e in episodes}
    assert prompts <= set(MMICT_CAPTION_INSTRUCTIONS["video"]) and len(prompts) > 3  # drawn, not fixed
    assert {e["query_target"] for e in episodes} == {"a dog runs"}
    # the episode's generator decides: the same seed, the same instruction (a resumed stream draws the same)
    assert task_episode([], query, task, random.Random(7)) == task_episode([], query, task, random.Random(7))
    plain = get_task("msvd_caption")
    assert task_episode([], query, plain, random.Random(0))["query_target"] == "A Dog RUNS."


@pytest.mark.parametrize(("task", "encoder_decoder", "expected"), [
    ("msvd_caption", True, (5, 30, 7)), ("msvd_caption", False, (5, 30, 8)),
    ("msvd_qa", True, (5, 10, 0)), ("vqav2", False, (5, 10, 1)),
])
def test_reference_decoding(task, encoder_decoder, expected):
    """mmict.yaml: num_beams 5, captions max_len 30 / min_len 8, VQA 10 / 1, passed to HF generate as min_length,
    which counts T5's decoder start token: 8 -> 7 new tokens for Flan-T5, 8 for OPT."""
    p = resolve(eval_section(protocol="mmict_reference"), get_task(task, "mmict_reference"), selection="random",
                prompt_format="mmict_reference", encoder_decoder=encoder_decoder)
    d = p.decoding
    assert (d.num_beams, d.max_new_tokens, d.min_new_tokens) == expected and d.length_penalty == 1.0
    assert p.label == "mmict_reference" and p.zero_shot == "none"
    kwargs = d.generate_kwargs()
    assert kwargs["num_beams"] == 5 and kwargs.get("min_new_tokens", 0) == expected[2]


def test_protocol_names_a_prompt_format_other_than_its_own():
    p = resolve(eval_section(protocol="mmict_reference"), get_task("msvd_caption"), selection="random",
                prompt_format="openflamingo")
    assert p.label == "mmict_reference (modified: prompt_format=openflamingo)"
    q = resolve(eval_section(), get_task("okvqa", "mmict_reference"), selection="random",
                prompt_format="mmict_reference")
    assert q.label == "openflamingo (modified: prompt_format=mmict_reference)"


def test_mmict_experiments_follow_the_reference_and_bad_formats_fail_at_load():
    cfg = load_config("mmict_msvd_caption", [])
    assert (cfg.eval.protocol, cfg.eval.num_queries, cfg.data.prompt_format, cfg.data.augment) == (
        "mmict_reference", None, "mmict_reference", "mmict_reference")
    with pytest.raises(ConfigError, match="prompt_format"):
        load_config("toy_aim", ["data.prompt_format=nope"])
    with pytest.raises(ConfigError, match="caption and VQA tasks"):
        load_config("toy_aim", ["data.prompt_format=mmict_reference"])  # toy tasks are neither
    with pytest.raises(ConfigError, match="data.augment"):
        load_config("toy_aim", ["data.augment=mmict_reference"])  # the web corpus is not augmented
