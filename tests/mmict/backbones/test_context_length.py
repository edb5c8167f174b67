"""Context length before running the LM: `count_tokens` (= assemble's `context_tokens`), `image_token_count`,
`max_positions` from the LM config, and the base view of multi-view families (LLaVA-NeXT tiles, Idefics crops),
on every family's tiny checkpoint (no download)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from tiny_models import FAMILY_MODULES, common, save_tiny
from tiny_models import idefics as tiny_idefics

from mmict.backbones import load_backbone
from mmict.backbones.llava_next import anyres_token_count
from mmict.segments import Embeds, Image, Text

VARIANTS = sorted(FAMILY_MODULES)
FAMILY = {"blip2_t5": "blip2"}  # variants that load as another family name
# PIL (width, height): square, wide, tall, very wide; AnyRes grids, Idefics3 splits and Qwen2-VL grids differ.
SIZES = [(24, 24), (64, 20), (20, 50), (100, 40)]
LARGE_WIDE = (100, 40)
# Words every tiny tokenizer knows (Qwen's vocabulary differs: unknown words are one <unk> each, still counted).
TEMPLATE = ("{% for m in messages %}USER : {{ m['content'][0]['text'] }} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT :{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """get(variant) -> backbone, each tiny checkpoint saved and loaded once for the module."""
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            path = save_tiny(variant, tmp_path_factory.mktemp(variant) / "model")
            cache[variant] = load_backbone(FAMILY.get(variant, variant), str(path))
        return cache[variant]

    return get


def _prompts(bb) -> list[list]:
    """Demos of different image sizes, fused tokens, a question and a target; one prompt starts with an image
    (BLIP-2-OPT puts BOS behind it)."""
    images = [Image(bb.image_transform(common.test_image(size))) for size in SIZES]
    fused = Embeds(torch.randn(3, bb.hidden_size))
    return [
        [Text("a red circle ."), images[0], Text("this is blue"), fused, images[1], images[2], Text("what color ?"),
         Text("red", target=True)],
        [images[3], Text("what shape is this ?"), Text("a square", target=True, eos=False)],
        [fused, Text("the answer")],
    ]


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_count_tokens_is_the_assembled_length(tiny, variant, wrap, monkeypatch):
    bb = tiny(variant)
    if wrap:
        monkeypatch.setattr(bb, "chat_template", TEMPLATE)
        bb._chat_affixes_cache = None
    prompts = [bb.wrap_query(p) for p in _prompts(bb)]
    if wrap:
        assert prompts[0][0] == Text("USER : ")  # the wrap is in force
    for add_bos in (True, False):
        expected = bb.assemble(prompts, add_bos=add_bos).context_tokens.tolist()
        counts = [bb.count_tokens(p, add_bos=add_bos) for p in prompts]
        assert counts == expected, (variant, add_bos)
    # Tokenisation only: no vision tower, no LM.
    monkeypatch.setattr(bb, "embed_images", lambda images: pytest.fail("count_tokens ran the vision tower"))
    monkeypatch.setattr(bb.model, "forward", lambda *a, **k: pytest.fail("count_tokens ran the model"))
    assert [bb.count_tokens(p) for p in prompts] == bb_counts(bb, prompts)


def bb_counts(bb, prompts) -> list[int]:
    """count_tokens through a caller's own image counter: it replaces image_token_count image by image."""
    own = {}

    def counter(pixels) -> int:
        own[id(pixels)] = bb.image_token_count(pixels)
        return own[id(pixels)]

    return [bb.count_tokens(p, image_tokens=counter) for p in prompts]


def test_a_callers_image_counter_is_used(tiny):
    bb = tiny("llava_next")
    prompt = _prompts(bb)[0]
    n_images = sum(isinstance(s, Image) for s in prompt)
    real = sum(bb.image_token_count(s.pixels) for s in prompt if isinstance(s, Image))
    assert bb.count_tokens(prompt, image_tokens=lambda pixels: 1000) == bb.count_tokens(prompt) - real + 1000 * n_images


