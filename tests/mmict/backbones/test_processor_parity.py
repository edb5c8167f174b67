"""Prompts tokenised the way each family's processor tokenises them, on tiny checkpoints whose tokenizers are of
the kinds the real ones are (`tiny_models.real_tokenizers`: SentencePiece Llama with legacy=False for LLaVA,
LLaVA-NeXT and Idefics2; byte-level BPE for Qwen2-VL, Idefics3 and BLIP-2's OPT; SentencePiece unigram for Flan-T5)
and the real checkpoints' chat templates (`tiny_models.chat_templates`).

The adapter's ids (`Assembled.input_ids`, with each image span filled with the ids the family's processor writes for
that image) must equal the processor's `input_ids` for the same prompt: the text ids, and where each image's span
starts and how long it is."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_MODULES, save_tiny
from tiny_models.chat_templates import TEMPLATES
from tiny_models.common import test_image as make_image
from tiny_models.numerics import assert_fp32_close

from mmict.backbones import IGNORE_INDEX, load_backbone
from mmict.segments import Embeds, Image, Text

VARIANTS = sorted(FAMILY_MODULES)
INLINE = [v for v in VARIANTS if not v.startswith("blip2")]  # processors that read an image token in the text
FAMILY = {"blip2_t5": "blip2"}
SENTENCEPIECE = {"llava", "llava_next", "idefics2"}
IMG = object()  # where an image goes in a case
SIZES = [(24, 24), (40, 24), (20, 36)]
CASES = {
    "text-image-text": ["a red circle on the left.", IMG, "what color is the shape?"],
    "image-first": [IMG, "what shape is this? Short answer:"],
    "two images": ["Question: what is it?", IMG, " a dog", IMG, "\nthe answer is"],
    "adjacent images": [IMG, IMG, "describe the image in one word."],
}
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """get(variant) -> (backbone, its processor), saved with a real-kind tokenizer and chat template once."""
    from transformers import AutoProcessor

    from mmict.backbones.blip2 import load_processor

    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            path = save_tiny(variant, tmp_path_factory.mktemp(variant) / "model", tokenizer="real",
                             chat_template=variant in TEMPLATES)
            processor = load_processor(str(path)) if variant.startswith("blip2") else AutoProcessor.from_pretrained(
                path)
            cache[variant] = load_backbone(FAMILY.get(variant, variant), str(path)), processor
        return cache[variant]

    return get


def placeholder(variant: str) -> str:
    """What a user writes for an image in the processor's text (Qwen: as its chat template writes an image;
    BLIP-2: nothing, its processor puts the image's tokens in front of the text)."""
    if variant.startswith("blip2"):
        return ""
    return "<|vision_start|><|image_pad|><|vision_end|>" if variant.startswith("qwen") else "<image>"


def image_ids(bb, pixels, rows: int) -> list[int]:
    """The ids the family's processor writes for one image that takes `rows` positions in the adapter's prompt."""
    if bb.family.startswith("qwen"):
        return [bb.config.vision_start_token_id] + [bb.config.image_token_id] * (rows - 2) + [
            bb.config.vision_end_token_id]
    if bb.family.startswith("idefics"):  # wrappers, row/col tags and "\n" around the <image> tokens
        return bb._layout_ids(bb.image_layout(pixels))[-rows:]  # an Idefics2 image after another shares its <fake>
    return [bb.model.config.image_token_id if bb.family != "blip2" else bb.config.image_token_index] * rows


def adapter_ids(bb, prompt, batch=None) -> list[int]:
    """The adapter's ids for `prompt`: `Assembled.input_ids`, image spans filled as the processor fills them.
    Checks that the assembled embeddings at token rows are the embedding table's rows of those ids."""
    batch = batch or bb.assemble([prompt])
    ids = batch.input_ids[0].clone()
    tokens = ids.ge(0) & batch.attention_mask[0].bool()
    table = bb.model.get_input_embeddings().weight
    assert torch.equal(batch.inputs_embeds[0, tokens], table[ids[tokens]])
    ids = ids.tolist()
    for seg, (start, end) in zip(prompt, batch.spans[0]):
        if isinstance(seg, Image):
            ids[start:end] = image_ids(bb, seg.pixels, end - start)
    return ids


