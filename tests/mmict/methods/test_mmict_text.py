"""MMICT's M-Hub text branch as LAVIS starts it (BERT's weights, `method.mmict.text_init`) and its baselines as
the reference defines them (text-free query features, `method.mmict.query_text`): issue 21 items 3 and 4.

A tiny BERT (model and word-piece tokenizer) is built here from a config and saved to a temporary folder,
which `method.mmict.hub_tokenizer` points at, as it would at bert-base-uncased."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import SMALL_HUB, make_mmict_module
from tiny_models import blip2 as tiny
from tiny_models.common import test_image as make_image

from mmict.batch import EpisodeBatch
from mmict.config import ConfigError, config_from_dict
from mmict.methods.mmict.module import DEMO_DESIGNS, MMICTModule
from mmict.methods.mmict.text_init import POSITION, TEXT_FFN, WORD, is_text_branch
from mmict.segments import Embeds

RED, BLUE, GREEN = (200, 40, 40), (40, 40, 200), (40, 200, 40)
# The tiny BLIP-2's Q-Former sizes (tiny_models/blip2.py), which a BERT must match to start its text branch.
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "square", "what", "color",
              "is", "the", "shape", "?", "big", "on", "left", "which"]


def save_bert(path, head: bool = True, hidden_size: int = 32, weights: bool = True):
    """A tiny BERT checkpoint (BertForMaskedLM, or a plain BertModel) and its tokenizer in `path`."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(123)
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=48)
    model = (BertForMaskedLM if head else BertModel)(config)
    if weights:
        model.save_pretrained(path)
    return model.bert if head else model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmict_text")
    return {"blip2": tiny.save_tiny(root / "blip2", variant="blip2"), "bert": root / "bert",
            "bert_model": save_bert(root / "bert")}


make_module = make_mmict_module


def batch_of(module: MMICTModule, prompts=("what color is the shape ?", "what color")) -> EpisodeBatch:
    px = lambda c: module.backbone.image_transform(make_image(color=c))  # noqa: E731
    return EpisodeBatch(demo_images=[px(RED), px(BLUE), px(GREEN)],
                        demo_texts=["a red square", "what color is the shape ? blue", "green"],
                        demo_counts=[2, 1], query_images=[px(RED), px(BLUE)],
                        query_prompts=list(prompts), query_targets=["red", "blue"])


def query_features(module: MMICTModule, prompts, design: str, with_target: bool) -> list[torch.Tensor]:
    """The M-Hub features the query prompts hold (the last Embeds segment of each), as training and evaluation
    build them (`batch_prompts`, with and without the target)."""
    with torch.no_grad():
        built = module.eval().batch_prompts(batch_of(module, prompts), demo_mode=design, with_target=with_target)
    return [[s for s in prompt if isinstance(s, Embeds)][-1].embeds for prompt in built]


