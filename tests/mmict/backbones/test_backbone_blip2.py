"""BLIP-2 adapter against the HF model, for the OPT (decoder-only) and Flan-T5 (encoder-decoder) variants."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from tiny_models import blip2 as tiny
from tiny_models.common import test_image as make_image
from tiny_models.numerics import assert_fp32_close, fp32_atol, max_diff

from mmict.backbones import IGNORE_INDEX, load_backbone
from mmict.methods.aim.reader import DemoReader, FusedTokenProjector
from mmict.prompts import build_prompt
from mmict.segments import Image, Text

PROMPT, TARGET = "what color is the shape ?", "a red square"
RED, BLUE, GREEN = (200, 40, 40), (40, 40, 200), (40, 200, 40)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    return {v: tiny.save_tiny(root / v, variant=v) for v in tiny.VARIANTS}


@pytest.fixture(scope="module", params=tiny.VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def bb(tiny_dirs, variant):
    return load_backbone("blip2", str(tiny_dirs[variant]))  # both variants load as family "blip2"


def pix(bb, color=RED):
    return bb.image_transform(make_image(color=color))


def target_labels(bb, text: str = TARGET) -> torch.Tensor:
    return torch.tensor([bb.tokenize([text])[0] + [bb.eos_token_id]])


def hf_reference(bb, path, color=RED, text=PROMPT, target=TARGET):
    """The HF model's own forward on its processor's inputs (T5: with the decoder labels of `target`)."""
    inputs = tiny.hf_inputs(path, make_image(color=color), text)
    if bb.is_encoder_decoder:
        inputs["labels"] = target_labels(bb, target)
    with torch.no_grad():
        return inputs, bb.model(**inputs, output_hidden_states=True)


def plain_prompt(bb, color=RED, text=PROMPT, target=TARGET):
    # T5 decodes the target, so its prompt carries one; OPT's parity prompt is the processor's, without.
    prompt = [Image(pix(bb, color)), Text(text)]
    return prompt + [Text(target, target=True)] if bb.is_encoder_decoder else prompt


def test_variant_is_the_loaded_lm(bb, variant):
    assert bb.is_encoder_decoder == (variant == "blip2_t5")
    expected = ("T5Block", ("q", "k", "v", "o")) if bb.is_encoder_decoder else (
        "OPTDecoderLayer", ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert (bb.decoder_layer_cls.__name__, bb.lora_target_modules) == expected
    assert bb.image_tokens_per_image == tiny.NUM_QUERY_TOKENS


def test_parity_with_hf_forward(bb, tiny_dirs, variant):
    inputs, ref = hf_reference(bb, tiny_dirs[variant])
    batch = bb.assemble([plain_prompt(bb)])
    with torch.no_grad():
        out = bb(batch, with_loss=bb.is_encoder_decoder)
        hidden = bb.hidden_states(batch)
    # the adapter's inputs_embeds path vs HF's input_ids path: fp32 reordering noise only (tiny_models/numerics.py)
    assert_fp32_close(out.logits, ref.logits)
    n, ids = tiny.NUM_QUERY_TOKENS, inputs["input_ids"][0]
    table = bb.model.get_input_embeddings().weight
    # The processor writes the image tokens first; the spans say where the caller's segments went.
    assert ids[:n].eq(bb.model.config.image_token_index).all() and batch.spans[0][0] == (0, n)
    if bb.is_encoder_decoder:
        # T5: [image][text][EOS] in the encoder, the target as decoder labels; hidden states are the encoder's.
        assert ids[-1] == bb.eos_token_id and batch.spans[0][1] == (n, len(ids) - 1)
        torch.testing.assert_close(batch.inputs_embeds[0, -1], table[bb.eos_token_id])
        assert torch.equal(batch.labels, inputs["labels"])
        assert_fp32_close(out.loss, ref.loss)
        assert_fp32_close(hidden[-1], ref.language_model_outputs.encoder_last_hidden_state)
        assert len(hidden) == bb.num_layers + 1
    else:
        # OPT: [image][BOS = </s>][text], BOS right after the image as BLIP-2-OPT was trained.
        assert ids[n] == bb.bos_token_id == bb.eos_token_id and batch.spans[0][1] == (n + 1, len(ids))
        torch.testing.assert_close(batch.inputs_embeds[0, n], table[bb.bos_token_id])
        assert_fp32_close(hidden[-1], ref.language_model_outputs.hidden_states[-1])
        assert len(hidden) == bb.num_layers + 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_unpadded(bb, padding_side):
    short = [Image(pix(bb, BLUE)), Text("what shape")] + ([Text("a blue circle", target=True)]
                                                          if bb.is_encoder_decoder else [])
    long = [Text("a red circle on the left ."), Image(pix(bb)), Text(PROMPT)] + (
        [Text("red", target=True)] if bb.is_encoder_decoder else [])
    with torch.no_grad():
        both = bb.assemble([long, short], padding_side=padding_side)
        alone = bb.assemble([short], padding_side=padding_side)
        pad = both.inputs_embeds.shape[1] - alone.inputs_embeds.shape[1]
        assert pad > 0
        real = slice(pad, None) if padding_side == "left" else slice(0, -pad)
        assert both.attention_mask[1, real].all() and not both.attention_mask[1].all()
        if bb.is_encoder_decoder:
            # Padding is in the encoder; the decoder logits of the short prompt's target must not move. The long
            # prompt's target is shorter, so the decoder labels are right padded too.
            assert both.labels.shape[1] == alone.labels.shape[1] and (both.labels[0] == IGNORE_INDEX).any()
            # padded vs unpadded: the same values through matmuls of other shapes (tiny_models/numerics.py)
            assert_fp32_close(bb(both).logits[1], bb(alone).logits[0])
        else:
            assert_fp32_close(bb(both).logits[1, real], bb(alone).logits[0])
        # every span of the short prompt moves by the padding, nothing else
        shift = pad if padding_side == "left" else 0
        assert both.spans[1] == [(s + shift, e + shift) for s, e in alone.spans[0]]



@pytest.mark.parametrize("mistake", ["unmasked pad", "wrong token", "swapped positions"])
def test_real_mismatch_fails_by_orders_of_magnitude(bb, mistake):
    """The fp32 tolerance (tiny_models/numerics.py) absorbs reordering noise, never a real bug: each mistake an
    adapter could make moves the short prompt's logits by over 100 times that tolerance."""
    short = [Image(pix(bb, BLUE)), Text("what shape is the circle")] + (
        [Text("a blue circle", target=True)] if bb.is_encoder_decoder else [])
    long = [Text("a red circle on the left ."), Image(pix(bb)), Text(PROMPT)] + (
        [Text("red", target=True)] if bb.is_encoder_decoder else [])
    with torch.no_grad():
        both = bb.assemble([long, short], padding_side="left")
        ref = bb(both).logits[1]
        embeds, mask = both.inputs_embeds.clone(), both.attention_mask.clone()
        start, end = both.spans[1][1]  # the short prompt's text positions
        assert end - start >= 3
        if mistake == "unmasked pad":
            mask[1, 0] = 1  # the first (left) pad position attended to
        elif mistake == "wrong token":
            embeds[1, start + 1] = bb.model.get_input_embeddings().weight[bb.eos_token_id]
        else:
            embeds[1, [start, start + 1]] = embeds[1, [start + 1, start]]  # two words in each other's place
        wrong = bb(dataclasses.replace(both, inputs_embeds=embeds, attention_mask=mask)).logits[1]
    assert max_diff(wrong, ref) > 100 * fp32_atol(ref)