def build(bb, variant: str, case: list) -> tuple[list, str, list]:
    """(the adapter's prompt, the processor's text, its images) for a case."""
    images = [make_image(SIZES[i % len(SIZES)]) for i in range(sum(part is IMG for part in case))]
    it = iter(images)
    prompt = [Image(bb.image_transform(next(it))) if part is IMG else Text(part) for part in case]
    text = "".join(placeholder(variant) if part is IMG else part for part in case)
    return prompt, text, images


def processor_ids(processor, text: str, images: list) -> list[int]:
    return processor(images=images or None, text=text)["input_ids"][0]


def tokens(bb, ids: list[int]) -> list[str]:
    return bb.tokenizer.convert_ids_to_tokens([i for i in ids if i >= 0])


# ---- the tiny tokenizers are of the real kinds -------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_tokenizers_are_the_real_kinds(tiny, variant):
    bb, _ = tiny(variant)
    pre = str(bb.tokenizer.backend_tokenizer.pre_tokenizer)
    if variant in SENTENCEPIECE:
        assert "Metaspace" in pre and "prepend_scheme=first" in pre  # legacy=False
        assert tokens(bb, bb.tokenize(["what"])[0]) == ["▁what"]  # the first word of a string gets "▁" ...
        after = bb.tokenizer("<image>what", add_special_tokens=False)["input_ids"][1:]
        assert not tokens(bb, after)[0].startswith("▁")  # ... a word right after a special token none
    elif variant == "blip2_t5":
        assert "WhitespaceSplit" in pre and "prepend_scheme=always" in pre
    else:
        assert "ByteLevel" in pre


# ---- [text, image, text] prompts: the processor's ids ------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", INLINE)
def test_prompt_ids_equal_the_processors(tiny, variant, case):
    bb, processor = tiny(variant)
    prompt, text, images = build(bb, variant, CASES[case])
    expected = processor_ids(processor, text, images)
    got = adapter_ids(bb, prompt)
    assert got == expected, (tokens(bb, got), tokens(bb, expected))


@pytest.mark.parametrize("variant", INLINE)
def test_logits_equal_the_models_forward_on_the_processors_inputs(tiny, variant):
    bb, processor = tiny(variant)
    prompt, text, images = build(bb, variant, CASES["two images"])
    with torch.no_grad():
        mine = bb(bb.assemble([prompt])).logits
        theirs = bb.model(**processor(images=images, text=text, return_tensors="pt")).logits
    assert_fp32_close(mine, theirs)  # other matmul shapes, same values (tiny_models/numerics.py)


@pytest.mark.parametrize("variant", ["blip2", "blip2_t5"])
@pytest.mark.parametrize("text", [QUESTION, "Question: what shape is this? Short answer:"])
def test_blip2_prompt_ids_equal_the_processors(tiny, variant, text):
    """Blip2Processor puts the query tokens in front of the text it tokenises (OPT: BOS first; T5: EOS last)."""
    bb, processor = tiny(variant)
    image = make_image()
    prompt = [Image(bb.image_transform(image)), Text(text)]
    assert adapter_ids(bb, prompt) == processor_ids(processor, text, [image])


def test_old_per_segment_tokenisation_differed_on_sentencepiece(tiny):
    """The bug: each text tokenised alone gets a "▁" (or another first piece) after every image."""
    bb, processor = tiny("llava")
    prompt, text, images = build(bb, "llava", CASES["text-image-text"])
    expected = processor_ids(processor, text, images)
    n = bb.image_token_count(prompt[1].pixels)
    old = [bb.bos_token_id, *bb.tokenize([prompt[0].text])[0], *[bb.config.image_token_id] * n,
           *bb.tokenize([prompt[2].text])[0]]
    assert old != expected
    after_image = expected[expected.index(bb.config.image_token_id) + n]
    assert tokens(bb, old[len(old) - len(bb.tokenize([prompt[2].text])[0]):])[0] == "▁what"
    assert not tokens(bb, [after_image])[0].startswith("▁")
    assert adapter_ids(bb, prompt) == expected


