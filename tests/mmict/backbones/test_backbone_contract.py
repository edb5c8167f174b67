"""The backbone protocol, checked the same way on every family's tiny checkpoint.

Family files (test_backbone_<family>.py) check what only that family has (parity with its processor,
M-RoPE, AnyRes, crops, encoder-decoder). Here: what AIM and the baselines need from any backbone.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_MODULES, save_tiny
from tiny_models.common import test_image as make_image

from mmict.backbones import load_backbone
from mmict.backbones.lora import add_lora
from mmict.methods.aim.reader import DemoReader, FusedTokenProjector
from mmict.prompts import build_prompt

VARIANTS = sorted(FAMILY_MODULES)
FAMILY = {"blip2_t5": "blip2"}  # variants that load as another family name


@pytest.fixture(scope="module", params=VARIANTS)
def variant_dir(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def _load(variant_dir, dtype: str = "float32"):
    variant, path = variant_dir
    return load_backbone(FAMILY.get(variant, variant), str(path), dtype)


def _demo_batch(bb):
    images = [bb.image_transform(make_image(color=c)) for c in ((200, 30, 30), (30, 30, 200))]
    query = bb.image_transform(make_image((32, 20), color=(200, 30, 30)))
    return images, ["a red circle", "a blue square"], query


def test_describes_itself(variant_dir):
    bb = _load(variant_dir)
    assert bb.hidden_size == bb.model.get_input_embeddings().weight.shape[1]
    assert any(isinstance(m, bb.decoder_layer_cls) for m in bb.model.modules())
    assert bb.image_tokens_per_image > 0 and bb.num_layers >= 1
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_aim_trains_only_the_projector(variant_dir):
    bb = _load(variant_dir)
    images, texts, query = _demo_batch(bb)
    reader = DemoReader(bb)
    hidden = reader.read(images, texts)
    assert [h.shape[0] for h in hidden] == [len(ids) for ids in bb.tokenize(texts)]
    proj = FusedTokenProjector(bb.hidden_size, bb.hidden_size)
    fused = [proj(h) for h in hidden]
    prompt = build_prompt("fused", query, "what color ?", fused_demos=fused, target="red")
    loss = bb(bb.assemble([prompt]), with_loss=True).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert proj.net.weight.grad is not None and proj.net.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.model.parameters())


def test_zero_demos_equal_the_plain_prompt(variant_dir):
    bb = _load(variant_dir)
    _, _, query = _demo_batch(bb)
    plain = bb(bb.assemble([build_prompt("none", query, "what color ?")])).logits
    fused = bb(bb.assemble([build_prompt("fused", query, "what color ?", fused_demos=[])])).logits
    torch.testing.assert_close(plain, fused)


def test_every_demo_mode_runs_and_generates(variant_dir):
    bb = _load(variant_dir)
    images, texts, query = _demo_batch(bb)
    hidden = DemoReader(bb).read(images, texts)
    prompts = [
        build_prompt("images", query, "what color ?", demo_images=images, demo_texts=texts),
        build_prompt("text", query, "what color ?", demo_texts=texts),
        build_prompt("fused", query, "what color ?", fused_demos=hidden),
        build_prompt("none", query, "what color ?"),
    ]
    batch = bb.assemble(prompts, padding_side="left")
    # vanilla ICL pays for every demo image; fused and text demos only for their text
    ctx = batch.context_tokens.tolist()
    assert ctx[0] > ctx[1] == ctx[2] > ctx[3]
    outputs = bb.generate(prompts, max_new_tokens=3)
    assert len(outputs) == 4 and all(isinstance(o, str) for o in outputs)


def test_lora_adds_trainable_weights_to_the_language_model_only(variant_dir):
    bb = _load(variant_dir)
    n = add_lora(bb, r=2)
    trainable = {name for name, p in bb.model.named_parameters() if p.requires_grad}
    assert n > 0 and trainable and all("lora_" in name for name in trainable)
    lm_params = {id(p) for p in bb.language_model.parameters()}
    assert all(id(p) in lm_params for p in bb.model.parameters() if p.requires_grad)
    _, _, query = _demo_batch(bb)
    loss = bb(bb.assemble([build_prompt("none", query, "what color ?", target="red")]), with_loss=True).loss
    loss.backward()
    assert all(p.grad is not None for p in bb.model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="not layers of the"):
        add_lora(_load(variant_dir), r=2, target_modules=["not_a_layer"])


def test_loads_in_bfloat16(variant_dir):
    bb = _load(variant_dir, "bfloat16")
    assert bb.dtype == torch.bfloat16
    _, _, query = _demo_batch(bb)
    out = bb(bb.assemble([build_prompt("none", query, "what color ?")]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
