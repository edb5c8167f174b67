"""MimIC's module on the tiny toy backbone: only the shifts train, both losses fall, the checkpoint is the shifts."""

from __future__ import annotations

import pytest
import torch
from helpers import episode_batch

from mmict.backbones.head_shift import head_sites
from mmict.methods.mimic.module import MimICModule, query_tails


def mimic_module(path, **mimic) -> MimICModule:
    from mmict.config import config_from_dict

    torch.manual_seed(0)
    cfg = config_from_dict({"method": {"name": "mimic", "mimic": mimic},
                            "backbone": {"family": "llava", "name_or_path": str(path), "toy": None},
                            "optim": {"lr": 5e-3, "warmup_steps": 0}, "data": {"shots": 2}})
    return MimICModule(cfg)


@pytest.mark.parametrize("term", ["ce_loss", "align_loss"])
def test_only_the_shifts_train_and_each_loss_falls(tiny_backbone_dir, term):
    # Each loss on its own: on a random tiny model the demos barely move the query's states (alignment ~1e-7) and the
    # CE sits near uniform, so with both on the CE's gradient would dominate. Measured at lr 0.05: CE 5.179 -> 5.145,
    # alignment 1.03e-7 -> 8.6e-8 in 6 steps; frozen shifts (no gradient path) would leave both bit-identical.
    weights = {"ce_loss_weight": float(term == "ce_loss"), "align_loss_weight": float(term == "align_loss")}
    module = mimic_module(tiny_backbone_dir, **weights)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"shift.shift", "shift.gate.weight", "shift.gate.bias"}
    frozen = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    batch = episode_batch(module.backbone)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.05)
    first, _ = module.losses(batch)
    for _ in range(5):
        parts, _ = module.losses(batch)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    last, _ = module.losses(batch)
    assert last[term] < (0.995 if term == "ce_loss" else 0.9) * first[term]
    for n, p in module.backbone.named_parameters():
        assert torch.equal(p, frozen[n]), n  # bit-identical


def test_teacher_sees_the_demos_and_the_tails_hold_the_same_query(tiny_backbone_dir):
    module = mimic_module(tiny_backbone_dir)
    batch = episode_batch(module.backbone)
    teacher, student = module.batch_prompts(batch, "images"), module.batch_prompts(batch, "none")
    t, s = module.backbone.assemble(teacher), module.backbone.assemble(student)
    t_tails, s_tails = query_tails(teacher, t), query_tails(student, s)
    for b in range(len(batch)):
        (t0, t1), (s0, s1) = t_tails[b], s_tails[b]
        assert t1 - t0 == s1 - s0  # the same query tokens, after the demos in the teacher
        assert torch.equal(t.input_ids[b, t0:t1], s.input_ids[b, s0:s1])
    assert t_tails[0][0] > s_tails[0][0]  # episode 0 has two demos before its query


def test_checkpoint_holds_the_shifts_alone_and_reloads(tiny_backbone_dir):
    module = mimic_module(tiny_backbone_dir)
    with torch.no_grad():
        module.shift.shift.add_(1.0)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"shift.shift", "shift.gate.weight", "shift.gate.bias"}
    fresh = mimic_module(tiny_backbone_dir)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.shift.shift, module.shift.shift)
    prompts = fresh.batch_prompts(episode_batch(fresh.backbone), with_target=False)
    asm = fresh.backbone.assemble(prompts, padding_side="left")
    with torch.no_grad():
        assert torch.allclose(fresh.backbone(asm).logits, module.backbone(asm).logits, atol=1e-5)


def test_evaluation_names_the_rows_and_shows_no_demos(tiny_backbone_dir):
    module = mimic_module(tiny_backbone_dir)
    assert module.eval_demo_modes() == ["none"]
    assert module.mode_labels["none"] == "MimIC (no demos at eval, 2-shot teacher)"
    assert len(head_sites(module.backbone.attention_layers())) == module.backbone.num_layers


def test_vanilla_icl_rows_of_a_mimic_run_are_the_frozen_model(tiny_backbone_dir):
    """eval.demo_modes=[none,images]: the no-demo prompt runs with the shifts, the demo prompts (vanilla ICL, its
    row labelled so) without them, as the frozen model would answer."""
    module = mimic_module(tiny_backbone_dir)
    with torch.no_grad():
        for p in module.shift.parameters():
            p.add_(torch.randn_like(p))  # shifts far from zero: they change the logits
    batch = episode_batch(module.backbone)

    def logits(mode: str) -> torch.Tensor:
        prompts = module.batch_prompts(batch, mode, with_target=False)
        with torch.no_grad():
            return module.backbone(module.backbone.assemble(prompts, padding_side="left")).logits

    shifted, icl = logits("none"), logits("images")
    module.head_shift.detach()  # the frozen model alone
    assert not torch.allclose(shifted, logits("none"))  # MimIC's row is shifted
    assert torch.equal(icl, logits("images"))  # vanilla ICL's row is the frozen model's
    assert module.mode_labels["images"] == "vanilla ICL (images+text; MimIC's shifts off)"
