"""Qwen2-VL and Qwen2.5-VL adapters: parity with the HF model on processor inputs, dynamic resolution,
multimodal rotary positions (M-RoPE) for fused/ICL prompts, generation, AIM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from tiny_models import save_tiny
from tiny_models.qwen2_vl import hf_inputs
from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList

from mmict.backbones import load_backbone
from mmict.methods.aim.reader import DemoReader, FusedTokenProjector
from mmict.prompts import build_prompt
from mmict.segments import Embeds, Image, Text

VARIANTS = ("qwen2_vl", "qwen2_5_vl")
PROMPT = "what color is the shape ?"
ATOL = 1e-5


def picture(size: tuple[int, int], color: tuple[int, int, int]) -> PILImage.Image:
    """A coloured block on grey: not uniform, so a wrong patch order or grid changes the features."""
    image = PILImage.new("RGB", size, (120, 120, 120))
    w, h = size
    image.paste(PILImage.new("RGB", (w // 2, h // 2), color), (w // 4, h // 5))
    return image


RED = picture((32, 24), (200, 30, 30))  # grid (1, 6, 8): 12 image tokens, text resumes 4 positions on
BLUE = picture((24, 40), (30, 30, 200))  # grid (1, 10, 6): 15 image tokens
GREEN = picture((32, 32), (30, 200, 30))  # grid (1, 8, 8): 16 image tokens


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tmp_path_factory) -> tuple[Path, object]:
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return path, load_backbone(request.param, str(path))


def processor_inputs(path: Path, images: list[PILImage.Image], text: str) -> dict:
    """The family's processor on a prompt where every <|image_pad|> is one image."""
    processor = AutoProcessor.from_pretrained(str(path))
    return dict(processor(images=images or None, text=[text], return_tensors="pt"))


SLOT = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in the processor's text (pad expanded by it)


