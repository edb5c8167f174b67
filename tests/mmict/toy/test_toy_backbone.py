"""The toy backbone: built once and cached, rebuilt on a changed recipe, pretraining learns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_TOY

from mmict.backbones import load_backbone
from mmict.toy.backbone import MARKER, ensure_toy_backbone
from mmict.toy.language import binding_text, nonsense_words


def test_cached_and_rebuilt_on_recipe_change(tmp_path, caplog):
    path = tmp_path / "bb"
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY))
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    ensure_toy_backbone(path, SimpleNamespace(**{**TINY_TOY, "seed": 1}))
    assert "rebuilding" in caplog.text
    assert json.loads((path / MARKER).read_text())["fields"]["seed"] == 1


def test_refuses_to_overwrite_a_folder_that_is_not_a_toy_backbone(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_toy_backbone(tmp_path / "mine", SimpleNamespace(**TINY_TOY))


def test_force_rebuilds_an_up_to_date_backbone(tmp_path):
    path = ensure_toy_backbone(tmp_path / "bb", SimpleNamespace(**TINY_TOY))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY), force=True)
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_tokenizer_splits_nonsense_words_into_syllables_and_back(tiny_backbone):
    tok = tiny_backbone.tokenizer
    for word in nonsense_words()[:: len(nonsense_words()) // 50]:
        pieces = tok.tokenize(word)
        assert pieces == [word[:2], f"##{word[2:]}"], (word, pieces)
        assert tok.decode(tok(word, add_special_tokens=False)["input_ids"]) == word
    assert tok.unk_token not in tok.tokenize(binding_text("dapo") + " a red circle on the left .")


@pytest.mark.slow
def test_pretraining_lowers_loss_trains_lm_not_vision_and_records_probe(tmp_path):
    cfg = SimpleNamespace(**TINY_TOY, pretrain_steps=80, pretrain_text_steps=0, pretrain_batch_size=8,
                          pretrain_lr=3e-3)
    path = ensure_toy_backbone(tmp_path / "bb", cfg)
    recipe = json.loads((path / MARKER).read_text())
    assert recipe["pretrain_loss"]["last"] < 0.75 * recipe["pretrain_loss"]["first"]
    assert set(recipe["binding_probe"]) == {"none", "images", "text"}
    random_init = load_backbone("llava", str(ensure_toy_backbone(tmp_path / "rand", SimpleNamespace(**TINY_TOY))))
    trained = load_backbone("llava", str(path))
    assert not torch.equal(trained.model.lm_head.weight, random_init.model.lm_head.weight)
    assert not torch.equal(trained.model.model.multi_modal_projector.linear_1.weight,
                           random_init.model.model.multi_modal_projector.linear_1.weight)
    for (name, a), b in zip(trained.model.model.vision_tower.named_parameters(),
                            random_init.model.model.vision_tower.parameters()):
        assert torch.equal(a, b), f"vision tower weight {name} changed: it must stay frozen"
    assert not any(p.requires_grad for p in trained.parameters())  # loaded frozen again


def test_pretraining_stream_warms_up_on_word_lists_then_follows_the_mix():
    import torch

    from mmict.segments import Image, Text
    from mmict.toy.language import word_pools
    from mmict.toy.pretrain_data import ToyPretrainStream, recall_document

    stream = ToyPretrainStream(lambda img: torch.zeros(3, 8, 8), batch_size=4, text_steps=2, image_size=16,
                               mix={"recall": 1.0})
    batches = iter(stream)
    warmup = [next(batches) for _ in range(2)]
    assert all(len(doc) == 1 and isinstance(doc[0], Text) for batch in warmup for doc in batch)  # word lists
    after = next(batches)
    pool = set(word_pools()["pretrain"])
    for doc in after:  # recall episodes: "<colour> this is a <word>" ..., keyed by colour words, no images
        assert not any(isinstance(s, Image) for s in doc)
        words = doc[0].text.split()
        assert words[1:4] == ["this", "is", "a"] and words[4] in pool
    import random

    text = recall_document(random.Random(0), tuple(pool), n_way=2)[0].text
    last_colour, last_word = text.split()[-5], text.split()[-1]
    pairs = {(w[i], w[i + 4]) for w in [text.split()] for i in range(0, len(w) - 5, 5)}
    assert (last_colour, last_word) in pairs  # the query's colour was shown with the same word


@pytest.mark.slow
def test_vision_stage_teaches_every_patch_token_the_image_and_is_frozen_after(tmp_path):
    from mmict.backbones.llava import LlavaBackbone
    from mmict.toy.backbone import build_toy_llava, toy_language
    from mmict.toy.pretrain import pretrain_vision_tower

    cfg = SimpleNamespace(**TINY_TOY, pretrain_vision_steps=300, pretrain_steps=10, pretrain_text_steps=0,
                          pretrain_batch_size=4, pretrain_lr=1e-3)
    model, tok, proc = build_toy_llava(cfg, *toy_language())
    random_tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    accuracy, _ = pretrain_vision_tower(LlavaBackbone(model, tok, proc, "stage1"), cfg, progress=False)
    assert accuracy["color"] >= 0.9 and accuracy["shape"] >= 0.3, accuracy  # chance: 1/6
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    stage1 = model.model.vision_tower.state_dict()
    assert any(not torch.equal(stage1[k], v) for k, v in random_tower.items())
    # The whole recipe: stage 2 (language model) leaves the tower exactly as stage 1 made it.
    full = load_backbone("llava", str(ensure_toy_backbone(tmp_path / "bb", cfg)))
    for name, weight in full.model.model.vision_tower.state_dict().items():
        assert torch.equal(weight, stage1[name]), f"vision tower weight {name} changed in the language-model stage"


def test_grounding_positions_are_the_text_after_each_image_labelled_with_that_image():
    from mmict.segments import Image, Text
    from mmict.toy.pretrain import text_after_images

    px = torch.zeros(3, 4, 4)
    batch = [[Text("intro"), Image(px), Text("a b"), Image(px), Text("c")],  # images 0 and 1
             [Image(px), Text("d e f")]]  # image 2: the index runs over the batch, as vision_features sees it
    spans = [[(1, 2), (2, 18), (18, 20), (20, 36), (36, 37)], [(1, 17), (17, 20)]]
    rows, cols, owner = text_after_images(batch, spans)
    assert list(zip(rows, cols, owner)) == [(0, 18, 0), (0, 19, 0), (0, 36, 1),
                                            (1, 17, 2), (1, 18, 2), (1, 19, 2)]


def test_grounding_loss_without_vision_heads_is_a_clear_error():
    from mmict.backbones.llava import LlavaBackbone
    from mmict.toy.backbone import build_toy_llava, toy_language
    from mmict.toy.pretrain import ToyPretrainModule

    model, tok, proc = build_toy_llava(SimpleNamespace(**TINY_TOY), *toy_language())
    with pytest.raises(ValueError, match="pretrain_vision_steps"):
        ToyPretrainModule(LlavaBackbone(model, tok, proc, "x"), 1e-3, 10, grounding_weight=1.0)
