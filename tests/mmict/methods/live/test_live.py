"""LIVE on the tiny toy backbone: only its vectors train (the backbone stays bit-identical), its KL and ground-truth
losses fall, a checkpoint holds the vectors alone and reloads them, evaluation's rows say what they are."""

from __future__ import annotations

import pytest
import torch
from helpers import episode_batch

from mmict.config import config_from_dict
from mmict.methods import METHODS
from mmict.methods.live.module import LIVEModule, answer_logit_mask, kl_divergence


def _module(path, **live) -> LIVEModule:
    torch.manual_seed(0)
    cfg = config_from_dict({"method": {"name": "live", "live": live},
                            "backbone": {"family": "llava", "name_or_path": str(path), "toy": None},
                            "optim": {"lr": 5e-2, "warmup_steps": 0}, "data": {"shots": 2},
                            "trainer": {"max_steps": 100}})
    return METHODS["live"](cfg)


@pytest.fixture(scope="module")
def trained(tiny_backbone_dir):
    """A LIVE module after 12 steps on one batch, with the backbone's weights before and the losses per step."""
    # vectors that start far from the teacher (the tiny random model's 0- and 2-shot answers barely differ), so the
    # KL has something to fall from
    module = _module(tiny_backbone_dir, vector_init_std=1.0, alpha_init=1.0)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    batch = episode_batch(module.backbone)
    opt = module.configure_optimizers()["optimizer"]
    parts = []
    for _ in range(12):
        loss, _ = module.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        parts.append({k: float(v) for k, v in module._parts.items()})
    return module, before, parts


def test_only_the_vectors_train_and_the_backbone_stays_bit_identical(trained):
    module, before, _ = trained
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"vectors.alpha", "vectors.icv"}
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.vectors.icv.shape == (1, module.steering.num_layers, module.backbone.hidden_size)


def test_the_kl_and_ground_truth_losses_fall(trained):
    _, _, parts = trained
    assert parts[-1]["kl"] < 0.95 * parts[0]["kl"]  # measured: 0.0117 -> 0.0105 in 12 steps
    assert parts[-1]["gt"] < parts[0]["gt"]
    # the teacher sees the demos, the student does not
    assert parts[0]["teacher_context_tokens"] > 0


def test_a_checkpoint_holds_the_vectors_alone_and_reloads_them(trained, tiny_backbone_dir):
    module, _, _ = trained
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"vectors.alpha", "vectors.icv"}
    fresh = _module(tiny_backbone_dir)
    assert not torch.equal(fresh.vectors.icv, module.vectors.icv)
    fresh.load_state_dict(ckpt["state_dict"])
    assert torch.equal(fresh.vectors.icv, module.vectors.icv) and torch.equal(fresh.vectors.alpha, module.vectors.alpha)


def test_evaluation_rows_no_demos_with_vectors_and_icl_without(trained):
    module, _, _ = trained
    module.eval()
    batch = episode_batch(module.backbone)
    assert module.eval_demo_modes() == ["none", "images"]
    assert "no demos at eval" in module.mode_labels["none"] and "2-shot teacher" in module.mode_labels["none"]
    with torch.no_grad():
        query = module.backbone.assemble(module.batch_prompts(batch, "none", with_target=False))
        assert module.steering.enabled  # LIVE's row: no demos, the vectors on
        on = module.backbone(query).logits
        module.batch_prompts(batch, "images", with_target=False)
        assert not module.steering.enabled  # vanilla ICL: the frozen model alone
        off = module.backbone(query).logits
    assert (on - off).abs().max() > 1e-4  # the vectors change LIVE's zero-demo answers


def test_the_kl_is_zero_for_equal_distributions_and_the_mask_shifts_by_one():
    logits = torch.randn(5, 11)
    assert float(kl_divergence(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(logits, torch.randn(5, 11))) > 0
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    assert answer_logit_mask(labels, "target").tolist() == [[False, True, True, False, False]]
    assert answer_logit_mask(labels, "reference").tolist() == [[False, False, True, True, False]]


def test_bad_settings_are_named(tiny_backbone_dir):
    with pytest.raises(ValueError, match="method.live.kl_positions"):
        _module(tiny_backbone_dir, kl_positions="all")
