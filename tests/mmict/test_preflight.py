"""Checks a run makes before its first step: each missing piece found, named, with the command that fixes it."""

from __future__ import annotations

import pytest
import torch

from mmict.config import load_config
from mmict.preflight import PreflightError, accelerator, hub_resource, nltk_data, require, rices_model


@pytest.fixture()
def offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_okvqa_needs_nltk_data_and_says_how_to_get_it(tmp_path, monkeypatch):
    import nltk

    from mmict.eval import metrics

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setattr(metrics, "_nltk_ready_for", None)
    [check] = nltk_data(load_config("aim_okvqa", []))
    assert not check.ok and "wordnet" in check.detail
    assert check.fix.startswith("python -m nltk.downloader -d ") and "punkt_tab" in check.fix
    assert nltk_data(load_config("toy_aim", [])) == []  # other tasks need none


def test_rices_weights_missing_offline_fail_with_the_fetch_command(offline_empty_cache):
    [check] = rices_model(load_config("aim_okvqa", ["eval.selection=rices"]))
    assert not check.ok and "ViT-L-14 / openai" in check.item  # the openflamingo protocol's RICES model
    assert "open_clip.create_model_and_transforms('ViT-L-14', pretrained='openai')" in check.fix


def test_a_missing_hub_tokenizer_offline_fails_with_the_download_command(offline_empty_cache):
    check = hub_resource("bert-base-uncased", "M-Hub tokenizer bert-base-uncased", "tokenizer")
    assert not check.ok and check.fix.startswith("huggingface-cli download bert-base-uncased")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_a_gpu_asked_for_without_one_is_refused_before_anything_runs():
    [check] = accelerator(load_config("toy_aim", ["trainer.accelerator=gpu"]))
    assert not check.ok and check.fix.startswith("trainer.accelerator=cpu")
    with pytest.raises(PreflightError, match="trainer.accelerator=cpu"):
        require([check])
