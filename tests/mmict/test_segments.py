"""The one assembly path: segments -> inputs_embeds, mask, positions, labels, spans."""

from __future__ import annotations

import pytest
import torch
from PIL import Image as PILImage

from mmict.backbones import IGNORE_INDEX
from mmict.segments import Embeds, Image, Text


@pytest.fixture()
def pixels(tiny_backbone):
    return tiny_backbone.image_transform(PILImage.new("RGB", (16, 16), (200, 30, 30)))


def test_assembly_layout_right_padding(tiny_backbone, pixels):
    bb = tiny_backbone
    fused = torch.randn(3, bb.hidden_size)
    q_ids = bb.tokenize(["Question : what color is the shape ? Short answer :"])[0]
    prompts = [
        [Embeds(fused), Image(pixels), Text("Question: what color is the shape? Short answer:"),
         Text("red", target=True)],
        [Image(pixels), Text("a red circle")],
    ]
    out = bb.assemble(prompts, padding_side="right")
    n_img = bb.image_tokens_per_image
    len0 = 1 + 3 + n_img + len(q_ids) + 2  # BOS, fused, image, prompt, target + EOS
    len1 = 1 + n_img + 3
    assert out.inputs_embeds.shape == (2, len0, bb.hidden_size)
    assert out.attention_mask.sum(1).tolist() == [len0, len1]
    assert out.attention_mask[1, len1:].eq(0).all()
    # spans cover each segment in order, after BOS
    assert out.spans[0] == [(1, 4), (4, 4 + n_img), (4 + n_img, 4 + n_img + len(q_ids)), (len0 - 2, len0)]
    # fused embeds are placed verbatim; BOS and text come from the embedding table
    torch.testing.assert_close(out.inputs_embeds[0, 1:4], fused)
    table = bb.model.get_input_embeddings().weight
    torch.testing.assert_close(out.inputs_embeds[0, 0], table[bb.bos_token_id])
    # image positions hold the projected vision features
    torch.testing.assert_close(out.inputs_embeds[0, 4 : 4 + n_img], bb.embed_images([pixels])[0])
    # labels: only the target and its EOS
    red = bb.tokenize(["red"])[0]
    assert out.labels[0, -2:].tolist() == red + [bb.eos_token_id]
    assert out.labels[0, :-2].eq(IGNORE_INDEX).all() and out.labels[1].eq(IGNORE_INDEX).all()
    assert out.position_ids[0].tolist() == list(range(len0))


def test_left_padding_gives_same_positions_and_logits(tiny_backbone, pixels):
    bb = tiny_backbone
    short = [Image(pixels), Text("what shape")]
    long = [Text("a blue square on the left ."), Image(pixels), Text("what shape is it ?")]
    both = bb.assemble([long, short], padding_side="left")
    alone = bb.assemble([short], padding_side="left")
    pad = both.inputs_embeds.shape[1] - alone.inputs_embeds.shape[1]
    assert pad > 0 and both.attention_mask[1, :pad].eq(0).all()
    assert both.position_ids[1, pad:].tolist() == alone.position_ids[0].tolist()
    logits_both = bb(both).logits[1, pad:]
    logits_alone = bb(alone).logits[0]
    torch.testing.assert_close(logits_both, logits_alone, atol=1e-4, rtol=1e-4)


def test_batched_generation_matches_single(tiny_backbone, pixels):
    bb = tiny_backbone
    p1 = [Image(pixels), Text("Question: what color is the shape? Short answer:")]
    p2 = [Text("a red circle ."), Image(pixels), Text("Question: where is the shape? Short answer:")]
    batched = bb.generate([p1, p2], max_new_tokens=4)
    assert batched == [bb.generate([p1], max_new_tokens=4)[0], bb.generate([p2], max_new_tokens=4)[0]]


def test_bad_segments_fail_clearly(tiny_backbone):
    with pytest.raises(ValueError, match="expected \\(n, 32\\)"):
        tiny_backbone.assemble([[Embeds(torch.zeros(2, 7))]])
    with pytest.raises(TypeError, match="not a segment"):
        tiny_backbone.assemble([["plain string"]])


def test_backbone_is_frozen(tiny_backbone):
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.model.training
