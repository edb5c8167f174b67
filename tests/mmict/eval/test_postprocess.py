"""Answer post-processing as OpenFlamingo's harness cuts generations."""

from __future__ import annotations

import pytest

from mmict.eval.postprocess import first_word, get_postprocessor, postprocess_caption, postprocess_vqa


def test_vqa_cuts_at_the_next_turn_and_first_comma():
    assert postprocess_vqa(" yellow Question: what is it? Short answer: a cat") == "yellow"
    assert postprocess_vqa("red, blue and green") == "red"
    assert postprocess_vqa("1,000 people") == "1,000 people"  # no space after the comma: kept


def test_caption_cuts_at_output_and_drops_quotes():
    assert postprocess_caption(' "a dog on a couch" Output: a cat') == "a dog on a couch"


def test_first_word_and_lookup():
    assert first_word(" dapo this is a kire") == "dapo" and first_word("") == ""
    assert get_postprocessor("none")("  raw  ") == "raw"
    with pytest.raises(ValueError, match="unknown eval.postprocess 'vq'"):
        get_postprocessor("vq")
