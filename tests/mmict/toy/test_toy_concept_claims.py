"""Issue 23's claims as `make train EXP=toy_mmict` makes them (its backbone recipe and training settings) on a
smaller toy world: the toy BLIP-2 learns concept induction in context on held-out rules,
and MMICT's baselines order as its paper says they should, trained with the same data, steps and seed.

1. The toy BLIP-2, pretrained briefly (BLIP-2's two stages), does vanilla multimodal ICL on rules it never saw:
   well above chance with image + label demos; without images (text-only demos) or without demos at chance.
2. MMICT's designs from the toy BLIP-2's Q-Former, on the task's own train split (tuning rules), evaluated on the
   held-out rules: vanilla ICT (`concat`) beats vanilla fine-tuning (`none`) by a margin. MMICT's `fused` reaching
   `concat` is the paper's claim; on the toy backbone it is not met (see the xfail and docs/methods.md).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import evaluate_trained

from mmict.backbones import load_backbone
from mmict.config import load_config
from mmict.toy.backbone import ensure_toy_backbone
from mmict.toy.blip2 import QFORMER_TEXT_DIR
from mmict.toy.probes import probe_concept
from mmict.train import train

pytestmark = pytest.mark.slow



def _toy_blip2_recipe() -> SimpleNamespace:
    """experiments/base/toy_blip2.yaml's recipe, exactly (a shorter stage 2 left vanilla ICT too weak to compare)."""
    from omegaconf import OmegaConf

    return SimpleNamespace(**OmegaConf.to_container(load_config("toy_mmict").backbone.toy))


SHOTS = 4


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    path = tmp_path_factory.mktemp("concept") / "blip2"
    ensure_toy_backbone(path, _toy_blip2_recipe())
    return path


def test_toy_blip2_learns_concepts_in_context_on_held_out_rules(blip2):
    probe = probe_concept(load_backbone("blip2", str(blip2)), shots=(0, 2, SHOTS), episodes=200, seed=3)
    assert probe["images"][SHOTS] >= 0.70, probe  # chance 0.5: the rule comes from the demo images
    assert probe["none"][0] <= 0.62 and max(probe["text"].values()) <= 0.62, probe  # labels alone say nothing


def _train_design(blip2, root, design: str) -> float:
    cfg = load_config("toy_mmict", [
        f"run_root={root / 'runs'}", f"data.root={root / 'toy'}", f"backbone.name_or_path={blip2}",
        f"method.mmict.hub_tokenizer={blip2 / QFORMER_TEXT_DIR}", "backbone.toy=null", f"method.demo_design={design}",
        "eval.companions=[]", "data.toy.num_docs=8", "data.toy.val_docs=4", "data.toy.vqa_train=4",
        "data.toy.vqa_test=4", "data.toy.binding_episodes=2", "data.toy.concept_episodes=40",
        "data.toy.concept_tuning_episodes=200", "data.toy.concept_tuning_val_episodes=4", "data.num_workers=0",
        "data.val_episodes=8", "trainer.val_check_interval=300", "trainer.checkpoint_every_n_steps=300",
        "trainer.progress_bar=false", "eval.enabled=false",
        "logger.wandb=false",
    ])
    summary = train(cfg)
    [result] = evaluate_trained(cfg, summary, folder="concept", task="toy_concept",
                                shots=[0 if design == "none" else SHOTS], demo_modes=[design], max_new_tokens=2)
    return result.accuracy


@pytest.fixture(scope="module")
def designs(blip2, tmp_path_factory):
    root = tmp_path_factory.mktemp("designs")
    return {design: _train_design(blip2, root, design) for design in ("concat", "none", "fused")}


def test_vanilla_ict_beats_vanilla_fine_tuning(designs):
    assert designs["concat"] >= designs["none"] + 0.15, designs


@pytest.mark.xfail(strict=True, reason="issue 23 target missed on the toy BLIP-2: MMICT's fused demos (M-Hub text "
                   "features) stay at the chance floor (train loss at ln2/2 per target token) after 300 and 1000 "
                   "steps, although a linear probe reads the demo's label (100%) and attributes (85-96%) from them; "
                   "see docs/methods.md")
def test_mmict_fused_reaches_vanilla_ict(designs):
    assert designs["fused"] >= designs["concat"] - 0.05 and designs["fused"] >= 0.75, designs
