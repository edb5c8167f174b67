"""MMICT: the M-Hub (InstructBLIP Q-Former with text), its demonstration designs, video, and task episodes."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import torch
import webdataset as wds
from helpers import make_mmict_module
from PIL import Image as PILImage
from tiny_models import blip2 as tiny
from tiny_models.common import test_image as make_image
from tiny_models.numerics import assert_fp32_close

from data_modules import drain_skips
from data_modules.task_episodes import TaskEpisodeDataModule
from mmict.batch import EpisodeBatch
from mmict.config import ConfigError, config_from_dict
from mmict.eval.tasks import get_task
from mmict.methods.mmict.hub import frames_of
from mmict.methods.mmict.module import DEMO_DESIGNS, EOC, MMICTModule
from mmict.segments import Text
from mmict.toy.world import write_toy_world

RED, BLUE, GREEN = (200, 40, 40), (40, 40, 200), (40, 200, 40)


@pytest.fixture(scope="module")
def blip2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2_mmict")
    return {v: tiny.save_tiny(root / v, variant=v) for v in tiny.VARIANTS}


make_module = make_mmict_module


def batch_of(module: MMICTModule, video: bool = False) -> EpisodeBatch:
    px = lambda c: module.backbone.image_transform(make_image(color=c))  # noqa: E731
    query_images = [[px(RED), px(RED), px(BLUE)], [px(BLUE), px(GREEN)]] if video else [px(RED), px(BLUE)]
    return EpisodeBatch(demo_images=[px(RED), px(BLUE), px(GREEN)],
                        demo_texts=["a red square", "what color is the shape ? blue", "green"],
                        demo_counts=[2, 1], query_images=query_images,
                        query_prompts=["what color is the shape ?", "what color"], query_targets=["red", "blue"])


def eval_loss(module: MMICTModule, batch: EpisodeBatch) -> float:
    with torch.no_grad():
        return module.loss(batch)[0].item()


def fit_steps(module: MMICTModule, batch: EpisodeBatch, steps: int) -> None:
    """AdamW steps on one batch, dropout off (as in eval) so the loss is a deterministic function of the weights."""
    module.eval()
    opt = module.configure_optimizers()["optimizer"]
    for _ in range(steps):
        opt.zero_grad()
        module.loss(batch)[0].backward()
        opt.step()


# ---- the M-Hub ------------------------------------------------------------------------------------
def test_hub_starts_from_blip2_and_reports_the_text_branch(blip2_dirs):
    module = make_module(blip2_dirs["blip2"])
    model, hub = module.backbone.model, module.hub
    assert torch.equal(hub.query_tokens, model.query_tokens)
    assert torch.equal(hub.projection.weight, model.language_projection.weight)
    assert torch.equal(hub.vision_norm.weight, model.vision_model.post_layernorm.weight)
    assert torch.equal(hub.qformer.embeddings.layernorm.weight, model.qformer.layernorm.weight)
    layer = hub.qformer.encoder.layer[0]
    assert torch.equal(layer.crossattention.attention.query.weight,
                       model.qformer.encoder.layer[0].crossattention.attention.query.weight)
    # BLIP-2 has no text branch: the text feed-forward starts as the query one, the embeddings are reported.
    assert torch.equal(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)
    report = module.hub_init.summary()
    assert "word_embeddings" in report and "copied from the query feed-forward" in report
    assert module.hub_init.source == str(blip2_dirs["blip2"])


def test_hub_feature_shapes_and_padding_masked(blip2_dirs):
    module = make_module(blip2_dirs["blip2"]).eval()
    bb = module.backbone
    images = [bb.image_transform(make_image(color=RED)), bb.image_transform(make_image(color=BLUE))]
    texts = ["red", "what color is the big shape on the left ?"]
    with torch.no_grad():
        query = module.query_features(images, texts)
        text = module.text_features(images, texts)
        alone = module.text_features(images[:1], texts[:1])[0]
    assert query.shape == (2, tiny.NUM_QUERY_TOKENS, bb.hidden_size)
    lengths = [len(ids) for ids in module.hub_tokenizer(texts)["input_ids"]]
    assert [t.shape for t in text] == [(n, bb.hidden_size) for n in lengths] and lengths[0] < lengths[1]
    # The short text padded next to a long one gives its features alone: padding is masked and dropped (equal up
    # to the fp32 noise of other matmul shapes: tiny_models/numerics.py).
    assert_fp32_close(text[0], alone)


def test_eoc_is_one_real_token(blip2_dirs):
    module = make_module(blip2_dirs["blip2"], design="text")
    bb = module.backbone
    assert bb.tokenize([EOC])[0] == [module.eoc_id]
    assert bb.model.get_input_embeddings().weight.shape[0] == len(bb.tokenizer)
    prompt = module.batch_prompts(batch_of(module))[0]
    assert prompt[1] == Text(EOC) and prompt[3] == Text(EOC)  # after each demo
    assert module.eoc is None and not any(p.requires_grad for p in bb.parameters())


# ---- designs ----------------------------------------------------------------------------------------
def test_prompt_layout_per_design(blip2_dirs):
    module = make_module(blip2_dirs["blip2"], eoc_trainable=True)
    batch = batch_of(module)
    kinds = {d: [type(s).__name__ for s in module.batch_prompts(batch, demo_mode=d)[0]] for d in DEMO_DESIGNS}
    query = ["Embeds", "Text", "Text"]  # query visual features, prompt, target
    assert kinds["fused"] == ["Embeds", "Embeds"] * 2 + query  # demo text features, trainable <eoc>
    assert kinds["concat"] == ["Embeds", "Text", "Embeds"] * 2 + query
    assert kinds["text"] == ["Text", "Embeds"] * 2 + query
    assert kinds["none"] == query
    fused = module.batch_prompts(batch, demo_mode="fused")[0]
    n_tokens = len(module.hub_tokenizer(["a red square"])["input_ids"][0])
    assert fused[0].embeds.shape == (n_tokens, module.backbone.hidden_size)  # one feature per demo text token
    assert fused[-3].embeds.shape[0] == tiny.NUM_QUERY_TOKENS


@pytest.mark.parametrize("variant", tiny.VARIANTS)
@pytest.mark.parametrize("design", DEMO_DESIGNS)
def test_each_design_trains_only_the_hub_and_the_loss_falls(blip2_dirs, variant, design):
    module = make_module(blip2_dirs[variant], design=design)
    batch = batch_of(module)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    hub = {k: v.clone() for k, v in module.hub.state_dict().items()}
    before = eval_loss(module.eval(), batch)
    # 24 steps: at 12 the tiny Flan-T5's "none" design was mid-oscillation (6.519 -> 6.535 with one CPU thread,
    # 6.445 with two: the same steps summed in another order); by 24 it is at 6.20 / 6.24 either way
    fit_steps(module, batch, 24)
    assert eval_loss(module, batch) < before
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in frozen.items())  # ViT and LLM
    changed = {k for k, v in module.hub.state_dict().items() if not torch.equal(v, hub[k])}
    assert "query_tokens" in changed and "projection.weight" in changed and "vision_norm.weight" in changed
    if design == "fused":  # demos go through the text branch
        assert "qformer.embeddings.word_embeddings.weight" in changed


def test_weight_decay_is_off_for_biases_and_norms(blip2_dirs):
    module = make_module(blip2_dirs["blip2"])
    groups = module.configure_optimizers()["optimizer"].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    assert id(module.hub.projection.weight) in decayed
    assert not any(n.endswith("bias") or "norm" in n for i, n in names.items() if i in decayed)
    assert id(module.hub.vision_norm.weight) not in decayed


def test_trainable_eoc_is_saved_and_trains(blip2_dirs):
    module = make_module(blip2_dirs["blip2"], design="text", eoc_trainable=True)
    start = module.eoc.detach().clone()
    torch.testing.assert_close(start[0], module.backbone.embed_tokens(torch.tensor([module.eoc_id]))[0])
    opt = module.configure_optimizers()["optimizer"]
    module.training_step(batch_of(module), 0).backward()
    opt.step()
    assert not torch.equal(module.eoc, start)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert "eoc" in checkpoint["state_dict"] and not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    again = make_module(blip2_dirs["blip2"], design="text", eoc_trainable=True, seed=1)
    again.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(again.eoc, module.eoc) and torch.equal(again.hub.query_tokens, module.hub.query_tokens)


def test_fresh_hub_on_a_llava_backbone(tiny_backbone_dir):
    module = make_module(tiny_backbone_dir, family="llava")
    assert module.hub_init.source == "fresh" and module.hub.query_tokens.shape == (1, 4, 32)
    batch = batch_of(module)
    before = eval_loss(module.eval(), batch)
    fit_steps(module, batch, 10)
    assert eval_loss(module, batch) < before


def test_hub_size_is_said_at_start_and_a_hub_bigger_than_the_llm_is_warned_about(tiny_backbone_dir, blip2_dirs,
                                                                                  caplog):
    with caplog.at_level(logging.INFO, logger="mmict.methods.mmict.hub"):
        module = make_module(tiny_backbone_dir, family="llava")  # SMALL_HUB: bigger than the tiny LLM
    n = sum(p.numel() for p in module.hub.parameters())
    lm = sum(p.numel() for p in module.backbone.language_model.parameters())
    assert n > lm
    [size] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("M-Hub: ")]
    assert size == f"M-Hub: {n:,} parameters (hidden 32, 2 layers, 4 queries; from fresh, sizes from method.mmict.hub)"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    said = re.search(r"more parameters \(([\d,]+)\) than the backbone's language model \(([\d,]+), ", warning)
    assert said and said[1] == f"{n:,}"
    assert 0 <= lm - int(said[2].replace(",", "")) <= 32  # counted before <eoc> (one row of 32) joined the table
    assert "method.mmict.hub.hidden_size" in warning

    caplog.clear()
    small = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "intermediate_size": 16,
             "cross_attention_frequency": 1, "num_query_tokens": 2, "max_text_tokens": 8}
    with caplog.at_level(logging.INFO, logger="mmict.methods.mmict.hub"):
        make_module(tiny_backbone_dir, family="llava", hub=small)
    assert "(hidden 8, 1 layers, 2 queries; from fresh" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # smaller than the LLM: no warning

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmict.methods.mmict.hub"):
        make_module(blip2_dirs["blip2"])  # the sizes are the BLIP-2 checkpoint's
    assert f"from the BLIP-2 checkpoint {blip2_dirs['blip2']}, its sizes)" in caplog.text
    assert "its sizes come from the BLIP-2 checkpoint" in caplog.text  # bigger than the tiny OPT: said why


# ---- video ------------------------------------------------------------------------------------------
def test_video_frames_are_one_memory(tiny_backbone_dir):
    # The toy LLaVA's vision tower (not the tiny BLIP-2's, initialised at std 1e-10) tells colours apart.
    module = make_module(tiny_backbone_dir, family="llava").eval()
    batch = batch_of(module, video=True)
    per_frame = module.backbone.vision_features([batch.query_images[0][0]])[0].shape[0]
    memory, mask = module._memory(batch.query_images)
    assert memory.shape[1] == 3 * per_frame and mask.sum(1).tolist() == [3 * per_frame, 2 * per_frame]
    with torch.no_grad():
        loss = module.loss(batch)[0]
        single = module.query_features([batch.query_images[0][:1]], ["what"])
        three = module.query_features([batch.query_images[0]], ["what"])
    assert torch.isfinite(loss) and not torch.allclose(single, three)  # the other frames are attended to
    assert len(frames_of(torch.stack(batch.query_images[0]))) == 3  # a (T, C, H, W) tensor is a video too


def test_temporal_embedding_is_optional_and_bounded(blip2_dirs):
    module = make_module(blip2_dirs["blip2"], temporal_embedding=True, max_frames=2)
    assert module.hub.temporal.weight.abs().sum() == 0  # starts as plain concatenation
    with pytest.raises(ValueError, match="max_frames"):
        module.loss(batch_of(module, video=True))  # 3 frames > 2
    assert make_module(blip2_dirs["blip2"]).hub.temporal is None  # off by default


# ---- config and data --------------------------------------------------------------------------------
def test_demo_design_is_checked():
    with pytest.raises(ConfigError, match="method.name=mmict"):
        config_from_dict({"method": {"name": "aim", "demo_design": "concat"}})
    with pytest.raises(ConfigError, match="concat"):
        config_from_dict({"method": {"name": "mmict", "demo_design": "concatenate"}})
    with pytest.raises(ConfigError, match="toy_vqa"):
        config_from_dict({"method": {"name": "mmict"}, "data": {"task": "toy_vq"}})


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_task_episodes_from_the_train_split(tmp_path):
    write_toy_world(tmp_path, num_docs=4, val_docs=2, vqa_train=30, vqa_test=6, binding_episodes=2,
                    samples_per_shard=50)
    # One corrupt example and one video example join the split.
    with wds.TarWriter(str(tmp_path / "vqa" / "train-extra.tar")) as sink:
        sink.write({"__key__": "bad", "json": b"{not json", "jpg": _jpeg(RED)})
        sink.write({"__key__": "vid", "json": json.dumps({"id": "vid", "question": "what color ?",
                                                         "answers": ["red"]}).encode(),
                    "frame_000.jpg": _jpeg(RED), "frame_001.jpg": _jpeg(BLUE)})
    drain_skips()
    dm = TaskEpisodeDataModule(tmp_path, task=get_task("toy_vqa"), val_split="test", image_transform=lambda im: im.size,
                               batch_size=4, min_shots=1, max_shots=3, epoch_size=400, shuffle_buffer=8, seed=0)
    dm.setup("fit")
    assert len(dm.train_urls) == 2 and dm.has_val()
    batches = list(dm.train_dataloader())
    assert len(batches) == 100
    assert all(1 <= k <= 3 for b in batches for k in b.demo_counts)
    assert all(p.startswith("Question:") for b in batches for p in b.query_prompts)
    skipped = sum(b.skipped.get("json does not parse", 0) for b in batches)
    assert skipped >= 1  # counted, not silent
    videos = [img for b in batches for img in b.query_images + b.demo_images if isinstance(img, list)]
    assert videos and all(len(v) == 2 and v[0] == v[1] for v in videos)  # both frames, decoded
    missing = TaskEpisodeDataModule(tmp_path, task=get_task("toy_vqa"), val_split="val", image_transform=None)
    assert not missing.has_val()