def test_aim_reads_demo_text_positions_and_trains_projector_only(bb, tiny_dirs, variant):
    demo_text = "a blue circle on the left ."
    reader = DemoReader(bb)
    demo = reader.read([pix(bb, BLUE), pix(bb, GREEN)], [demo_text, "a green square"])
    n_text = len(bb.tokenize([demo_text])[0])
    assert demo[0].shape == (n_text, bb.hidden_size)
    # The demo's text positions in the HF model's own run: OPT after [image][BOS]; T5 in the encoder, before EOS.
    _, ref = hf_reference(bb, tiny_dirs[variant], color=BLUE, text=demo_text)
    n = tiny.NUM_QUERY_TOKENS
    if bb.is_encoder_decoder:
        expected = ref.language_model_outputs.encoder_last_hidden_state[0, n:-1]
    else:
        expected = ref.language_model_outputs.hidden_states[-1][0, n + 1 :]
    assert_fp32_close(demo[0], expected)

    projector = FusedTokenProjector(bb.hidden_size, bb.hidden_size)
    fused = [projector(h) for h in demo]
    prompt = build_prompt("fused", pix(bb), PROMPT, fused_demos=fused, target="red")
    batch = bb.assemble([prompt])
    assert [e - s for s, e in batch.spans[0][:2]] == [h.shape[0] for h in demo]  # a fused token per text token
    loss = bb(batch, with_loss=True).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in bb.parameters())


