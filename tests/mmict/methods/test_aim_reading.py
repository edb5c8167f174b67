"""AIM's reading options: how a demo is read (raw / chat), which positions become fused tokens (text / answer), the
demonstration bank's key per reading, and the separator after each fused demo in training and evaluation prompts."""

from __future__ import annotations

import pytest
import torch
from helpers import episode_batch, pixels, tiny_aim_cfg

from mmict.backbones import load_backbone
from mmict.methods.aim.bank import aim_key
from mmict.methods.aim.module import AIMModule
from mmict.methods.aim.reader import DemoReader, split_demo
from mmict.segments import Embeds, Image, Text

# A one-turn template the word-level toy tokenizer can render (as tests/mmict/backbones/test_context_length.py).
TEMPLATE = ("{% for m in messages %}USER : {{ m['content'][0]['text'] }} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT :{% endif %}")
VQA = "Question: what color is the shape ? Short answer: red"
INSTRUCTION, ANSWER = "Question: what color is the shape ? Short answer:", "red"
CAPTION = "a red circle on the left ."  # a web document's text: no answer cue


@pytest.fixture()
def chat_backbone(tiny_backbone_dir):
    bb = load_backbone("llava", str(tiny_backbone_dir))
    bb.chat_template = TEMPLATE
    return bb


def aim(tiny_backbone_dir, backbone=None, *overrides: str) -> AIMModule:
    return AIMModule(tiny_aim_cfg(tiny_backbone_dir, *overrides), backbone=backbone).eval()


def final_states(bb, prompt) -> torch.Tensor:
    """The final layer's (normed) states of one prompt read alone, BOS first."""
    with torch.no_grad():
        return bb(bb.assemble([prompt]), output_hidden_states=True).hidden_states[-1][0]


def n_tokens(bb, text: str) -> int:
    return len(bb.tokenize([text])[0])


@pytest.mark.parametrize(("text", "expected"), [
    ("Question:what is it? Short answer:yes", ("Question:what is it? Short answer:", "yes")),  # openflamingo VQA
    ("Output:a dog on the grass", ("Output:", "a dog on the grass")),  # captions
    ("is an image with: 'Answer: no' written on it. Is it hateful? Answer:yes",  # the last cue counts
     ("is an image with: 'Answer: no' written on it. Is it hateful? Answer:", "yes")),
    (VQA, (INSTRUCTION, ANSWER)),  # the whitespace after the cue is neither part's
    (CAPTION, ("", CAPTION)),  # no cue: all answer
    ("Question:what is it? Short answer:  ", ("", "Question:what is it? Short answer:  ")),  # nothing after it
])
def test_split_demo(text, expected):
    assert split_demo(text, ["Short answer:", "Answer:", "Output:"]) == expected


def test_raw_text_is_the_papers_reading(tiny_backbone_dir):
    module = aim(tiny_backbone_dir)
    bb = module.backbone
    assert (module.reader.read_format, module.reader.read_span) == ("raw", "text")  # the defaults
    img = pixels(bb, (220, 20, 20))
    hidden = module.reader.read([img], [VQA])[0]
    torch.testing.assert_close(hidden, final_states(bb, [Image(img), Text(VQA)])[-n_tokens(bb, VQA):])


def test_raw_answer_reads_only_the_answer_positions(tiny_backbone_dir):
    module = aim(tiny_backbone_dir, None, "method.aim.read_span=answer")
    bb = module.backbone
    img = pixels(bb, (220, 20, 20))
    hidden = module.reader.read([img], [VQA])[0]
    # [BOS][image][instruction][answer]: the instruction is read by the model, only the answer's states are kept
    states = final_states(bb, [Image(img), Text(INSTRUCTION), Text(ANSWER)])
    n_answer = n_tokens(bb, ANSWER)
    assert hidden.shape == (n_answer, bb.hidden_size)
    torch.testing.assert_close(hidden, states[-n_answer:])
    # a text without a cue (a web document's) is all answer: the same as the paper's reading
    default = aim(tiny_backbone_dir, bb)
    torch.testing.assert_close(module.reader.read([img], [CAPTION])[0], default.reader.read([img], [CAPTION])[0])


@pytest.mark.parametrize("span", ["text", "answer"])
def test_chat_reads_through_the_template_and_keeps_the_demos_own_positions(tiny_backbone_dir, chat_backbone, span):
    module = aim(tiny_backbone_dir, chat_backbone, "method.aim.read_format=chat", f"method.aim.read_span={span}")
    bb = chat_backbone
    img = pixels(bb, (220, 20, 20))
    hidden = module.reader.read([img], [VQA])[0]
    # By hand: BOS, "USER : ", the image, the instruction, " ASSISTANT :", the answer; the template's tokens and
    # the image are read by the model but never kept.
    states = final_states(bb, [Text("USER : "), Image(img), Text(INSTRUCTION), Text(" ASSISTANT :"), Text(ANSWER)])
    start = 1 + n_tokens(bb, "USER : ") + bb.image_tokens_per_image
    instruction = states[start:start + n_tokens(bb, INSTRUCTION)]
    answer = states[-n_tokens(bb, ANSWER):]
    expected = torch.cat([instruction, answer]) if span == "text" else answer
    torch.testing.assert_close(hidden, expected)
    assert hidden.shape[0] == (n_tokens(bb, INSTRUCTION) if span == "text" else 0) + n_tokens(bb, ANSWER)
    # the template changes what is read: not the raw reading of the same positions
    raw = final_states(bb, [Image(img), Text(INSTRUCTION), Text(ANSWER)])[-n_tokens(bb, ANSWER):]
    assert not torch.allclose(answer, raw)
    # a web text: the user turn is the image alone, the whole text the assistant's
    web = module.reader.read([img], [CAPTION])[0]
    by_hand = final_states(bb, [Text("USER : "), Image(img), Text(" ASSISTANT :"), Text(CAPTION)])
    torch.testing.assert_close(web, by_hand[-n_tokens(bb, CAPTION):])