# ---- item 3: the text branch starts from BERT -------------------------------------------------------------
def test_text_branch_starts_from_the_bert_checkpoint(dirs):
    module = make_module(dirs["blip2"], hub_tokenizer=str(dirs["bert"]))  # text_init null: bert, as LAVIS
    bert, hub, blip2 = dirs["bert_model"], module.eval().hub.qformer, module.backbone.model.qformer
    assert module.hub_init.text_init == "bert" and len(module.hub_tokenizer) == len(BERT_VOCAB)
    assert torch.equal(hub.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    n = SMALL_HUB["max_text_tokens"]  # BERT's first positions (it has 48)
    assert torch.equal(hub.embeddings.position_embeddings.weight, bert.embeddings.position_embeddings.weight[:n])
    for mine, theirs, query in zip(hub.encoder.layer, bert.encoder.layer, blip2.encoder.layer, strict=True):
        assert torch.equal(mine.intermediate.dense.weight, theirs.intermediate.dense.weight)
        assert torch.equal(mine.output.dense.bias, theirs.output.dense.bias)
        assert torch.equal(mine.output.LayerNorm.weight, theirs.output.LayerNorm.weight)
        # what the BLIP-2 checkpoint has stays BLIP-2's: the query feed-forward, the attentions
        assert torch.equal(mine.intermediate_query.dense.weight, query.intermediate_query.dense.weight)
        assert torch.equal(mine.attention.attention.key.weight, query.attention.attention.key.weight)
    # The text positions' embeddings are BERT's (word + position, then the BLIP-2 Q-Former's input LayerNorm).
    ids = module.hub_tokenizer(["what color is the shape ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = hub.embeddings(input_ids=ids)
        want = hub.embeddings.layernorm(bert.embeddings.word_embeddings(ids)
                                        + bert.embeddings.position_embeddings.weight[: ids.shape[1]])
    torch.testing.assert_close(got, want)


def test_init_report_names_each_parts_origin(dirs):
    module = make_module(dirs["blip2"], hub_tokenizer=str(dirs["bert"]), temporal_embedding=True)
    parts, bert = module.hub_init.parts, f"BERT checkpoint {dirs['bert']}"
    assert parts[WORD].startswith(bert) and "20 of the tokenizer's 20 rows" in parts[WORD]
    assert parts[POSITION].startswith(bert) and "the first 32 of 48" in parts[POSITION]
    assert parts[TEXT_FFN].startswith(bert) and "2 layers" in parts[TEXT_FFN]
    blip2 = [p for p, origin in parts.items() if origin.startswith(f"the BLIP-2 checkpoint ({dirs['blip2']})")]
    assert len(blip2) == 4 and any(p.startswith("query tokens") for p in blip2)
    assert parts["temporal embedding (temporal)"].startswith("zeros")
    report = module.hub_init.summary()
    assert "text_init=bert" in report and all(f"{p}: {o}" in report for p, o in parts.items())
    # Every M-Hub tensor the checkpoint lacks is a named part.
    missing = {k for k in module.hub.state_dict() if k not in module.hub_init.loaded}
    assert missing == {k for k in module.hub.state_dict() if is_text_branch(k)} | {"temporal.weight"}


def test_query_branch_init_is_the_init_before(dirs):
    """text_init=query_branch (the init before issue 21): the text feed-forward copies the query one, the
    embeddings are random; nothing else differs from the BERT start."""
    old = make_module(dirs["blip2"], hub_tokenizer=str(dirs["bert"]), text_init="query_branch")
    new = make_module(dirs["blip2"], hub_tokenizer=str(dirs["bert"]))
    for layer in old.hub.qformer.encoder.layer:
        assert torch.equal(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)
        assert torch.equal(layer.output.LayerNorm.bias, layer.output_query.LayerNorm.bias)
    words = old.hub.qformer.embeddings.word_embeddings.weight
    assert not torch.equal(words, dirs["bert_model"].embeddings.word_embeddings.weight)
    assert 0.005 < words[1:].std().item() < 0.05  # normal(0, initializer_range=0.02); row 0 is the zero pad row
    old_state, new_state = old.hub.state_dict(), new.hub.state_dict()
    assert all(torch.equal(v, new_state[k]) for k, v in old_state.items() if not is_text_branch(k))
    assert old.hub_init.text_init == "query_branch"
    assert old.hub_init.parts[TEXT_FFN] == "copied from the query feed-forward (12 tensors)"
    assert old.hub_init.parts[WORD].startswith("random normal(0, initializer_range)")
    # With the LLM's tokenizer (hub_tokenizer null) there is no BERT: query_branch, as before.
    assert make_module(dirs["blip2"]).hub_init.text_init == "query_branch"


def test_fresh_hub_text_branch_from_bert(tmp_path, dirs, tiny_backbone_dir):
    bert = save_bert(tmp_path / "bert_model_only", head=False)  # a plain BertModel checkpoint
    module = make_module(tiny_backbone_dir, family="llava", hub_tokenizer=str(tmp_path / "bert_model_only"))
    assert module.hub_init.source == "fresh" and module.hub_init.parts[WORD].startswith("BERT checkpoint")
    assert torch.equal(module.hub.qformer.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    layer = module.hub.qformer.encoder.layer[1]
    assert torch.equal(layer.output.dense.weight, bert.encoder.layer[1].output.dense.weight)
    fresh = make_module(tiny_backbone_dir, family="llava")
    assert fresh.hub_init.parts[WORD].startswith("random") and "fresh" in fresh.hub_init.summary()


def test_bert_init_needs_a_fitting_bert_checkpoint(tmp_path, dirs):
    with pytest.raises(ValueError, match="'blip-2' checkpoint, not a BERT one"):  # a tokenizer with another model
        make_module(dirs["blip2"], hub_tokenizer=str(dirs["blip2"]), text_init="bert")
    save_bert(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ValueError, match="hidden_size 48 .M-Hub: 32."):
        make_module(dirs["blip2"], hub_tokenizer=str(tmp_path / "wide"))
    save_bert(tmp_path / "tokenizer_only", weights=False)
    with pytest.raises(OSError, match="text_init=query_branch"):
        make_module(dirs["blip2"], hub_tokenizer=str(tmp_path / "tokenizer_only"))
    # ... which is where query_branch still starts
    assert make_module(dirs["blip2"], hub_tokenizer=str(tmp_path / "tokenizer_only"),
                       text_init="query_branch").hub_init.text_init == "query_branch"


def test_text_init_is_checked():
    with pytest.raises(ConfigError, match="query_branch"):
        config_from_dict({"method": {"name": "mmict", "mmict": {"text_init": "berts"}}})
    with pytest.raises(ConfigError, match="hub_tokenizer"):
        config_from_dict({"method": {"name": "mmict", "mmict": {"text_init": "bert"}}})


# ---- item 4: the query's features read its prompt per design ----------------------------------------------
@pytest.mark.parametrize("with_target", [True, False])  # training's prompts, and evaluation's
def test_concat_query_features_ignore_the_prompt_and_fused_ones_read_it(dirs, with_target):
    a, b = ("what color is the shape ?", "what color"), ("which shape is on the left ?", "a big square")
    for design, reads in (("concat", False), ("none", False), ("fused", True), ("text", True)):
        module = make_module(dirs["blip2"], design=design, hub_tokenizer=str(dirs["bert"]))
        assert module.query_text is reads
        first, second = query_features(module, a, design, with_target), query_features(module, b, design, with_target)
        same = [torch.equal(x, y) for x, y in zip(first, second, strict=True)]
        assert same == [not reads] * 2, design
    # The key overrides the design: a vanilla ICT whose query reads its prompt, an MMICT whose query does not.
    concat = make_module(dirs["blip2"], design="concat", query_text=True)
    assert not torch.equal(query_features(concat, a, "concat", with_target)[0],
                           query_features(concat, b, "concat", with_target)[0])
    fused = make_module(dirs["blip2"], design="fused", query_text=False)
    assert torch.equal(query_features(fused, a, "fused", with_target)[0],
                       query_features(fused, b, "fused", with_target)[0])


def test_web_trained_queries_read_no_text_at_training_or_evaluation(dirs):
    """Web episodes have no query prompt: an M-Hub that read "" in training must not read the task's prompt at
    evaluation (issue 23 item 5). Text-free under every design, and asking for text is refused."""
    a, b = ("what color is the shape ?", "what color"), ("which shape is on the left ?", "a big square")
    for design in DEMO_DESIGNS:
        module = make_module(dirs["blip2"], design=design, task=None)
        assert module.query_text is False
        for with_target in (True, False):  # training's prompts and evaluation's give the same features
            assert torch.equal(query_features(module, a, design, with_target)[0],
                               query_features(module, b, design, with_target)[0])
    with pytest.raises(ValueError, match="web corpus"):
        make_module(dirs["blip2"], design="fused", task=None, query_text=True)


def test_query_text_is_the_trained_models_under_every_eval_mode(dirs):
    module = make_module(dirs["blip2"], design="concat")
    a, b = ("what color is the shape ?", "what color"), ("which shape is on the left ?", "a big square")
    for mode in DEMO_DESIGNS:  # a vanilla-ICT model keeps its text-free query under fused demos too
        assert torch.equal(query_features(module, a, mode, False)[1], query_features(module, b, mode, False)[1])


def test_mode_labels_say_which_query_features_ran(dirs):
    concat = make_module(dirs["blip2"], design="concat")
    assert concat.mode_labels["concat"] == "vanilla ICT (visual features + demo text; text-free query features)"
    assert concat.mode_labels["none"] == "zero-shot (no demos, M-Hub trained as vanilla ICT; text-free query features)"
    on = make_module(dirs["blip2"], design="concat", query_text=True).mode_labels
    assert on["concat"] == "vanilla ICT (visual features + demo text; text-conditioned query features)"
    fused = make_module(dirs["blip2"]).mode_labels
    assert fused["fused"] == "MMICT (M-Hub text features; text-conditioned query features)"
    assert fused["text"] == "text-only demos (text-conditioned query features)"
    assert set(fused) == set(DEMO_DESIGNS)
    # A run trained without demos is vanilla fine-tuning; a fresh M-Hub says so (a table may hold both starts).
    assert make_module(dirs["blip2"], design="none").mode_labels["none"] == \
        "vanilla fine-tune (no demos, M-Hub query; text-free query features)"
    fresh = make_module(dirs["blip2"], init_from_backbone=False).mode_labels["fused"]
    assert fresh == "MMICT (M-Hub text features; text-conditioned query features; fresh M-Hub)"


def test_checkpoint_records_query_text_and_old_ones_warn(dirs, caplog):
    module = make_module(dirs["blip2"], design="concat")
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["mmict"]["query_text"] is False
    caplog.clear()  # building it warned already: the tiny BLIP-2's M-Hub outweighs its language model
    with caplog.at_level(logging.WARNING, logger="mmict.methods.mmict.module"):
        module.on_load_checkpoint(checkpoint)  # as trained: quiet
        assert not caplog.records
        del checkpoint["mmict"]["query_text"]  # written before the key: its query read the prompt
        module.on_load_checkpoint(checkpoint)
    assert "method.mmict.query_text=true" in caplog.text