def test_aim_with_zero_demos_is_the_plain_prompt(bb):
    img = pix(bb)
    zero = build_prompt("fused", img, PROMPT, fused_demos=[], target="red")
    plain = [Image(img), Text(PROMPT), Text("red", target=True)]
    with torch.no_grad():
        a, b = bb(bb.assemble([zero]), with_loss=True), bb(bb.assemble([plain]), with_loss=True)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)


def test_vanilla_icl_with_demo_images_and_text_only_demos(bb, caplog):
    demos = dict(demo_images=[pix(bb, BLUE), pix(bb, GREEN)], demo_texts=["a blue circle", "a green square"])
    n = tiny.NUM_QUERY_TOKENS
    bb._logged_multi_image = False
    with caplog.at_level(logging.INFO, logger="mmict.backbones.blip2"):
        images = bb.assemble([build_prompt("images", pix(bb), PROMPT, target="red", **demos)] * 2)
        bb.assemble([build_prompt("images", pix(bb), PROMPT, target="red", **demos)])
    # several images per prompt: allowed, noted once
    assert sum("several images" in r.getMessage() for r in caplog.records) == 1
    text = bb.assemble([build_prompt("text", pix(bb), PROMPT, target="red", demo_texts=demos["demo_texts"])])
    spans = images.spans[0]
    assert [e - s for s, e in (spans[0], spans[2], spans[4])] == [n, n, n]  # three images, n queries each
    table = bb.model.get_input_embeddings().weight
    n_demo = len(bb.tokenize(["a blue circle "])[0])
    if bb.is_encoder_decoder:
        assert spans[1][0] == n and text.spans[0][0] == (0, n_demo)  # no BOS in T5
    else:
        # OPT: BOS after the leading demo image; with text-only demos the prompt starts with BOS.
        assert spans[1][0] == n + 1 and text.spans[0][0] == (1, 1 + n_demo)
        torch.testing.assert_close(images.inputs_embeds[0, n], table[bb.bos_token_id])
        torch.testing.assert_close(text.inputs_embeds[0, 0], table[bb.bos_token_id])
    with torch.no_grad():
        for batch in (images, text):
            assert torch.isfinite(bb(batch, with_loss=True).loss)


def test_generate_matches_hf_greedy(bb, tiny_dirs, variant):
    inputs = tiny.hf_inputs(tiny_dirs[variant], make_image(), PROMPT)
    ref = bb.model.generate(**inputs, do_sample=False, max_new_tokens=5)
    # HF returns OPT's prompt ids before the new tokens, and T5's decoder start token first.
    ref_new = ref[:, 1:] if bb.is_encoder_decoder else ref[:, inputs["input_ids"].shape[1] :]
    query = [Image(pix(bb)), Text(PROMPT)]
    mine = bb.generate_ids(bb.assemble([query], padding_side="left"), max_new_tokens=5)
    mine_new = mine[:, 1:] if bb.is_encoder_decoder else mine
    assert ref_new.shape[1] > 1 and len(set(ref_new[0].tolist())) > 1  # a real sequence, not one repeated token
    assert torch.equal(mine_new, ref_new)
    # In a left-padded batch (OPT: positions extended by generate) the query decodes the same.
    other = [Text("a red circle on the left ."), Image(pix(bb, BLUE)), Text("what shape is it ?")]
    texts = bb.generate([other, query], max_new_tokens=5)
    assert all(isinstance(t, str) for t in texts)
    assert texts[1] == bb.tokenizer.decode(ref_new[0], skip_special_tokens=True).strip()