def test_chat_needs_a_template(tiny_backbone_dir, tiny_backbone):
    assert tiny_backbone.chat_template is None
    with pytest.raises(ValueError, match="read_format=chat.*has none"):
        DemoReader(tiny_backbone, read_format="chat")
    with pytest.raises(ValueError, match="read_span"):
        DemoReader(tiny_backbone, read_span="question")


def test_each_reading_has_its_own_bank(tiny_backbone_dir, chat_backbone, tmp_path):
    readings = [("raw", "text"), ("raw", "answer"), ("chat", "text"), ("chat", "answer")]
    modules = {r: aim(tiny_backbone_dir, chat_backbone, f"method.aim.read_format={r[0]}",
                      f"method.aim.read_span={r[1]}") for r in readings}
    banks = {r: m.attach_bank(tmp_path, progress=False) for r, m in modules.items()}
    assert len({b.path for b in banks.values()}) == 4
    keys = {r: b.key for r, b in banks.items()}
    reading = keys[("chat", "answer")]["reading"]
    assert reading == {"read_format": "chat", "read_span": "answer", "answer_cues": ["Short answer:", "Answer:",
                       "Output:"], "chat_template": reading["chat_template"]}
    assert "chat_template" not in keys[("raw", "answer")]["reading"]
    # the paper's reading keeps the key banks had before a reading could be chosen (they stay valid)
    default = modules[("raw", "text")]
    assert keys[("raw", "text")] == aim_key(chat_backbone, default.reader.layer, False, "hidden", None)
    # another cue list or another template is another reading too
    cues = aim(tiny_backbone_dir, chat_backbone, "method.aim.read_span=answer", "method.aim.answer_cues=['Output:']")
    assert cues.attach_bank(tmp_path, progress=False).path != banks[("raw", "answer")].path
    other = load_backbone("llava", str(tiny_backbone_dir))
    other.chat_template = TEMPLATE.replace("USER :", "HUMAN :")
    template = aim(tiny_backbone_dir, other, "method.aim.read_format=chat")
    assert template.attach_bank(tmp_path, progress=False).key["reading"]["chat_template"] != reading["chat_template"]
    # a bank built with one reading is never used for another: the same demos are computed again, and each
    # module gets its own reading
    ids, images, texts = ["d0", "d1"], [pixels(chat_backbone, (220, 20, 20)), pixels(chat_backbone, (20, 20, 220))], \
        [VQA, CAPTION]
    for r in readings:
        assert banks[r].build(ids, images, texts) == 2, r
        got = banks[r].lookup(ids, images, texts)
        for g, e in zip(got, modules[r].reader.read(images, texts)):
            torch.testing.assert_close(g, e.cpu(), atol=1e-5, rtol=1e-4)
    assert banks[("raw", "answer")].lookup(ids[:1], images[:1], texts[:1])[0].shape[0] == n_tokens(chat_backbone,
                                                                                                    ANSWER)


@pytest.mark.parametrize("separator", [None, "."])
def test_fused_separator_follows_every_fused_demo_in_training_and_evaluation(tiny_backbone_dir, separator):
    overrides = [] if separator is None else [f"method.aim.fused_separator={separator}"]
    module = aim(tiny_backbone_dir, None, *overrides)
    batch = episode_batch(module.backbone)
    for prompts in (module.batch_prompts(batch),  # training: the fused demo mode, with the target
                    module.batch_prompts(batch, demo_mode="fused", with_target=False)):  # evaluation
        for b, prompt in enumerate(prompts):
            fused_at = [i for i, seg in enumerate(prompt) if isinstance(seg, Embeds)]
            assert len(fused_at) == batch.demo_counts[b]
            if separator is None:  # today's prompt: a fused demo is followed by the next demo or the query image
                assert all(isinstance(prompt[i + 1], Embeds | Image) for i in fused_at)
            else:
                assert all(prompt[i + 1] == Text(separator) for i in fused_at)
                assert sum(seg == Text(separator) for seg in prompt) == batch.demo_counts[b]
    plain = aim(tiny_backbone_dir, module.backbone)
    extra = (module.backbone.assemble(module.batch_prompts(batch)).context_tokens
             - plain.backbone.assemble(plain.batch_prompts(batch)).context_tokens)
    per_demo = 0 if separator is None else n_tokens(module.backbone, separator)
    assert extra.tolist() == [per_demo * k for k in batch.demo_counts]
    # the loss trains through it, and other demo modes are untouched
    assert torch.isfinite(module.loss(batch)[0])
    images = [m.backbone.assemble(m.batch_prompts(batch, demo_mode="images")).context_tokens for m in (module, plain)]
    assert torch.equal(*images)


@pytest.mark.parametrize(("override", "pattern"), [
    ("method.aim.read_format=template", r"'method.aim.read_format' = 'template'.*raw.*chat"),
    ("method.aim.read_span=label", r"'method.aim.read_span' = 'label'.*text.*answer"),
    ("method.aim.answer_cues=['Answer:','']", r"method.aim.answer_cues.*empty cue"),
])
def test_reading_settings_are_checked(tiny_backbone_dir, override, pattern):
    from mmict.config import ConfigError

    with pytest.raises(ConfigError, match=pattern):
        tiny_aim_cfg(tiny_backbone_dir, override)