def test_flan_t5_counts_what_goes_to_its_encoder(tiny):
    bb = tiny("blip2_t5")
    prompt = _prompts(bb)[0]
    without_target = prompt[:-1]
    assert bb.count_tokens(prompt) == bb.count_tokens(without_target)  # the target is decoded, not context
    assert bb.count_tokens(prompt) == bb.count_tokens(prompt, add_bos=False) + 1  # the encoder's EOS
    with pytest.raises(ValueError, match="must come last"):
        bb.count_tokens([Text("red", target=True), Text("what color ?")])


@pytest.mark.parametrize("variant", ["llava_next", "idefics3", "qwen2_vl", "qwen2_5_vl"])
def test_image_token_count_follows_the_image_size(tiny, variant):
    bb = tiny(variant)
    counts = []
    for size in SIZES:
        pixels = bb.image_transform(common.test_image(size))
        counts.append(bb.image_token_count(pixels))
        assert counts[-1] == bb.embed_images([bb.to_model(pixels)])[0].shape[0], size
    assert len(set(counts)) > 1, counts  # a constant would not be caught otherwise


@pytest.mark.parametrize("variant", ["llava", "blip2", "idefics2"])
def test_image_token_count_of_fixed_layouts(tiny, variant):
    bb = tiny(variant)
    for size in SIZES:
        pixels = bb.image_transform(common.test_image(size))
        assert bb.image_token_count(pixels) == bb.embed_images([bb.to_model(pixels)])[0].shape[0]


