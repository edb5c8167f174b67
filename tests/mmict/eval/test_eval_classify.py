"""Classification by log-likelihood (Hateful Memes): the continuation scores checked by hand (the off-by-one shift
of decoder-only logits, none for T5's decoder), against transformers' own loss, and a whole eval run on toy memes."""

from __future__ import annotations

import io
import json
import math
import random

import pytest
import torch
import webdataset as wds
from PIL import Image as PILImage
from tiny_models import blip2 as tiny_blip2
from tiny_models.common import test_image as make_image

from data_modules.downstream import load_examples
from mmict.backbones import IGNORE_INDEX, load_backbone
from mmict.config import load_config
from mmict.eval.likelihood import class_probabilities, continuation_loglikelihoods
from mmict.eval.metrics import hateful_memes_auc
from mmict.eval.runner import run_eval
from mmict.eval.tasks import get_task
from mmict.methods.base import FrozenBackboneModule
from mmict.segments import Image, Text

RED, BLUE = (200, 40, 40), (40, 40, 200)


@pytest.fixture(scope="module")
def blip2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2_classify")
    return {v: tiny_blip2.save_tiny(root / v, variant=v) for v in tiny_blip2.VARIANTS}


def two_prompts(bb) -> list[list]:
    """Prompts of different lengths, so right padding is exercised."""
    return [[Image(bb.image_transform(make_image(color=RED))), Text("what color is the shape ?")],
            [Image(bb.image_transform(make_image(color=BLUE))), Text("what is the shape on the left ?")]]


def fixed_logits(monkeypatch, bb, shape_of) -> torch.Tensor:
    """Replace the backbone's forward by one returning fixed random logits shaped like `shape_of(batch)`."""
    store: dict[str, torch.Tensor] = {}

    def forward(batch, output_hidden_states=False, with_loss=False):
        b, length = shape_of(batch)
        gen = torch.Generator().manual_seed(0)
        store["logits"] = torch.randn(b, length, len(bb.tokenizer), generator=gen) * 3
        return type("Out", (), {"logits": store["logits"]})()

    monkeypatch.setattr(bb, "forward", forward)
    return store