@pytest.mark.parametrize("variant", ["qwen2_vl", "idefics3", "blip2", "blip2_t5"])
def test_byte_level_and_t5_tokenisation_was_unaffected(tiny, variant):
    """Byte-level BPE (no prefix space) and T5 (a "▁" before every word anyway) tokenise text after an image as
    alone: per-segment tokenisation gave the same text ids there (adjacent texts may still merge pieces)."""
    bb, _ = tiny(variant)
    for case in ([IMG, "what color is the shape?"], ["a red circle.", IMG, " a dog", IMG, "\nthe answer is"]):
        prompt, _, _ = build(bb, "qwen2_vl" if variant.startswith("qwen") else variant, case)
        texts = [seg.text for seg in prompt if isinstance(seg, Text)]
        assert [ids for ids in bb.segment_token_ids([prompt])[0] if ids is not None] == bb.tokenize(texts)


# ---- chat templates: rendered by the template, tokenised as the processor tokenises it -------------------------
def chat_ids(processor, content: list, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    out = processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"][0])


@pytest.mark.parametrize("variant", INLINE)
def test_chat_wrapped_query_equals_the_processors_chat_template(tiny, variant):
    bb, processor = tiny(variant)
    image = make_image((40, 24))
    query = bb.wrap_query([Image(bb.image_transform(image)), Text(QUESTION)])
    expected = chat_ids(processor, [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}])
    got = adapter_ids(bb, query)
    assert got == expected, (tokens(bb, got), tokens(bb, expected))
    if variant.startswith("llava"):  # "<image>\n": the template's newline after the image is kept
        assert Text("\n") in query


@pytest.mark.parametrize("variant", INLINE)
def test_chat_target_is_the_assistant_answer(tiny, variant):
    """The target's tokens are the answer's in the template's full conversation (LLaVA, Idefics: " red" after the
    generation prompt), and the context stays the generation prompt's tokens."""
    bb, processor = tiny(variant)
    image = make_image()
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    prompt = bb.wrap_query([Image(bb.image_transform(image)), Text(QUESTION), Text("red", target=True)])
    batch = bb.assemble([prompt])
    ids, labels = adapter_ids(bb, prompt, batch), batch.labels[0].tolist()
    context, answer = chat_ids(processor, content), chat_ids(processor, content, "red")
    target = [i for i in labels if i != IGNORE_INDEX]
    assert target[-1] == bb.eos_token_id and labels[len(context):] == target
    assert ids[: len(context)] == context and answer[: len(context)] == context
    assert target[:-1] == answer[len(context) : len(context) + len(target) - 1]


@pytest.mark.parametrize("variant", ["qwen2_vl", "idefics2", "idefics3"])
def test_interleaved_chat_prompt_equals_the_processors_where_the_template_keeps_order(tiny, variant):
    bb, processor = tiny(variant)
    images = [make_image(size) for size in SIZES]
    demos = ["a red circle. ", "a blue square. "]
    prompt = bb.wrap_query([Image(bb.image_transform(images[0])), Text(demos[0]), Image(bb.image_transform(images[1])),
                            Text(demos[1]), Image(bb.image_transform(images[2])), Text(QUESTION)])
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": demos[0]},
               {"type": "image", "image": images[1]}, {"type": "text", "text": demos[1]},
               {"type": "image", "image": images[2]}, {"type": "text", "text": QUESTION}]
    assert adapter_ids(bb, prompt) == chat_ids(processor, content)