def test_anyres_count_at_llava_next_vicuna_geometry():
    """The formula against the model's own packing at LLaVA-v1.6's real geometry (336 px tiles of 14 px patches,
    its five pinpoints), on features of width 1 (the packing reads only shapes and the config)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14), text_config=LlamaConfig(),
                             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    gen = torch.Generator().manual_seed(0)
    sizes = [(480, 640), (640, 480), (375, 500), (224, 224), (1, 999)]
    sizes += [tuple(int(v) for v in torch.randint(16, 2000, (2,), generator=gen)) for _ in range(60)]
    for height, width in sizes:
        tiles = image_size_to_num_patches([height, width], config.image_grid_pinpoints, 336)
        packed, _ = LlavaNextModel.pack_image_features(
            SimpleNamespace(config=config), [torch.zeros(tiles, 576, 1)], torch.tensor([[height, width]]), "default",
            image_newline=torch.zeros(1))
        assert anyres_token_count(config, height, width) == packed[0].shape[0], (height, width)
    assert anyres_token_count(config, 480, 640, base_only=True) == 577
    # vanilla ICL on LLaVA-NeXT-vicuna-7B (4096 positions): one demo + the query image already overflow
    assert 2 * anyres_token_count(config, 480, 640) > 4096


# ---- max_positions ---------------------------------------------------------------------------------------


def test_max_positions_reads_the_lm_config(tiny, monkeypatch):
    bb = tiny("llava")
    assert (bb.max_positions, bb.max_positions_source) == (512, "text_config.max_position_embeddings=512")
    monkeypatch.setattr(bb.config.text_config, "max_position_embeddings", 300)
    assert bb.max_positions == 300 and bb.max_positions_source == "text_config.max_position_embeddings=300"
    assert tiny("blip2").max_positions == 128  # OPT's learned positions
    assert tiny("idefics3").max_positions == 1024


def test_mistral_sliding_window_counts_when_set(tiny, monkeypatch):
    bb = tiny("idefics2")  # Mistral LM, window 4096 (MistralConfig's default) above its 1024 positions
    assert bb.config.text_config.sliding_window == 4096 and bb.max_positions == 1024
    monkeypatch.setattr(bb.config.text_config, "sliding_window", 64)
    assert bb.max_positions == 64
    assert bb.max_positions_source == "text_config.sliding_window=64 (sliding attention)"
    monkeypatch.setattr(bb.config.text_config, "sliding_window", None)
    assert bb.max_positions == 1024


def test_qwen2_sliding_window_counts_only_when_switched_on(tiny, monkeypatch):
    bb = tiny("qwen2_vl")
    text = bb.config.text_config
    assert bb.max_positions == 512
    monkeypatch.setattr(text, "sliding_window", 64)  # set but not used (use_sliding_window false)
    assert bb.max_positions == 512
    monkeypatch.setattr(text, "use_sliding_window", True)  # on, but no layer slides (max_window_layers >= depth)
    assert bb.max_positions == 512
    monkeypatch.setattr(text, "layer_types", ["sliding_attention"] * text.num_hidden_layers)
    assert bb.max_positions == 64 and "sliding attention" in bb.max_positions_source


def test_t5_has_no_position_limit(tiny):
    bb = tiny("blip2_t5")
    assert bb.max_positions is None
    assert bb.max_positions_source.startswith("none") and "T5" in bb.max_positions_source


# ---- base view ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llava_next", "idefics2", "idefics3"])
def test_base_view_demos_with_a_full_view_query(tiny, variant):
    bb = tiny(variant)
    assert bb.has_multi_view
    base_view = bb.base_view_transform
    pickle.dumps(base_view)  # DataLoader workers run it
    big = common.test_image(LARGE_WIDE)
    full, base = bb.image_transform(big), base_view(big)
    assert bb.image_token_count(base) < bb.image_token_count(full)
    assert bb.embed_images([bb.to_model(base)])[0].shape[0] == bb.image_token_count(base)
    demos = [base_view(common.test_image(size)) for size in SIZES]
    query = bb.image_transform(common.test_image((20, 50)))
    prompt = bb.wrap_query([Image(demos[0]), Text("a red circle"), Image(demos[1]), Text("a blue square"),
                            Image(demos[3]), Text("this"), Image(query), Text("what color ?"),
                            Text("red", target=True)])
    other = [Image(full), Text("what shape ?")]
    batch = bb.assemble([prompt, other])
    assert batch.context_tokens.tolist() == [bb.count_tokens(prompt), bb.count_tokens(other)]
    # The query's tokens in the mixed batch are the ones it gets among full views only.
    start, end = batch.spans[0][6]
    alone = bb.embed_images([bb.to_model(query)])[0]
    torch.testing.assert_close(batch.inputs_embeds[0, start:end], alone, atol=1e-5, rtol=1e-4)


def test_llava_next_base_view_is_the_base_tile_and_newline(tiny):
    """A one-tile image gets the model's base features (the first rows of the full view) and image_newline."""
    bb = tiny("llava_next")
    big = common.test_image(LARGE_WIDE)
    full, base = bb.image_transform(big), bb.base_view_transform(big)
    torch.testing.assert_close(base["pixel_values"][0], full["pixel_values"][0])
    assert base["pixel_values"].shape[0] == 1 and torch.equal(base["image_sizes"], full["image_sizes"])
    full_emb, base_emb = bb.embed_images([bb.to_model(full), bb.to_model(base)])
    side = bb.config.vision_config.image_size // bb.config.vision_config.patch_size
    torch.testing.assert_close(base_emb[:-1], full_emb[: side**2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(base_emb[-1], bb.model.model.image_newline)
    bad = {**full, "pixel_values": full["pixel_values"][:2]}
    with pytest.raises(ValueError, match="tiles: expected"):
        bb.image_token_count(bad)


@pytest.mark.parametrize("variant", ["idefics2", "idefics3"])
def test_idefics_base_view_is_the_processor_without_splitting(tiny, variant, tmp_path):
    """The same pixels as a checkpoint saved without splitting (whose parity with HF test_backbone_idefics checks)."""
    bb = tiny(variant)
    unsplit = load_backbone(variant, str(tiny_idefics.save_tiny(tmp_path / "m", variant=variant,
                                                                image_splitting=False)))
    assert not unsplit.has_multi_view
    for size in SIZES:
        image = common.test_image(size)
        base, reference = bb.base_view_transform(image), unsplit.image_transform(image)
        assert base.keys() == reference.keys()
        for key in base:
            assert torch.equal(base[key], reference[key]), (size, key)
        assert base["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("variant", ["llava", "blip2"])
def test_fixed_resolution_base_view_is_the_image_transform(tiny, variant):
    bb = tiny(variant)
    assert not bb.has_multi_view and bb.base_view_transform is bb.image_transform


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_has_no_base_view(tiny, variant):
    bb = tiny(variant)
    assert not bb.has_multi_view
    with pytest.raises(ValueError, match="no base view.*native resolution.*eval.demo_image_view"):
        bb.base_view_transform  # noqa: B018 - the property raises