def test_decoder_only_reads_the_logits_one_position_earlier(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    prompts, cont = two_prompts(bb), "red circle"
    ids = bb.tokenize([cont])[0]
    assert len(ids) >= 2
    # Where the continuation starts: the prompt's own length (BOS + image tokens + text), right padded at the end.
    starts = bb.assemble(prompts, padding_side="right").context_tokens.tolist()
    store = fixed_logits(monkeypatch, bb, lambda batch: batch.inputs_embeds.shape[:2])
    ll, n, ctx = continuation_loglikelihoods(bb, prompts, cont)
    logp = torch.log_softmax(store["logits"], dim=-1)
    for b, start in enumerate(starts):
        # token j of the continuation sits at start + j and is predicted by the logits at start + j - 1
        by_hand = sum(logp[b, start + j - 1, t].item() for j, t in enumerate(ids))
        unshifted = sum(logp[b, start + j, t].item() for j, t in enumerate(ids))
        assert ll[b] == pytest.approx(by_hand, abs=1e-5)
        assert abs(by_hand - unshifted) > 1e-3  # the check tells the two apart
    assert n == [len(ids)] * 2 and ctx == starts  # context: the prompt alone, as generation sees it


def test_encoder_decoder_reads_the_decoder_logits_unshifted(blip2_dirs, monkeypatch):
    bb = load_backbone("blip2", str(blip2_dirs["blip2_t5"]))
    assert bb.is_encoder_decoder
    prompts, cont = two_prompts(bb), "a red square"
    ids = bb.tokenize([cont])[0]
    store = fixed_logits(monkeypatch, bb, lambda batch: batch.labels.shape)
    ll, n, ctx = continuation_loglikelihoods(bb, prompts, cont)
    logp = torch.log_softmax(store["logits"], dim=-1)
    for b in range(2):
        # T5's decoder input is the labels shifted right behind the start token: logits at j predict labels[j]
        by_hand = sum(logp[b, j, t].item() for j, t in enumerate(ids))
        shifted = sum(logp[b, j - 1, t].item() for j, t in enumerate(ids) if j > 0)
        assert ll[b] == pytest.approx(by_hand, abs=1e-5) and abs(by_hand - shifted) > 1e-3
    assert n == [len(ids)] * 2  # no EOS appended to a class name
    assert ctx == bb.assemble(prompts, padding_side="left").context_tokens.tolist()  # the encoder's tokens


@pytest.mark.parametrize("family", ["llava", *tiny_blip2.VARIANTS])
def test_loglikelihood_agrees_with_the_models_own_loss(family, tiny_backbone, blip2_dirs):
    """transformers' loss (mean cross-entropy over target tokens, shifted by the model itself where it must be)
    is minus the summed log-likelihoods over the summed token counts: on real logits of each family."""
    bb = tiny_backbone if family == "llava" else load_backbone("blip2", str(blip2_dirs[family]))
    prompts = two_prompts(bb)
    for cont in ("red", "a red square"):
        ll, n, _ = continuation_loglikelihoods(bb, prompts, cont)
        batch = bb.assemble([[*p, Text(cont, target=True, eos=False)] for p in prompts], padding_side="right")
        assert batch.labels.ne(IGNORE_INDEX).sum().item() == sum(n)
        with torch.no_grad():
            loss = bb(batch, with_loss=True).loss.item()
        assert -sum(ll) / sum(n) == pytest.approx(loss, rel=1e-4)
        # one prompt at a time gives the same numbers as the padded batch
        alone = [continuation_loglikelihoods(bb, [p], cont)[0][0] for p in prompts]
        assert alone == pytest.approx(ll, abs=1e-4)


def test_class_probability_is_the_softmax_of_length_normalised_scores(tiny_backbone):
    prompts = two_prompts(tiny_backbone)
    (ll_a, n_a, _), (ll_b, n_b, _) = (continuation_loglikelihoods(tiny_backbone, prompts, c)
                                      for c in ("red circle", "blue"))
    p, _ = class_probabilities(tiny_backbone, prompts, ("red circle", "blue"))
    for i in range(2):
        assert p[i] == pytest.approx(1 / (1 + math.exp(-(ll_a[i] / n_a[i] - ll_b[i] / n_b[i]))), rel=1e-6)


def test_hateful_memes_prompts_follow_openflamingo():
    from data_modules.downstream import Example

    task = get_task("hateful_memes")
    assert task.kind == "classify" and task.classes == ("yes", "no") and task.metric == "roc_auc"
    meme = Example(id="1", image=torch.zeros(1), question="look at them", answers=["1"], task="hateful_memes",
                   label=1)
    prompt = "is an image with: 'look at them' written on it. Is it hateful? Answer:"
    assert task.query_prompt(meme) == prompt and task.demo_text(meme) == prompt + "yes"
    assert task.demo_text(Example("2", torch.zeros(1), "hi", ["0"], "hateful_memes", label=0)).endswith("Answer:no")
    with pytest.raises(ValueError, match="no 0/1 'label'"):
        task.reference(Example("3", torch.zeros(1), "hi", ["x"], "hateful_memes"))
    with pytest.raises(ValueError, match="raise eval.num_queries"):
        task.score_trial([0.2, 0.9], [1, 1])
    assert task.score_trial([0.2, 0.9, 0.4], [0, 1, 1])[0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ end to end


def _png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return buf.getvalue()


def write_memes(root, split: str, n: int, seed: int) -> None:
    """Hateful-Memes-style shards: png + json {id, label (0/1), text}, as docs/data.md documents."""
    rng = random.Random(seed)
    words = ["red", "circle", "blue", "square", "on", "the", "left", "star", "green"]
    folder = root / "hateful_memes"
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
        for i in range(n):
            meta = {"id": f"{split}{i}", "label": i % 2, "text": " ".join(rng.sample(words, 3))}
            sink.write({"__key__": f"{split}{i:04d}", "png": _png(rng), "json": json.dumps(meta).encode()})


def test_memes_json_gives_label_and_text_and_other_formats_still_load(tmp_path):
    write_memes(tmp_path, "train", 4, seed=0)
    memes = load_examples(str(tmp_path / "hateful_memes" / "train-000000.tar"), lambda im: torch.zeros(1))
    assert [m.label for m in memes] == [0, 1, 0, 1] and [m.answers for m in memes] == [["0"], ["1"], ["0"], ["1"]]
    assert all(len(m.question.split()) == 3 for m in memes)  # the meme's "text" is its question
    vqa = tmp_path / "vqa.tar"
    with wds.TarWriter(str(vqa)) as sink:
        sink.write({"__key__": "a", "png": _png(random.Random(1)),
                    "json": json.dumps({"id": "a", "question": "what?", "answers": ["red"], "text": "x"}).encode()})
        sink.write({"__key__": "b", "png": _png(random.Random(2)),
                    "json": json.dumps({"id": "b", "prompt": "p", "label": "1"}).encode()})
    a, b = load_examples(str(vqa), lambda im: torch.zeros(1))
    assert (a.question, a.answers, a.label) == ("what?", ["red"], None)
    assert (b.question, b.answers, b.label) == ("p", ["1"], 1)


def test_hateful_memes_eval_end_to_end(tmp_path, tiny_backbone, tiny_backbone_dir):
    write_memes(tmp_path / "data", "train", 6, seed=0)
    write_memes(tmp_path / "data", "test", 6, seed=1)
    cfg = load_config("toy_aim", [
        f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
        f"backbone.name_or_path={tiny_backbone_dir}", "backbone.toy=null", "eval.task=hateful_memes",
        "eval.shots=[0,2]", "eval.seeds=[0,1]", "eval.num_queries=6", "eval.batch_size=4",
        "eval.demo_modes=[images,text]", "logger.wandb=false",
    ])
    module = FrozenBackboneModule(cfg, backbone=tiny_backbone)
    rows, report, *_ = run_eval(module, cfg, tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["metric"] == "roc_auc" and results["kind"] == "classify"
    assert results["decoding"] == {"classes": ["yes", "no"]} and "roc_auc (x100)" in report
    assert {(r["method"], r["shots"]) for r in rows} == {
        ("zero-shot", 0), ("vanilla ICL (images+text)", 2), ("text-only demos", 2)}
    assert len(results["trials"]) == 2 + 2 * 2
    for trial in results["trials"]:
        preds = trial["predictions"]
        assert [p["label"] for p in preds] == [0, 1, 0, 1, 0, 1]
        assert all(0.0 < p["p_yes"] < 1.0 for p in preds)
        # the trial's score is the ROC-AUC of the recorded P(yes) against the labels
        auc = hateful_memes_auc([p["p_yes"] for p in preds], [p["label"] for p in preds])
        assert trial["accuracy"] == pytest.approx(auc) and 0.0 <= auc <= 1.0
        assert trial["context_tokens"] > 0
    zero = next(t for t in results["trials"] if t["shots"] == 0)
    demos = next(t for t in results["trials"] if t["method"] == "images")
    assert demos["context_tokens"] > zero["context_tokens"]  # two demos (image + text) in front of the query
