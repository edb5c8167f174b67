"""The per-head attention-output hook (MimIC's insertion point) on several families' tiny models: a zero shift leaves
the logits bit-identical, a shift at layer l changes nothing before it, and generation's KV-cache steps see the
same shifted model as a full forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny
from tiny_models.common import test_image as make_image

from mmict.backbones import load_backbone
from mmict.backbones.head_shift import HeadShift, head_sites
from mmict.methods.mimic.shift import MimICShift
from mmict.segments import Image, Text

# llava: Llama LM (o_proj); blip2: OPT (out_proj); blip2_t5: Flan-T5, whose encoder blocks are shifted (o)
FAMILIES = {"llava": "llava", "blip2": "blip2", "blip2_t5": "blip2"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def backbone(request, tmp_path_factory):
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return load_backbone(FAMILIES[request.param], str(path))


def assembled(backbone, padding_side="right"):
    image = backbone.image_transform(make_image())
    prompts = [[Image(image), Text("what color is the shape ?")], [Image(image), Text("a red circle")]]
    return backbone.assemble(prompts, padding_side=padding_side)


def add_at(layer: int, scale: float):
    def fn(at, heads, queries, keys, causal):
        return heads + scale if at == layer else heads
    return fn


@torch.no_grad()
def test_zero_shift_is_identical_and_a_shift_at_layer_l_changes_nothing_before_it(backbone):
    """...and a suspended shift is the frozen model."""
    batch = assembled(backbone)
    sites = head_sites(backbone.attention_layers())
    assert len(sites) >= 2
    plain = backbone.hidden_states(batch)
    with HeadShift(sites, add_at(0, 0.0)):
        zero = backbone.hidden_states(batch)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    last = len(sites) - 1
    with HeadShift(sites, add_at(last, 1.0)) as hook:
        shifted = backbone.hidden_states(batch)
        with hook.suspended():  # the teacher's pass: the frozen model
            assert torch.equal(backbone.hidden_states(batch)[-1], plain[-1])
    # hidden_states[i] is layer i's input: layers before `last` see no change, its output does
    assert all(torch.equal(plain[i], shifted[i]) for i in range(last + 1))
    assert not torch.allclose(plain[last + 1], shifted[last + 1])
    after = backbone.hidden_states(batch)  # detached: the model is the frozen one again
    assert all(torch.equal(a, b) for a, b in zip(plain, after))


@torch.no_grad()
def test_kv_cache_steps_match_a_full_forward(tmp_path):
    backbone = load_backbone("llava", str(save_tiny("llava", tmp_path)))
    sites = head_sites(backbone.attention_layers())
    torch.manual_seed(0)
    shift = MimICShift(len(sites), sites[0].num_heads, sites[0].head_dim)
    shift.shift.normal_(0, 1.0)
    batch = assembled(backbone, padding_side="left")
    new = backbone.embed_tokens(torch.tensor([[5], [6]]))
    lm = backbone.model
    with HeadShift(sites, shift, causal=True):
        full = lm(inputs_embeds=torch.cat([batch.inputs_embeds, new], 1), use_cache=False,
                  attention_mask=torch.cat([batch.attention_mask, torch.ones_like(batch.attention_mask[:, :1])], 1))
        first = lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=True)
        step = lm(inputs_embeds=new, cache=first.past_key_values, use_cache=True,
                  attention_mask=torch.cat([batch.attention_mask, torch.ones_like(batch.attention_mask[:, :1])], 1))
    assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-4)
    plain = lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(first.logits, plain, atol=1e-3)  # the shift did act
