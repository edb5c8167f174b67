"""AIM: demo reading, fused tokens, training step (frozen stays frozen), checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers import episode_batch, pixels, tiny_aim_cfg
from tiny_models.numerics import assert_fp32_close

from mmict.methods.aim.module import AIMModule
from mmict.segments import Image, Text


@pytest.fixture()
def module(tiny_backbone_dir):
    return AIMModule(tiny_aim_cfg(tiny_backbone_dir))


def test_reader_takes_text_positions_of_a_lone_demo(module):
    bb = module.backbone
    img = pixels(bb, (220, 20, 20))
    text = "a red circle on the left ."
    hidden = module.reader.read(img[None], [text])[0]
    n_text = len(bb.tokenize([text])[0])
    assert hidden.shape == (n_text, bb.hidden_size)
    # same as running the demo alone and slicing the last n_text positions (final layer, normed)
    alone = bb.assemble([[Image(img), Text(text)]])
    ref = bb(alone, output_hidden_states=True).hidden_states[-1][0, -n_text:]
    torch.testing.assert_close(hidden, ref)
    # reading in a batch with a longer demo (padding) changes nothing but fp32 reordering noise (other matmul
    # shapes: tiny_models/numerics.py): demos never see each other
    batched = module.reader.read(torch.stack([img, img]), [text, text + " Question: what shape is it ?"])[0]
    assert_fp32_close(batched, hidden)


def test_fused_tokens_replace_demo_in_prompt(module):
    batch = episode_batch(module.backbone)
    prompts = module.batch_prompts(batch)
    assembled = module.backbone.assemble(prompts)
    n_text = [len(ids) for ids in module.backbone.tokenize(batch.demo_texts)]
    # episode 0: two demos become exactly their text-token counts, no image tokens for them
    fused_lengths = [e - s for s, e in assembled.spans[0][:2]]
    assert fused_lengths == n_text[:2]
    vanilla = module.backbone.assemble(module.batch_prompts(batch, demo_mode="images"))
    saved = vanilla.context_tokens[0] - assembled.context_tokens[0]
    # the word-level toy tokenizer gives the demo separator no token: the saving is the image tokens
    assert saved == 2 * module.backbone.image_tokens_per_image


def test_training_step_updates_projector_only(tiny_backbone_dir):
    module = AIMModule(tiny_aim_cfg(tiny_backbone_dir, "optim.warmup_steps=0"))  # lr > 0 at the first step
    batch = episode_batch(module.backbone)
    frozen = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    proj_before = {k: v.clone() for k, v in module.projector.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.projector.parameters()}
    module.train()
    loss = module.loss(batch)[0]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.projector.parameters())
    assert all(p.grad is None for p in module.backbone.parameters())
    optimizer.step()
    for k, v in module.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, proj_before[k]) for k, v in module.projector.state_dict().items())


def test_loss_is_on_query_target_only(module):
    batch = episode_batch(module.backbone)
    assembled = module.backbone.assemble(module.batch_prompts(batch))
    target_ids = module.backbone.tokenize(batch.query_targets)
    assert (assembled.labels != -100).sum(1).tolist() == [len(t) + 1 for t in target_ids]  # + EOS


def test_checkpoint_holds_projector_not_backbone(module, tiny_backbone_dir, tmp_path):
    ckpt: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("projector.") for k in ckpt["state_dict"])
    fresh = AIMModule(tiny_aim_cfg(tiny_backbone_dir))
    fresh.load_state_dict(ckpt["state_dict"])
    for k, v in module.projector.state_dict().items():
        assert torch.equal(fresh.projector.state_dict()[k], v)
    mlp = AIMModule(tiny_aim_cfg(tiny_backbone_dir, "method.aim.projector=mlp"))
    with pytest.raises(KeyError, match="missing"):
        mlp.load_state_dict(ckpt["state_dict"])


def test_reader_layer_out_of_range(tiny_backbone_dir):
    with pytest.raises(ValueError, match="method.aim.layer=7"):
        AIMModule(tiny_aim_cfg(tiny_backbone_dir, "method.aim.layer=7"))


def test_identity_projector_starts_as_the_hidden_states():
    from mmict.methods.aim.reader import FusedTokenProjector

    hidden = torch.randn(3, 8)
    assert torch.equal(FusedTokenProjector(8, 8, init="identity")(hidden), hidden)
    assert not torch.allclose(FusedTokenProjector(8, 8)(hidden), hidden)  # PyTorch's init by default
    with pytest.raises(ValueError, match="square linear"):
        FusedTokenProjector(8, 8, kind="mlp", init="identity")
