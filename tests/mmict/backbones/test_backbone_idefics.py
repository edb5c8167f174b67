"""Idefics2 / Idefics3 adapters against the models' own processors and forward passes (tiny random models).

Parity is checked with and without image splitting (several crops per image vs one) for both families, on
images of different aspect ratios (so Idefics2 crops are padded and Idefics3 grids are not square).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import common, save_tiny
from tiny_models import idefics as tiny_idefics

from mmict.backbones import load_backbone
from mmict.methods.aim.reader import DemoReader, FusedTokenProjector
from mmict.prompts import build_prompt
from mmict.segments import Image, Text

VARIANTS = ["idefics2", "idefics3"]
ATOL = 1e-5
PROMPT = "what color is the shape ?"
TALL, WIDE = (24, 36), (48, 16)  # PIL (width, height): Idefics2 crops of unequal sizes; Idefics3 a 1x2 grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """get(variant, splitting) -> (path, backbone), each saved and loaded once for the module."""
    cache: dict = {}

    def get(variant: str, splitting: bool = True):
        if (variant, splitting) not in cache:
            path = tmp_path_factory.mktemp(f"{variant}_split{int(splitting)}") / "model"
            if splitting:  # the default tiny checkpoint, through the registry every family uses
                save_tiny(variant, path)
            else:
                tiny_idefics.save_tiny(path, variant=variant, image_splitting=False)
            cache[variant, splitting] = path, load_backbone(variant, str(path))
        return cache[variant, splitting]

    return get


def image(size=TALL, color=(200, 40, 40)):
    return common.test_image(size, color)


def hf_logits(bb, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return bb.model(**inputs).logits


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [TALL, WIDE])
def test_single_image_parity_with_hf_processor(tiny, variant, splitting, size):
    path, bb = tiny(variant, splitting)
    pixels = bb.image_transform(image(size))
    inputs = tiny_idefics.hf_inputs(path, image(size), "<image>" + PROMPT)
    # the transform gives this image's share of the processor's crops (splitting: several, else one)
    torch.testing.assert_close(pixels["pixel_values"], inputs["pixel_values"][0])
    assert (pixels["pixel_values"].shape[0] > 1) == splitting
    batch = bb.assemble([[Image(pixels), Text(PROMPT)]])
    assert batch.inputs_embeds.shape[1] == inputs["input_ids"].shape[1]  # same layout length, BOS included
    with torch.no_grad():
        logits = bb(batch).logits
    torch.testing.assert_close(logits, hf_logits(bb, inputs), atol=ATOL, rtol=0)
    # the comparison can fail: another image moves the logits far beyond the tolerance
    with torch.no_grad():
        other = bb(bb.assemble([[Image(bb.image_transform(image(size, (20, 20, 200)))), Text(PROMPT)]])).logits
    assert (other - logits).abs().max() > 1e3 * ATOL


@pytest.mark.parametrize("rows_cols", [(0, 0), (1, 2), (2, 2), (3, 1)])
def test_idefics3_layout_is_the_processors(tiny, rows_cols):
    from transformers import AutoProcessor

    path, bb = tiny("idefics3")
    processor = AutoProcessor.from_pretrained(path)
    rows, cols = rows_cols
    expected = processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
    assert bb.image_layout({"rows": torch.tensor(rows), "cols": torch.tensor(cols)}) == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_tokens_per_image_at_default_size(tiny, variant):
    path, bb = tiny(variant)
    side = bb.image_processor.size["longest_edge"]
    square = image((side, side))
    inputs = tiny_idefics.hf_inputs(path, square, "<image>")
    assert bb.image_tokens_per_image == inputs["input_ids"].shape[1] - 1  # all but BOS
    with torch.no_grad():
        assert bb.embed_images([bb.to_model(bb.image_transform(square))])[0].shape[0] == bb.image_tokens_per_image


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_batched_with_others_embed_as_alone(tiny, variant):
    _, bb = tiny(variant)
    # different crop sizes (Idefics2) and crop counts (Idefics3's 2x2 + global vs 1x2 + global) in one call
    images = [bb.to_model(bb.image_transform(image(size))) for size in (TALL, WIDE, (16, 16))]
    with torch.no_grad():
        together = bb.embed_images(images)
        for img, emb in zip(images, together):
            torch.testing.assert_close(emb, bb.embed_images([img])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_unpadded(tiny, variant):
    _, bb = tiny(variant)
    prompts = [[Image(bb.image_transform(image(TALL))), Text(PROMPT)],
               [Image(bb.image_transform(image(WIDE, (20, 200, 20)))), Text("a red circle")]]
    with torch.no_grad():
        batch = bb.assemble(prompts, padding_side="left")
        logits = bb(batch).logits
        for b, prompt in enumerate(prompts):
            alone = bb(bb.assemble([prompt])).logits[0]
            torch.testing.assert_close(logits[b, -alone.shape[0]:], alone, atol=ATOL, rtol=0)
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()  # the second prompt is padded


@pytest.mark.parametrize("variant", VARIANTS)
def test_aim_forward_backward_trains_projector_only(tiny, variant):
    _, bb = tiny(variant)
    demo_images = [bb.image_transform(image(TALL)), bb.image_transform(image(WIDE, (20, 20, 200)))]
    demo_texts = ["a red circle", "a blue square on the left"]
    hidden = DemoReader(bb).read(demo_images, demo_texts)
    assert [h.shape for h in hidden] == [(len(ids), bb.hidden_size) for ids in bb.tokenize(demo_texts)]
    projector = FusedTokenProjector(bb.hidden_size, bb.hidden_size)
    prompt = build_prompt("fused", bb.image_transform(image(TALL)), PROMPT,
                          fused_demos=[projector(h) for h in hidden], target="red")
    loss = bb(bb.assemble([prompt]), with_loss=True).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in bb.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_aim_with_zero_demos_is_the_plain_forward(tiny, variant):
    _, bb = tiny(variant)
    query = bb.image_transform(image(TALL))
    with torch.no_grad():
        fused = bb(bb.assemble([build_prompt("fused", query, PROMPT, fused_demos=[])])).logits
        plain = bb(bb.assemble([[Image(query), Text(PROMPT)]])).logits
    torch.testing.assert_close(fused, plain, atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vanilla_icl_matches_hf_on_interleaved_prompt(tiny, variant):
    from transformers import AutoProcessor

    path, bb = tiny(variant)
    pil = [image(TALL), image(WIDE, (20, 20, 200)), image((16, 16), (20, 200, 20))]
    demo_texts = ["a red circle", "a blue square on the left"]
    demos = [bb.image_transform(p) for p in pil[:2]]
    query = bb.image_transform(pil[2])
    prompt = build_prompt("images", query, PROMPT, demo_images=demos, demo_texts=demo_texts)
    with torch.no_grad():
        batch = bb.assemble([prompt])
        logits = bb(batch).logits
        image_lengths = [e.shape[0] for e in bb.embed_images([bb.to_model(x) for x in demos + [query]])]
    # the model's own processor on the same interleaved text: all three images expanded in one prompt
    text = "".join(f"<image>{t} " for t in demo_texts) + "<image>" + PROMPT
    inputs = dict(AutoProcessor.from_pretrained(path)(images=pil, text=text, return_tensors="pt"))
    torch.testing.assert_close(logits, hf_logits(bb, inputs), atol=ATOL, rtol=0)
    # text-only demos: same prompt minus the demo images
    text_only = bb.assemble([build_prompt("text", query, PROMPT, demo_texts=demo_texts)])
    assert batch.context_tokens[0] - text_only.context_tokens[0] == sum(image_lengths[:2])
    with torch.no_grad():
        assert torch.isfinite(bb(text_only).logits).all()


@pytest.mark.parametrize("splitting", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_matches_hf_greedy(tiny, variant, splitting, monkeypatch):
    path, bb = tiny(variant, splitting)
    new_tokens: list[torch.Tensor] = []
    hf_generate = bb.model.generate

    def spy(*args, **kwargs):  # the adapter's generated ids, before they are decoded
        new_tokens.append(hf_generate(*args, **kwargs))
        return new_tokens[-1]

    monkeypatch.setattr(bb.model, "generate", spy)
    prompt = [Image(bb.image_transform(image(TALL))), Text(PROMPT)]
    texts = bb.generate([prompt], max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == 1 and isinstance(texts[0], str)
    inputs = tiny_idefics.hf_inputs(path, image(TALL), "<image>" + PROMPT)
    reference = hf_generate(**inputs, do_sample=False, max_new_tokens=6)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(new_tokens[0], reference)
    # in a left-padded batch with a shorter prompt the first prompt generates the same
    other = [Image(bb.image_transform(image(WIDE))), Text("a red")]
    assert bb.generate([prompt, other], max_new_tokens=6) == texts + bb.generate([other], max_new_tokens=6)


@pytest.mark.parametrize(("variant", "layer"), [("idefics2", "MistralDecoderLayer"), ("idefics3", "LlamaDecoderLayer")])
def test_language_model_parts(tiny, variant, layer):
    _, bb = tiny(variant)
    assert bb.decoder_layer_cls.__name__ == layer
    assert sum(isinstance(m, bb.decoder_layer_cls) for m in bb.model.modules()) == bb.num_layers
    lm_names = {name.rsplit(".", 1)[-1] for name, _ in bb.language_model.named_modules()}
    assert set(bb.lora_target_modules) <= lm_names
    vision = {id(p) for p in bb.model.model.vision_model.parameters()}
    assert not vision & {id(p) for p in bb.language_model.parameters()}  # LoRA never reaches the vision tower
    last_layer: list[torch.Tensor] = []
    hook = bb.language_model.layers[-1].register_forward_hook(
        lambda module, args, out: last_layer.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        states = bb.hidden_states(bb.assemble([[Image(bb.image_transform(image())), Text(PROMPT)]]))
    hook.remove()
    assert len(states) == bb.num_layers + 1 and states[-1].shape[-1] == bb.hidden_size
    # the final state is the last decoder layer's output through the LM's final norm, which final_norm is
    torch.testing.assert_close(bb.final_norm(last_layer[0]), states[-1])
