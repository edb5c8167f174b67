"""Loading backbones (errors that say what to do), chat templates, LoRA fine-tuning, checkpoint checks."""

from __future__ import annotations

import pytest
import torch
from helpers import episode_batch, tiny_aim_cfg
from tiny_models import save_tiny

from mmict.backbones import build_backbone, load_backbone
from mmict.config import ConfigError, list_experiments, load_config
from mmict.methods.aim.module import AIMModule
from mmict.methods.base import check_checkpoint_backbone
from mmict.methods.finetune.module import FinetuneModule
from mmict.segments import Image, Text


def test_unknown_family_suggests_the_nearest():
    with pytest.raises(ValueError, match="Did you mean 'qwen2_vl'"):
        load_backbone("qwen2vl", "whatever")


def test_missing_local_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Point backbone.name_or_path"):
        load_backbone("llava", str(tmp_path / "nope"))


def _offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE as a user sets it before starting (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_id_fails_clearly(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        load_backbone("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf")


def test_wrong_family_for_a_checkpoint_fails(tmp_path):
    path = save_tiny("llava", tmp_path / "llava")
    with pytest.raises(ValueError, match="is a 'llava' checkpoint.*backbone.family=llava"):
        load_backbone("qwen2_vl", str(path))


def test_chat_template_wraps_the_query_and_leaves_the_target_last(tmp_path):
    path = save_tiny("llava", tmp_path / "llava")
    bb = load_backbone("llava", str(path))
    img = torch.zeros(3, 16, 16)
    prompt = [Text("a red circle "), Image(img), Text("what color ?"), Text("red", target=True)]
    assert bb.chat_template is None and bb.wrap_query(prompt) == prompt  # no template: unchanged
    bb.chat_template = ("{{ bos_token }}{% for m in messages %}USER : {{ m['content'][0]['text'] }} "
                        "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")
    wrapped = bb.wrap_query(prompt)
    assert wrapped[0] == Text("USER : ") and wrapped[-2] == Text(" ASSISTANT :") and wrapped[-1] == prompt[-1]
    assert wrapped[1:-2] == prompt[:-1]  # BOS is not duplicated: assemble adds it
    bb.use_chat_template = False
    assert bb.wrap_query(prompt) == prompt


def test_finetune_trains_lora_only_and_saves_only_lora(tiny_backbone_dir):
    with pytest.raises(ConfigError, match="backbone.lora.r"):
        tiny_aim_cfg(tiny_backbone_dir, "method.name=finetune", "eval.demo_modes=[none]")
    with pytest.raises(ConfigError, match="eval.demo_modes=\\[none\\]"):
        tiny_aim_cfg(tiny_backbone_dir, "method.name=finetune", "backbone.lora.r=4", "eval.demo_modes=[fused,images]")
    cfg = tiny_aim_cfg(tiny_backbone_dir, "method.name=finetune", "backbone.lora.r=4", "optim.warmup_steps=0")
    module = FinetuneModule(cfg)
    assert module.eval_demo_modes() == ["none"]  # eval.demo_modes null: the method's own
    batch = episode_batch(module.backbone)
    prompts = module.batch_prompts(batch)
    assert all(not any(isinstance(s, Image) for s in p[:-3]) for p in prompts)  # no demos: query only
    opt = module.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    after = module.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    ckpt: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    fresh = FinetuneModule(cfg)
    fresh.load_state_dict(ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_checkpoint_for_another_hidden_size_is_refused(tiny_backbone_dir, tmp_path):
    module = AIMModule(tiny_aim_cfg(tiny_backbone_dir))
    ckpt: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    check_checkpoint_backbone(ckpt, module.backbone)  # same backbone: fine
    ckpt["mmict"]["hidden_size"] = 4096
    with pytest.raises(ValueError, match="hidden size 4096.*hidden size 32"):
        check_checkpoint_backbone(ckpt, module.backbone)
    state = {k: torch.zeros(8, 8) for k in ckpt["state_dict"]}
    with pytest.raises(ValueError, match="another hidden size"):
        module.load_state_dict(state)


REAL_EXPERIMENTS = [n for n in list_experiments() if load_config(n).backbone.toy is None]


@pytest.mark.parametrize("name", REAL_EXPERIMENTS)
def test_real_experiments_name_their_weights_and_fail_clearly_without_them(name, monkeypatch):
    _offline(monkeypatch)
    cfg = load_config(name)
    assert "/" in cfg.backbone.name_or_path  # a hub id
    with pytest.raises(OSError, match=f"could not load backbone '{cfg.backbone.name_or_path}'.*HF_HUB_OFFLINE"):
        build_backbone(cfg.backbone)
