"""Every impossible setting is refused when the config loads (before the toy world, the toy backbone, a run folder
or a training step), with a message that names the key."""

from __future__ import annotations

import re

import pytest

from mmict.config import ConfigError, list_experiments, load_config
from mmict.config.ranges import PRETRAIN_KINDS

# (override, the key the message must name); the first rows are issue 26's list.
IMPOSSIBLE = [
    ("backbone.family=lava", "backbone.family"),
    ("eval.task=toy_bindingz", "eval.task"),
    ("optim.lr=-1", "optim.lr"),
    ("data.num_workers=-1", "data.num_workers"),
    ("trainer.max_steps=-3", "trainer.max_steps"),
    ("eval.seeds=[]", "eval.seeds"),
    ("trainer.devices=0", "trainer.devices"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
    ("trainer.gradient_clip_val=-1.0", "trainer.gradient_clip_val"),
    ("trainer.accelerator=gpux", "trainer.accelerator"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.epoch_size=0", "data.epoch_size"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
    ("data.val_episodes=-1", "data.val_episodes"),
    ("data.min_image_size=-5", "data.min_image_size"),
    ("data.min_similarity=1.5", "data.min_similarity"),
    ("data.corpus=''", "data.corpus"),
    ("data.toy.num_docs=0", "data.toy.num_docs"),
    ("data.toy.n_way=0", "data.toy.n_way"),
    ("data.toy.binding_fraction=1.5", "data.toy.binding_fraction"),
    ("data.toy.image_size=0", "data.toy.image_size"),
    ("eval.seeds=[0,0]", "eval.seeds"),
    ("eval.seeds=[-1]", "eval.seeds"),
    ("eval.shots=[0,2,2]", "eval.shots"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.postprocess=vqaa", "eval.postprocess"),
    ("eval.rices.precision=fp8", "eval.rices.precision"),
    ("eval.rices.batch_size=0", "eval.rices.batch_size"),
    ("eval.min_new_tokens=5", "eval.min_new_tokens"),  # toy_aim's eval.max_new_tokens is 3
    ("eval.companions=[toy_mmict_bindng]", "eval.companions"),
    ("eval.companions=['toy_mmict_binding trainer.max_step=5']", "eval.companions"),
    ("eval.companions=[toy_mmict_binding,toy_mmict_binding]", "eval.companions"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("backbone.lora.alpha=0", "backbone.lora.alpha"),
    ("backbone.toy.family=blip2", "backbone.family"),
    ("backbone.toy.family=qwen", "backbone.toy.family"),
    ("backbone.toy.text_hidden_size=90", "backbone.toy.text_hidden_size"),
    ("backbone.toy.text_layers=0", "backbone.toy.text_layers"),
    ("backbone.toy.pretrain_lr=0", "backbone.toy.pretrain_lr"),
    ("backbone.toy.pretrain_steps=-1", "backbone.toy.pretrain_steps"),
    ("backbone.toy.pretrain_text_steps=6000", "backbone.toy.pretrain_text_steps"),
    ("backbone.toy.pretrain_grounding_layer=9", "backbone.toy.pretrain_grounding_layer"),
    ("backbone.toy.pretrain_mix={captions: 1, bogus: 2}", "backbone.toy.pretrain_mix"),
    # every kind toy_aim's mix has at 0 (an override merges into the experiment's mix): nothing left to draw
    ("backbone.toy.pretrain_mix={captions: 0, binding: 0, concept: 0, word_lists: 0}", "backbone.toy.pretrain_mix"),
    ("method.aim.layer=5", "method.aim.layer"),
    ("method.mmict.hub.num_layers=0", "method.mmict.hub.num_layers"),
    ("method.mmict.max_frames=0", "method.mmict.max_frames"),
    ("trainer.fsdp.sharded_above_params=-1", "trainer.fsdp.sharded_above_params"),
    ("slurm.time=1day", "slurm.time"),
    ("slurm.mem=64GB", "slurm.mem"),
    ("slurm.max_concurrent=0", "slurm.max_concurrent"),
    ("logger.project=''", "logger.project"),
]


@pytest.mark.parametrize(("override", "key"), IMPOSSIBLE, ids=[o for o, _ in IMPOSSIBLE])
def test_each_impossible_setting_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("toy_aim", [override])
    assert f"'{key}'" in str(info.value), str(info.value)


def test_fsdp_on_the_cpu_is_refused_as_a_combination():
    with pytest.raises(ConfigError, match=r"'trainer\.strategy'.*'trainer\.accelerator'"):
        load_config("toy_aim", ["trainer.strategy=fsdp", "trainer.accelerator=cpu"])


def test_an_unknown_task_is_named_as_such_not_as_a_prompt_format():
    with pytest.raises(ConfigError, match=r"^config key 'eval\.task' = 'toy_bindingz'.*Did you mean 'toy_binding'"):
        load_config("toy_aim", ["eval.task=toy_bindingz"])


def test_every_shipped_experiment_and_the_edges_of_each_range_load():
    for name in list_experiments():
        load_config(name)
    load_config("toy_aim", ["data.num_workers=0", "optim.warmup_steps=0", "trainer.gradient_clip_val=null",
                            "trainer.limit_val_batches=0", "data.min_similarity=-1.0", "seed=4294967295",
                            "eval.seeds=[0]", "trainer.divergence_guard=null", "slurm.time=2-00:00:00",
                            "slurm.mem=64G", "backbone.toy=null", "backbone.family=qwen2_vl", "method.aim.layer=30",
                            "data.toy=null"])
    load_config("toy_aim", [f"backbone.toy.pretrain_mix={{{', '.join(f'{k}: 1' for k in PRETRAIN_KINDS)}}}"])


def test_the_toy_pretraining_kinds_are_the_streams_own():
    """A kind the stream does not know became a word list without a word; the config's list is the stream's."""
    import inspect

    from mmict.toy import pretrain_data

    source = inspect.getsource(pretrain_data.ToyPretrainStream.__iter__)
    handled = set(re.findall(r'kind == "(\w+)"', source)) | {"word_lists"}
    assert handled == set(PRETRAIN_KINDS) and set(pretrain_data.MIX) <= set(PRETRAIN_KINDS)