class Recorder(LogitsProcessor):
    """Keeps every step's scores and leaves them unchanged."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.clone())
        return scores


def test_plain_prompt_parity(tiny):
    path, bb = tiny
    ref = bb.model(**hf_inputs(path, RED, PROMPT)).logits
    out = bb(bb.assemble([[Image(bb.image_transform(RED)), Text(PROMPT)]])).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)


def test_image_layout_and_mixed_sizes_in_one_batch(tiny):
    _, bb = tiny
    red, blue = bb.image_transform(RED), bb.image_transform(BLUE)
    assert red["image_grid_thw"].tolist() == [1, 6, 8] and blue["image_grid_thw"].tolist() == [1, 10, 6]
    embeds = bb.embed_images([bb.to_model(red), bb.to_model(blue)])
    assert [e.shape[0] for e in embeds] == [12 + 2, 15 + 2]  # merged tokens + <|vision_start|>, <|vision_end|>
    table = bb.model.get_input_embeddings().weight
    torch.testing.assert_close(embeds[0][0], table[bb.model.config.vision_start_token_id])
    torch.testing.assert_close(embeds[1][-1], table[bb.model.config.vision_end_token_id])
    # one vision-tower call over both sizes gives what each image gives alone (no attention across images)
    torch.testing.assert_close(embeds[1], bb.embed_images([bb.to_model(blue)])[0], atol=ATOL, rtol=ATOL)
    prompts = [[Image(red), Text(PROMPT)], [Text("a blue square ."), Image(blue), Text("what color")]]
    for side in ("left", "right"):
        both = bb.assemble(prompts, padding_side=side)
        for b, prompt in enumerate(prompts):
            alone = bb.assemble([prompt])
            real = both.attention_mask[b].bool()
            assert torch.equal(both.position_ids[:, b, real], alone.position_ids[:, 0])
            torch.testing.assert_close(bb(both).logits[b, real], bb(alone).logits[0], atol=ATOL, rtol=ATOL)


def test_fused_prompt_positions_follow_mrope(tiny):
    """[Embeds(fused), Image, Text] is placed as the processor's "<fused words><image>text" would be: the
    fused tokens are text positions, and after the image positions jump as M-RoPE says."""
    path, bb = tiny
    words = "a red circle on the left ."
    ids = bb.tokenize([words])[0]
    fused = bb.embed_tokens(torch.tensor(ids))  # fused tokens that are exactly those words' embeddings
    batch = bb.assemble([[Embeds(fused), Image(bb.image_transform(RED)), Text(PROMPT)]])
    inputs = processor_inputs(path, [RED], words + SLOT + PROMPT)
    assert inputs["input_ids"].shape[1] == batch.inputs_embeds.shape[1]
    ref, _ = bb.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                           image_grid_thw=inputs["image_grid_thw"],
                                           attention_mask=inputs["attention_mask"])
    assert torch.equal(batch.position_ids[1:], ref)
    assert batch.position_ids[0, 0].tolist() == list(range(batch.inputs_embeds.shape[1]))  # text row: a count
    # the first text token after the image tokens (<|vision_end|>) sits at start + max(6, 8) / 2, not start + 12
    start = len(ids) + 1  # index and position of the first image token (after the fused words and <|vision_start|>)
    after = start + 12
    assert batch.position_ids[1:, 0, after].tolist() == [start + 4] * 3 != [after] * 3
    # the same as HF's own forward (it computes M-RoPE itself) on that token sequence
    ref_logits = bb.model(**inputs).logits
    torch.testing.assert_close(bb(batch).logits, ref_logits, atol=ATOL, rtol=ATOL)
    # the 4-row form is what HF's generate prepares for the same prompt
    hf_positions = bb.model._prepare_position_ids_for_generation(
        inputs["input_ids"], {k: v for k, v in inputs.items() if k != "pixel_values"})
    bb.model.model.rope_deltas = None
    assert torch.equal(batch.position_ids, hf_positions)


def test_vanilla_icl_with_two_demo_images_matches_processor(tiny):
    path, bb = tiny
    images = [bb.image_transform(im) for im in (RED, BLUE, GREEN)]
    texts = ["a red square .", "a blue circle ."]
    prompt = build_prompt("images", images[2], PROMPT, demo_images=images[:2], demo_texts=texts)
    batch = bb.assemble([prompt])
    inputs = processor_inputs(path, [RED, BLUE, GREEN], f"{SLOT}{texts[0]} {SLOT}{texts[1]} {SLOT}{PROMPT}")
    ref = bb.model(**inputs).logits
    torch.testing.assert_close(bb(batch).logits, ref, atol=ATOL, rtol=ATOL)
    # text-only demos: a text prefix, then the query image
    text_prompt = build_prompt("text", images[2], PROMPT, demo_texts=texts)
    text_inputs = processor_inputs(path, [GREEN], f"{texts[0]} {texts[1]} {SLOT}{PROMPT}")
    torch.testing.assert_close(bb(bb.assemble([text_prompt])).logits, bb.model(**text_inputs).logits,
                               atol=ATOL, rtol=ATOL)
    # and a prompt with no image at all gets plain positions on every row
    plain = bb.assemble([[Text(texts[0])]])
    assert (plain.position_ids == torch.arange(plain.inputs_embeds.shape[1])).all()


def test_left_padding_gives_same_positions_and_logits(tiny):
    _, bb = tiny
    short = [Image(bb.image_transform(RED)), Text("what shape")]
    long = [Text("a blue square on the left ."), Image(bb.image_transform(GREEN)), Text(PROMPT)]
    both = bb.assemble([long, short], padding_side="left")
    alone = bb.assemble([short], padding_side="left")
    pad = both.inputs_embeds.shape[1] - alone.inputs_embeds.shape[1]
    assert pad > 0 and both.attention_mask[1, :pad].eq(0).all()
    assert torch.equal(both.position_ids[:, 1, pad:], alone.position_ids[:, 0])
    torch.testing.assert_close(bb(both).logits[1, pad:], bb(alone).logits[0], atol=ATOL, rtol=ATOL)


def test_greedy_generation_matches_hf_step_by_step(tiny, monkeypatch):
    """Same tokens and same scores at every step as HF generate on processor inputs, also for a
    left-padded batch of two image sizes: decoding continues the M-RoPE positions as HF does."""
    path, bb = tiny
    prompts = [[Image(bb.image_transform(RED)), Text(PROMPT)],
               [Text("a blue square ."), Image(bb.image_transform(BLUE)), Text("what color")]]
    hf_texts = [SLOT + PROMPT, "a blue square ." + SLOT + "what color"]
    n_new = 6
    refs = []
    for image, text in zip((RED, BLUE), hf_texts):
        inputs, rec = processor_inputs(path, [image], text), Recorder()
        out = bb.model.generate(**inputs, do_sample=False, max_new_tokens=n_new,
                                logits_processor=LogitsProcessorList([rec]))
        refs.append((out[0, inputs["input_ids"].shape[1]:], torch.stack(rec.steps)[:, 0]))
    # HF generate left its batch-of-one rope_deltas on the model; they must not leak into ours
    assert bb.model.model.rope_deltas is not None

    decoded: list[list[int]] = []
    real_decode = bb.tokenizer.batch_decode

    def spy(ids, **kw):
        decoded.extend(ids.tolist())
        return real_decode(ids, **kw)

    monkeypatch.setattr(bb.tokenizer, "batch_decode", spy)
    rec = Recorder()
    texts = bb.generate(prompts, max_new_tokens=n_new, logits_processor=LogitsProcessorList([rec]))
    assert bb.model.model.rope_deltas is None
    scores = torch.stack(rec.steps)
    for b, (ref_ids, ref_scores) in enumerate(refs):
        n = len(ref_ids)
        assert decoded[b][:n] == ref_ids.tolist()
        assert texts[b] == real_decode([ref_ids.tolist()], skip_special_tokens=True)[0].strip()
        torch.testing.assert_close(scores[:n, b], ref_scores, atol=1e-4, rtol=1e-4)


def test_stale_rope_deltas_change_nothing(tiny):
    _, bb = tiny
    batch = bb.assemble([[Image(bb.image_transform(RED)), Text(PROMPT)]], padding_side="left")
    clean = bb(batch).logits
    first = bb.generate_from(batch, max_new_tokens=4)
    bb.model.model.rope_deltas = torch.tensor([[57]])
    torch.testing.assert_close(bb(batch).logits, clean)
    bb.model.model.rope_deltas = torch.tensor([[57]])
    assert bb.generate_from(batch, max_new_tokens=4) == first


def test_aim_forward_backward_trains_projector_only(tiny):
    _, bb = tiny
    reader = DemoReader(bb)
    demo_images = [bb.image_transform(RED), bb.image_transform(BLUE)]
    hidden = reader.read(demo_images, ["a red square .", "a blue circle on the left ."])
    assert [h.shape[0] for h in hidden] == [len(ids) for ids in bb.tokenize(["a red square .",
                                                                             "a blue circle on the left ."])]
    projector = FusedTokenProjector(bb.hidden_size, bb.hidden_size)
    prompt = build_prompt("fused", bb.image_transform(GREEN), PROMPT, fused_demos=[projector(h) for h in hidden],
                          target="green")
    loss = bb(bb.assemble([prompt]), with_loss=True).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in bb.parameters())


def test_aim_with_zero_demos_is_the_plain_prompt(tiny):
    _, bb = tiny
    query = bb.image_transform(GREEN)
    fused = bb.assemble([build_prompt("fused", query, PROMPT, fused_demos=[])])
    plain = bb.assemble([[Image(query), Text(PROMPT)]])
    assert torch.equal(fused.position_ids, plain.position_ids)
    torch.testing.assert_close(bb(fused).logits, bb(plain).logits)


def test_family_hooks(tiny):
    _, bb = tiny
    lm = bb.model.model.language_model
    assert bb.num_layers == len(lm.layers) and bb.decoder_layer_cls is type(lm.layers[0])
    hidden = torch.randn(1, 3, bb.hidden_size)
    torch.testing.assert_close(bb.final_norm(hidden), lm.norm(hidden))
    # a 224x224 image is resized into the processor's pixel budget: tokens as its grid says, + 2 wrappers
    grid = bb.image_transform(PILImage.new("RGB", (224, 224)))["image_grid_thw"]
    assert bb.image_tokens_per_image == int(grid.prod()) // 4 + 2
    # LoRA targets are LM attention layers only
    targets = {n for n, _ in bb.model.named_modules() if n.rsplit(".", 1)[-1] in bb.lora_target_modules}
    assert targets and all(".language_model." in n and ".self_attn." in n for n in targets)
