"""The toy BLIP-2 (issue 23 item 1): a normal BLIP-2 folder loaded through the blip2 family, its stage-1 Q-Former's
shared part inside the model, its text branch saved as a BERT checkpoint that *is* that text branch, and MMICT's
real-BLIP-2 path (init from the checkpoint, text branch from BERT) running on it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_TOY

from mmict.toy.backbone import MARKER, ensure_toy_backbone, toy_language
from mmict.toy.blip2 import QFORMER_TEXT_DIR, build_hub_tokenizer, copy_shared_qformer, save_text_branch

TINY_BLIP2 = {**TINY_TOY, "family": "blip2", "qformer_hidden_size": 32, "qformer_layers": 2, "num_query_tokens": 4,
              "pretrain_qformer_steps": 0}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 module trained a few steps on the tiny BLIP-2's tower (random, untrained weights suffice for the
    equivalences below; a few steps make the text branch differ from its init)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    from mmict.toy.qformer_stage import CaptionPairs, QFormerStage1

    cfg = SimpleNamespace(**{**TINY_BLIP2, "pretrain_lr": 1e-3, "pretrain_qformer_steps": 3})
    words, pieces = toy_language()
    tower = Blip2VisionModel(Blip2VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2))
    module = QFormerStage1(tower, build_hub_tokenizer(words, pieces), cfg)
    from transformers import BlipImageProcessor

    from mmict.backbones.base import ImageTransform

    transform = ImageTransform(BlipImageProcessor(size={"height": 16, "width": 16}))
    batch = next(iter(CaptionPairs(transform, 8, 16, seed=0)))
    optim = torch.optim.AdamW([p for n, p in module.named_parameters() if not n.startswith("vision.")], lr=1e-2)
    first = None
    for _ in range(4):
        losses = module.losses(*batch)
        loss = losses["itc"] + losses["itm"] + losses["itg"]
        first = first if first is not None else float(loss.detach())
        optim.zero_grad()
        loss.backward()
        optim.step()
    module.eval()
    return module, batch, first, float(loss)


def test_stage1_losses_fall_on_one_batch(stage1):
    _, _, first, last = stage1
    assert last < first


def test_itg_mask_hides_text_from_queries_and_the_future_from_text(stage1):
    module, (pixels, texts), _, _ = stage1
    tok = module.tokenizer
    a = tok(["a red circle on the left ."], return_tensors="pt")
    b = tok(["a red square at the top ."], return_tensors="pt")
    memory = module._image_memory(pixels[:1])
    n_q = module.query_tokens.shape[1]
    with torch.no_grad():
        ha = module._joint(memory, a["input_ids"], a["attention_mask"], causal=True)
        hb = module._joint(memory, b["input_ids"], b["attention_mask"], causal=True)
        joint = module._joint(memory, a["input_ids"], a["attention_mask"], causal=False)
    assert torch.allclose(ha[:, :n_q], hb[:, :n_q], atol=1e-6)  # queries never see the text under ITG
    same = 3  # "[CLS] a red" is common: text positions up to it see nothing that differs
    assert torch.allclose(ha[:, n_q:n_q + same], hb[:, n_q:n_q + same], atol=1e-6)
    assert not torch.allclose(ha[:, n_q + same], hb[:, n_q + same])
    assert not torch.allclose(joint[:, :n_q], ha[:, :n_q])  # under ITM the queries read the text


def test_saved_text_branch_is_the_stage1_text_branch(stage1, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    module, _, _, _ = stage1
    path = save_text_branch(module.qformer, module.tokenizer, tmp_path / "text")
    bert = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a red circle on the left .", "does it fit ? yes"], padding=True, return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0])[0] == "[CLS]"
    with torch.no_grad():
        mine = module.qformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        theirs = bert(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    assert torch.allclose(mine[real], theirs[real], atol=1e-5)


def test_shared_qformer_copied_into_blip2_gives_the_same_query_outputs(stage1):
    from mmict.toy.blip2 import build_toy_blip2

    module, (pixels, _), _, _ = stage1
    words, pieces = toy_language()
    model, _, _ = build_toy_blip2(SimpleNamespace(**TINY_BLIP2), words, pieces)
    model.eval()  # no dropout
    assert copy_shared_qformer(module.qformer, module.query_tokens, model) > 10
    memory = module._image_memory(pixels[:2])
    with torch.no_grad():
        mine = module.qformer(input_ids=None, query_embeds=module.query_tokens.expand(2, -1, -1),
                              encoder_hidden_states=memory).last_hidden_state
        theirs = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1),
                               encoder_hidden_states=memory).last_hidden_state
    assert torch.allclose(mine, theirs, atol=1e-6)


@pytest.mark.slow
def test_toy_blip2_folder_loads_as_blip2_and_feeds_mmict_like_a_real_checkpoint(tmp_path):
    from helpers import make_mmict_module

    from mmict.backbones import load_backbone
    from mmict.backbones.blip2 import load_processor

    cfg = SimpleNamespace(**{**TINY_BLIP2, "pretrain_vision_steps": 2, "pretrain_qformer_steps": 2,
                             "pretrain_steps": 3, "pretrain_text_steps": 0, "pretrain_batch_size": 2,
                             "pretrain_lr": 1e-3, "pretrain_grounding_weight": 1.0, "pretrain_grounding_layer": 1,
                             "pretrain_mix": {"captions": 0.5, "concept": 0.5}})
    path = ensure_toy_backbone(tmp_path / "blip2", cfg)
    recipe = json.loads((path / MARKER).read_text())
    assert recipe["fields"]["family"] == "blip2" and "qformer_stage1" in recipe and "concept_probe" in recipe
    assert "binding_probe" not in recipe  # no binding episodes in its mix
    backbone = load_backbone("blip2", str(path))
    assert backbone.family == "blip2" and backbone.image_tokens_per_image == 4
    assert load_processor(str(path)).num_query_tokens == 4
    module = make_mmict_module(path, hub_tokenizer=str(path / QFORMER_TEXT_DIR), text_init="bert",
                               task="toy_concept_tuning")
    init = module.hub_init
    assert init.source == str(path) and init.text_init == "bert"
    assert any(QFORMER_TEXT_DIR in origin for origin in init.parts.values())
    assert torch.equal(module.hub.query_tokens.detach(), backbone.model.query_tokens.detach())
