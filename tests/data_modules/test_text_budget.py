"""Texts are cut to `data.max_text_tokens` before a step sees them (characters first, then tokens), and counted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import webdataset as wds
from tiny_models.real_tokenizers import byte_level_bpe, sentencepiece_llama
from torchvision.transforms.functional import to_tensor

from callbacks.data_health import SkippedSamplesReport
from data_modules import WebCorpusDataModule, drain_skips
from data_modules.text_budget import CHARS_PER_TOKEN, TextBudget

HUGE = " ".join(f"w{i}" for i in range(100_000))  # a 100,000-word text


class _WordTokenizer:
    """One token per word, with offsets, as a fast tokenizer gives them; remembers what it was asked to read."""

    def __init__(self) -> None:
        self.read: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        self.read.append(len(text))
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        return {"input_ids": list(range(len(spans))), "offset_mapping": spans}


@pytest.fixture(autouse=True)
def _clean_skips():
    drain_skips()
    yield
    drain_skips()


def test_a_huge_text_is_cut_by_characters_before_the_tokenizer_reads_it_then_to_the_budget() -> None:
    tokenizer = _WordTokenizer()
    out = TextBudget(16, tokenizer)(HUGE)
    assert tokenizer.read and max(tokenizer.read) <= 16 * CHARS_PER_TOKEN  # never the 100,000 words
    assert out.split() == [f"w{i}" for i in range(16)]
    assert drain_skips() == {"cut: text to 16 tokens (data.max_text_tokens)": 1}


def test_short_texts_stay_whole_untokenized_and_uncounted() -> None:
    tokenizer = _WordTokenizer()
    budget = TextBudget(16, tokenizer)
    assert budget("a short caption") == "a short caption"
    assert tokenizer.read == []  # fewer bytes than the budget has tokens: nothing to count
    seventeen = " ".join(["ab"] * 17)  # more bytes than 16 but within the characters: the tokens decide
    assert budget(seventeen) == " ".join(["ab"] * 16)
    assert budget(" ".join(["ab"] * 16)) == " ".join(["ab"] * 16)
    assert drain_skips() == {"cut: text to 16 tokens (data.max_text_tokens)": 1}


def test_without_a_tokenizer_texts_are_cut_by_characters() -> None:
    out = TextBudget(16)(HUGE)
    assert out == HUGE[: 16 * CHARS_PER_TOKEN]
    assert drain_skips() == {"cut: text to 128 characters (data.max_text_tokens=16)": 1}


@pytest.mark.parametrize("make", [lambda: sentencepiece_llama([]), lambda: byte_level_bpe("qwen2", [])],
                         ids=["sentencepiece", "byte_level"])
def test_real_tokenizers_cut_at_a_token_boundary_within_the_budget(make) -> None:
    tokenizer = make()
    text = "the answer is green. the answer is blue. " * 40
    out = TextBudget(32, tokenizer)(text)
    assert text.startswith(out) and len(out) < len(text)
    assert len(tokenizer(out, add_special_tokens=False)["input_ids"]) == 32
    assert drain_skips() == {"cut: text to 32 tokens (data.max_text_tokens)": 1}


def test_a_budget_below_one_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match="data.max_text_tokens must be at least 1"):
        TextBudget(0)


def test_web_episodes_take_cut_texts_and_the_report_counts_cuts_apart_from_skips(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    def png() -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 0, 0)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    (tmp_path / "web").mkdir()
    doc = {"text_list": ["first", HUGE, "third"], "image_info": [
        {"matched_text_index": i, "image_base64": png()} for i in range(3)]}
    with wds.TarWriter(str(tmp_path / "web" / "val-000000.tar")) as sink:
        sink.write({"__key__": "d", "json": json.dumps(doc).encode()})
    dm = WebCorpusDataModule(tmp_path, image_transform=to_tensor, batch_size=1, num_workers=0, min_shots=2,
                             max_shots=2, max_text_tokens=16, tokenizer=_WordTokenizer())
    dm.setup("validate")
    [batch] = list(dm.val_dataloader())
    assert batch.demo_texts == ["first", " ".join(f"w{i}" for i in range(16))]
    assert batch.query_targets == ["third"]
    assert batch.skipped == {"cut: text to 16 tokens (data.max_text_tokens)": 1}
    report = SkippedSamplesReport()
    report.counts.update({f"val/{k}": v for k, v in batch.skipped.items()})
    report.counts["val/json does not parse"] += 2
    assert report.summary().splitlines()[0] == "data: 2 samples skipped; 1 texts cut (kept)"