def test_t5_decoder_labels_and_loss(bb):
    if not bb.is_encoder_decoder:
        pytest.skip("encoder-decoder only")
    img = pix(bb)
    # The target must come last: the decoder produces it after reading the whole encoder input.
    with pytest.raises(ValueError, match="must come last"):
        bb.assemble([[Image(img), Text("red", target=True), Text(PROMPT)]])
    batch = bb.assemble([[Image(img), Text(PROMPT), Text("a red", target=True), Text("square", target=True)],
                         [Image(img), Text(PROMPT)]])
    ids = bb.tokenize(["a red", "square"])
    assert batch.labels[0].tolist() == ids[0] + [bb.eos_token_id] + ids[1] + [bb.eos_token_id]
    assert batch.labels[1].eq(IGNORE_INDEX).all()
    end = batch.spans[0][1][1] + 1  # after the encoder EOS
    assert batch.spans[0][2:] == [(end, end), (end, end)]  # targets take no encoder positions
    with torch.no_grad():
        out = bb(batch, with_loss=True)
        # the loss is the mean cross-entropy over the target tokens (the second prompt has none)
        manual = torch.nn.functional.cross_entropy(out.logits[0], batch.labels[0])
        torch.testing.assert_close(out.loss, manual)
        # without any target, one decoder step: the first answer token's logits
        first = bb(bb.assemble([[Image(img), Text(PROMPT)]])).logits
    assert first.shape[1] == 1
    # one decoder step vs the same step inside a longer decode: other matmul shapes (tiny_models/numerics.py)
    assert_fp32_close(first[0, 0], out.logits[0, 0])
    with pytest.raises(ValueError, match="needs a target"):
        bb(bb.assemble([[Image(img), Text(PROMPT)]]), with_loss=True)


def test_lora_targets_are_lm_linears(tiny_dirs, variant):
    from mmict.backbones.lora import add_lora

    bb = load_backbone("blip2", str(tiny_dirs[variant]))  # a fresh copy: adapters change the model
    n = add_lora(bb, r=2)
    assert n > 0
    adapted = {name.rsplit(".", 1)[0] for name, _ in bb.model.named_parameters() if "lora_A" in name}
    assert adapted and all(name.startswith("language_model.") for name in adapted)  # never vision or Q-Former
    hit = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name in adapted}
    assert hit == set(bb.lora_target_modules)
    # only the adapters train
    assert {name for name, p in bb.model.named_parameters() if p.requires_grad} == {
        name for name, _ in bb.model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_t5_decoder_deeper_than_encoder_generates(tmp_path, num_beams):
    """transformers 5.25 sizes generate's cache by the encoder depth (IndexError on a deeper decoder); the adapter
    passes a cache that grows per layer, and generates what the model generates without any cache."""
    bb = load_backbone("blip2", str(tiny.save_tiny(tmp_path / "deep", variant="blip2_t5", decoder_layers=3)))
    assert bb.t5_decoder_deeper_than_encoder and bb.num_layers == 2
    batch = bb.assemble([[Image(pix(bb)), Text(PROMPT)], [Image(pix(bb, BLUE)), Text("what shape")]],
                        padding_side="left")
    mine = bb.generate_ids(batch, max_new_tokens=5, num_beams=num_beams)
    with torch.no_grad():
        uncached = bb.language_model.generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=5,
            num_beams=num_beams, do_sample=False, use_cache=False, pad_token_id=bb.pad_token_id,
            eos_token_id=bb.eos_token_id)
    assert mine.shape[1] > 2 and torch.equal(mine, uncached)


def test_processor_with_image_token_stored_as_string(tmp_path, tiny_dirs):
    """A tokenizer that stores `image_token` as a str breaks transformers 5.25's Blip2Processor; mmict's
    `load_processor` gives the ids the processor gives with a tokenizer that stores none."""
    from mmict.backbones.blip2 import load_processor

    path = tiny.save_tiny(tmp_path / "str_token", variant="blip2", image_token_as_string=True)
    got = load_processor(str(path))(images=make_image(), text=PROMPT, return_tensors="pt")["input_ids"]
    assert isinstance(load_processor(str(path)).tokenizer.image_token, str)  # the case being guarded
    expected = tiny.hf_inputs(tiny_dirs["blip2"], make_image(), PROMPT)["input_ids"]
    assert torch.equal(got, expected)
    image_id = load_backbone("blip2", str(path)).model.config.image_token_index
    assert got[0, : tiny.NUM_QUERY_TOKENS].eq(image_id).all() and not got[0, tiny.NUM_QUERY_TOKENS:].eq(image_id).any()
