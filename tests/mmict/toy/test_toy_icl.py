"""The toy world does real in-context learning (issue 3's checks), on a toy backbone pretrained briefly.

1. A toy backbone pretrained for a short time binds in context on *held-out* words (the eval
   pool, never seen in pretraining): with image+text demos it names the query well above the 50% of
   copying a demo word at random; zero-shot it cannot, and with text-only demos it stays near chance.
2. AIM's projector, trained on that frozen backbone with the web corpus (tuning pool words), beats
   text-only demos on the downstream binding task (eval pool words).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import evaluate_trained

from mmict.backbones import load_backbone
from mmict.config import load_config
from mmict.toy.backbone import ensure_toy_backbone
from mmict.toy.pretrain import probe_binding
from mmict.train import train

pytestmark = pytest.mark.slow

# The default toy architecture and recipe (vision stage, grounding at layer 1), pretrained for fewer steps.
SHORT_TOY = dict(image_size=32, patch_size=8, vision_hidden_size=64, vision_layers=2, text_hidden_size=96,
                 text_layers=4, num_heads=4, intermediate_size=256, max_position_embeddings=1024, seed=0,
                 pretrain_steps=2000, pretrain_text_steps=600, pretrain_vision_steps=300,
                 pretrain_grounding_weight=1.0, pretrain_grounding_layer=1, pretrain_batch_size=16,
                 pretrain_lr=1e-3)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("icl") / "backbone"
    ensure_toy_backbone(path, SimpleNamespace(**SHORT_TOY))
    return path


def test_vanilla_icl_on_held_out_words_binds_and_text_only_demos_cannot(pretrained):
    backbone = load_backbone("llava", str(pretrained))
    probe = probe_binding(backbone, shots=(0, 2, 4), modes=("images", "text"), episodes=100, seed=7)
    assert probe["none"][0] <= 0.02, probe  # held-out words cannot be named without demos
    # 2-way episodes: copying a demo word at random scores 0.5; binding needs the demo images.
    assert min(probe["images"][2], probe["images"][4]) >= 0.75, probe
    assert max(probe["text"].values()) <= 0.65, probe


def test_aim_projector_beats_text_only_demos(pretrained, tmp_path):
    cfg = load_config("toy_aim", [
        f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'toy'}",
        f"backbone.name_or_path={pretrained}", "backbone.toy=null",
        "data.toy.num_docs=400", "data.toy.val_docs=16", "data.toy.vqa_train=4", "data.toy.vqa_test=4",
        "data.toy.binding_fraction=1.0", "data.toy.binding_episodes=40", "data.num_workers=0",
        "data.batch_size=16", "data.epoch_size=400", "data.val_episodes=16", "trainer.max_steps=150",
        "trainer.val_check_interval=150", "trainer.checkpoint_every_n_steps=150", "trainer.progress_bar=false",
        "optim.lr=3e-3", "eval.enabled=false", "logger.wandb=false",
    ])
    summary = train(cfg)
    assert summary["val_loss"]["after"] < summary["val_loss"]["before"]
    results = evaluate_trained(cfg, summary, folder="binding", task="toy_binding", shots=[2],
                               demo_modes=["fused", "text"], max_new_tokens=3)
    acc = {r.method: r.accuracy for r in results}
    # Text-only demos carry no image, so at best they pick a demo word at random (0.5).
    assert acc["fused"] >= max(acc["text"], 0.5) + 0.2, acc