@pytest.mark.parametrize("variant", ["llava", "llava_next"])
def test_images_first_templates_keep_the_prompts_order(tiny, variant):
    """LLaVA's templates render every image first; demos keep their images, each image with the template's "\\n"."""
    bb, processor = tiny(variant)
    pixels = bb.image_transform(make_image())
    prompt = bb.wrap_query([Image(pixels), Text("a red circle."), Image(pixels), Text(QUESTION)])
    rendered = "".join(seg.text if isinstance(seg, Text) else "<image>" for seg in prompt)
    expected = {"llava": f"USER: <image>\na red circle. <image>\n{QUESTION} ASSISTANT:",
                "llava_next": f"[INST] <image>\na red circle.<image>\n{QUESTION} [/INST]"}[variant]
    assert rendered == expected
    assert bb.chat_affixes() == {"llava": ("USER: ", " ASSISTANT:"), "llava_next": ("[INST] ", " [/INST]")}[variant]
    # Fused demos (Embeds) render as images would: all in front, so exactly the template's layout.
    fused = bb.wrap_query([Embeds(torch.zeros(2, bb.hidden_size)), Image(pixels), Text(QUESTION)])
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    template = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert "".join(seg.text if isinstance(seg, Text) else "<image>" for seg in fused) == template


# ---- targets, Embeds, counting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [*INLINE, "blip2"])
def test_target_tokens_are_the_whole_strings(tiny, variant):
    """A target is tokenised in the prompt's string (as "Short answer:red" is in a demo), EOS after it."""
    bb, processor = tiny(variant)
    question = "Question: what color? Short answer:"
    prompt, text, images = build(bb, variant, [IMG, question])
    batch = bb.assemble([[*prompt, Text("red", target=True)]])
    context = processor_ids(processor, text, images)
    whole = processor_ids(processor, text + "red", images)
    labels = batch.labels[0].tolist()
    assert adapter_ids(bb, prompt) == context and whole[: len(context)] == context
    assert labels[: len(context)] == [IGNORE_INDEX] * len(context)
    assert labels[len(context):] == [*whole[len(context):], bb.eos_token_id]


@pytest.mark.parametrize("variant", INLINE)
def test_embeds_neighbours_tokenise_as_an_images(tiny, variant):
    bb, _ = tiny(variant)
    pixels = bb.image_transform(make_image())
    texts = [Text("a red circle on the left."), Text("what color is the shape?")]
    with_image = bb.segment_token_ids([[texts[0], Image(pixels), texts[1]]])[0]
    with_embeds = bb.segment_token_ids([[texts[0], Embeds(torch.zeros(3, bb.hidden_size)), texts[1]]])[0]
    assert with_image == with_embeds
    if variant.startswith("llava"):  # not as the text alone: no "▁" after an image
        assert with_image[2] != bb.tokenize([texts[1].text])[0]


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_count_tokens_is_the_assembled_length(tiny, variant, wrap):
    bb, _ = tiny(variant)
    if wrap and variant not in TEMPLATES:
        pytest.skip("BLIP-2 has no chat template")
    bb.use_chat_template = wrap
    try:
        images = [Image(bb.image_transform(make_image(size))) for size in SIZES]
        fused = Embeds(torch.randn(3, bb.hidden_size))
        prompts = [bb.wrap_query(p) for p in (
            [Text("a red circle."), images[0], Text(" this is blue"), fused, images[1], images[2], Text(QUESTION),
             Text("red", target=True)],
            [images[0], Text("Short answer:"), Text("a square", target=True, eos=False),
             *[Text(" and more")] * (not bb.is_encoder_decoder)],  # T5 decodes its targets: they come last
            [fused, Text("the answer"), Text("")],
        )]
        for add_bos in (True, False):
            assert [bb.count_tokens(p, add_bos=add_bos) for p in prompts] == bb.assemble(
                prompts, add_bos=add_bos).context_tokens.tolist()
    finally:
        bb.use_chat_template = True


def test_a_placeholder_that_is_no_added_token_is_refused(tiny, monkeypatch):
    """Text around the placeholder tokenises as around an image only if the tokenizer matches it whole."""
    bb, _ = tiny("llava")
    monkeypatch.setattr(type(bb), "image_placeholder", property(lambda self: "[picture]"))
    with pytest.raises(ValueError, match="must be one of the tokenizer's added tokens"):
        bb.segment_token_ids([[Text("a red circle"), Image(bb.image_transform(make_image())), Text("what")]])
