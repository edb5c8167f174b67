"""Tests for mmict.config: loading, inheritance, overrides, validation messages, round-trip."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import REPO
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmict.config import (
    EXPERIMENTS_DIR,
    ConfigError,
    ExperimentConfig,
    list_experiments,
    load_config,
    save_config,
    to_yaml,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    """A synthetic experiments dir: base <- child, so the merge order is observable."""
    root = tmp_path / "experiments"
    write(
        root / "base" / "common.yaml",
        """\
        seed: 1
        trainer:
          max_steps: 10
          log_every_n_steps: 5
        data:
          batch_size: 2
        """,
    )
    write(
        root / "child.yaml",
        """\
        base: [base/common.yaml]
        seed: 2
        trainer:
          max_steps: 20
        """,
    )
    return root


# ---------------------------------------------------------------------------------------------- real files


def test_toy_aim_loads_with_expected_values() -> None:
    cfg = load_config("toy_aim")
    assert isinstance(cfg, DictConfig)
    assert OmegaConf.get_type(cfg) is ExperimentConfig  # structured: types stay enforced downstream
    assert cfg.name == "toy_aim"
    assert "base" not in cfg
    assert cfg.method.name == "aim"
    assert cfg.method.aim.projector == "linear"
    assert cfg.method.aim.layer == 1 and cfg.method.aim.projector_init == "identity"
    assert cfg.backbone.family == "llava"
    assert cfg.backbone.toy is not None and cfg.backbone.toy.text_hidden_size == 96
    assert cfg.data.root == "data/toy"
    assert cfg.data.toy is not None and cfg.data.toy.num_docs == 3000
    assert (cfg.data.min_shots, cfg.data.max_shots) == (1, 7)
    assert list(cfg.eval.shots) == [0, 1, 2, 4, 8] and list(cfg.eval.seeds) == [0, 1, 2]
    assert cfg.eval.task == "toy_binding"
    assert cfg.backbone.toy.pretrain_text_steps < cfg.backbone.toy.pretrain_steps
    assert cfg.trainer.precision == "32-true"
    assert cfg.logger.offline is True
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-3)
    with pytest.raises(OmegaConfBaseException):
        cfg.trainer.max_steps = "abc"  # the returned config still validates assignments


def test_experiments_dir_and_listing() -> None:
    assert EXPERIMENTS_DIR == REPO / "experiments"
    names = list_experiments()
    assert "toy_aim" in names
    assert not any(n.startswith("base/") for n in names)  # shared pieces are not experiments


def test_every_listed_experiment_loads() -> None:
    for name in list_experiments():
        load_config(name)


def test_cli_overrides_from_the_docs() -> None:
    cfg = load_config("toy_aim", ["trainer.max_steps=50", "data.max_shots=4", "eval.shots=[0,1]"])
    assert cfg.trainer.max_steps == 50
    assert list(cfg.eval.shots) == [0, 1]


# ------------------------------------------------------------------------------------ merging, inheritance


def test_inheritance_order_base_then_file_then_cli(exp_dir: Path) -> None:
    cfg = load_config("child", experiments_dir=exp_dir)
    assert cfg.seed == 2  # file beats base
    assert cfg.trainer.max_steps == 20  # file beats base, nested
    assert cfg.trainer.log_every_n_steps == 5  # base beats schema default
    assert cfg.data.batch_size == 2
    assert cfg.trainer.precision == "32-true"  # schema default survives
    assert "base" not in cfg

    cfg = load_config("child", ["trainer.max_steps=30", "seed=3"], experiments_dir=exp_dir)
    assert cfg.trainer.max_steps == 30  # CLI beats file
    assert cfg.seed == 3
    assert cfg.trainer.log_every_n_steps == 5


def test_multiple_bases_merge_in_order_and_recursively(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "base" / "a.yaml", "seed: 1\ntrainer: {max_steps: 1, devices: 1}\n")
    write(root / "base" / "b.yaml", "base: base/a.yaml\ntrainer: {max_steps: 2}\n")
    write(root / "base" / "c.yaml", "seed: 3\n")
    write(root / "exp.yaml", "base: [base/b.yaml, base/c.yaml]\n")
    cfg = load_config("exp", experiments_dir=root)
    assert cfg.trainer.max_steps == 2  # b (which inherits a) overrides a
    assert cfg.seed == 3  # the later base wins
    assert cfg.name == "exp"


def test_base_cycle_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "a.yaml", "base: [b.yaml]\nseed: 1\n")
    write(root / "b.yaml", "base: [a.yaml]\nseed: 2\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config("a", experiments_dir=root)
    assert "a.yaml" in str(info.value) and "b.yaml" in str(info.value)

    write(root / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config("self", experiments_dir=root)


def test_missing_base_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "exp.yaml", "base: [base/nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"base 'base/nope.yaml'.*not found"):
        load_config("exp", experiments_dir=root)


def test_cli_override_of_nested_key_and_list(exp_dir: Path) -> None:
    cfg = load_config(
        "child",
        [
            "backbone.toy.text_hidden_size=48",
            "eval.shots=[0,8]",
            "logger.tags=[a,b]",
            "optim.lr=3e-4",
            "logger.entity=null",
            "trainer.gradient_clip_val=null",
            "data.toy=null",
        ],
        experiments_dir=exp_dir,
    )
    assert cfg.backbone.toy.text_hidden_size == 48
    assert cfg.backbone.toy.text_layers == 4  # siblings untouched
    assert list(cfg.eval.shots) == [0, 8]  # lists are replaced, not appended to
    assert list(cfg.logger.tags) == ["a", "b"]
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.logger.entity is None
    assert cfg.trainer.gradient_clip_val is None
    assert cfg.data.toy is None


def test_value_with_equals_sign_and_empty_value(exp_dir: Path) -> None:
    cfg = load_config("child", ["logger.project=a=b", "name="], experiments_dir=exp_dir)
    assert cfg.logger.project == "a=b"  # split on the first '=' only
    assert cfg.name == "child"  # empty name falls back to the stem


def test_name_defaults_to_stem_and_can_be_set(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "my_exp.yaml", "seed: 1\n")
    assert load_config("my_exp", experiments_dir=root).name == "my_exp"
    assert load_config("my_exp", ["name=other"], experiments_dir=root).name == "other"
    write(root / "named.yaml", "name: fixed\n")
    assert load_config("named", experiments_dir=root).name == "fixed"


def test_load_by_path(tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere" / "run.yaml", "trainer: {max_steps: 7}\n")
    cfg = load_config(path)
    assert cfg.trainer.max_steps == 7 and cfg.name == "run"
    assert load_config(str(path)).trainer.max_steps == 7


# ------------------------------------------------------------------------------------------ unknown keys


def test_unknown_key_from_yaml_names_key_file_and_nearest(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "typo.yaml", "trainer:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config("typo", experiments_dir=root)
    msg = str(info.value)
    assert "'trainer.max_step'" in msg
    assert "typo.yaml" in msg
    assert "Did you mean 'trainer.max_steps'?" in msg


def test_unknown_key_in_a_base_names_the_base_file(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "base" / "bad.yaml", "data:\n  batch_sise: 5\n")
    write(root / "exp.yaml", "base: [base/bad.yaml]\n")
    with pytest.raises(ConfigError, match=r"'data.batch_size'") as info:
        load_config("exp", experiments_dir=root)
    assert "bad.yaml" in str(info.value)


def test_unknown_key_from_cli_names_key_and_nearest(exp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("child", ["trainer.max_step=50"], experiments_dir=exp_dir)
    assert str(info.value) == (
        "unknown config key 'trainer.max_step' (from command line). Did you mean 'trainer.max_steps'?"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainr.max_steps=5", "trainer.max_steps"),  # typo in the section name
        ("backbone.toy.image_sise=5", "backbone.toy.image_size"),  # deep leaf
        ("trainer.batch_size=5", "data.batch_size"),  # right leaf, wrong section
        ("method.aim.projecter=mlp", "method.aim.projector"),
    ],
)
def test_unknown_key_suggestions(exp_dir: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key") as info:
        load_config("child", [override], experiments_dir=exp_dir)
    assert f"'{expected}'" in str(info.value)
    assert f"'{override.split('=')[0]}'" in str(info.value)


def test_unknown_key_without_close_match_lists_valid_keys(exp_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"Valid keys under 'optim': lr, weight_decay"):
        load_config("child", ["optim.learning_rate=0.1"], experiments_dir=exp_dir)


def test_dotted_key_in_yaml_explains_nesting(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "dotted.yaml", "trainer.max_steps: 5\n")
    with pytest.raises(ConfigError, match="nested mappings"):
        load_config("dotted", experiments_dir=root)


# ------------------------------------------------------------------------------------------- wrong types


def test_wrong_type_from_cli(exp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("child", ["trainer.max_steps=abc"], experiments_dir=exp_dir)
    assert str(info.value) == "config key 'trainer.max_steps' = 'abc' (from command line): expected int"


def test_wrong_type_from_yaml(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "bad.yaml", "optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config("bad", experiments_dir=root)
    msg = str(info.value)
    assert "'optim.lr'" in msg and "'fast'" in msg and "expected float" in msg and "bad.yaml" in msg


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("eval.shots=[0,x]", ["'eval.shots[1]'", "'x'", "expected int"]),
        ("trainer.max_steps=null", ["'trainer.max_steps'", "None", "expected int"]),
        ("trainer=5", ["'trainer'", "5", "expected a mapping"]),
        ("eval.shots=3", ["'eval.shots'", "3", "expected list of int"]),
        ("logger.wandb=maybe", ["'logger.wandb'", "'maybe'", "expected bool"]),
        ("trainer.max_steps.x=1", ["'trainer.max_steps'", "expected int"]),
    ],
)
def test_wrong_type_variants(exp_dir: Path, override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("child", [override], experiments_dir=exp_dir)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_error_is_a_single_clean_message(exp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("child", ["trainer.max_steps=abc"], experiments_dir=exp_dir)
    assert info.value.__suppress_context__  # `raise ... from None`: no omegaconf traceback chained
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------- overrides and experiments


@pytest.mark.parametrize("bad", ["trainer.max_steps", "=5", "max_steps 50"])
def test_malformed_override(exp_dir: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"malformed override.*key=value.*trainer\.max_steps=50"):
        load_config("child", [bad], experiments_dir=exp_dir)


def test_unparsable_override_value(exp_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"could not parse the value .*eval\.shots=\[0,2"):
        load_config("child", ["eval.shots=[0,2"], experiments_dir=exp_dir)


def test_unknown_experiment_suggests_nearest(exp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("chlid", experiments_dir=exp_dir)
    msg = str(info.value)
    assert "unknown experiment 'chlid'" in msg
    assert "Did you mean 'child'?" in msg
    assert "Available experiments: child" in msg


def test_unknown_real_experiment_suggests_toy_aim() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'toy_aim'"):
        load_config("toy_aimm")


def test_missing_yaml_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml_file(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "broken.yaml", "trainer: [1\n")
    with pytest.raises(ConfigError, match=r"could not parse YAML in .*broken\.yaml"):
        load_config("broken", experiments_dir=root)
    write(root / "alist.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("alist", experiments_dir=root)


def test_bad_base_value(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "exp.yaml", "base: 5\n")
    with pytest.raises(ConfigError, match="'base'.*expected a path or a list of paths"):
        load_config("exp", experiments_dir=root)


# ------------------------------------------------------------------------------------------ semantic checks


def test_min_shots_above_max_shots(exp_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("child", ["data.min_shots=5", "data.max_shots=3"], experiments_dir=exp_dir)
    msg = str(info.value)
    assert "'data.min_shots' = 5" in msg and "'data.max_shots' = 3" in msg
    assert "command line" in msg
    assert "data.max_shots=5" in msg  # the suggested fix


def test_negative_shots(exp_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data.min_shots' = -1.*>= 0"):
        load_config("child", ["data.min_shots=-1"], experiments_dir=exp_dir)


def test_bad_projector_suggests_nearest(tmp_path: Path) -> None:
    root = tmp_path / "exps"
    write(root / "exp.yaml", "method:\n  aim:\n    projector: mpl\n")
    with pytest.raises(ConfigError) as info:
        load_config("exp", experiments_dir=root)
    msg = str(info.value)
    assert "'method.aim.projector' = 'mpl'" in msg
    assert "exp.yaml" in msg  # where the bad value came from
    assert "'linear', 'mlp'" in msg and "Did you mean 'mlp'?" in msg


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("method.name=aimm", r"'method.name' = 'aimm'.*Did you mean 'aim'"),
        ("trainer.precision=bf16", r"'trainer.precision' = 'bf16'.*'bf16-mixed'"),
        ("eval.shots=[]", r"'eval.shots'.*non-empty"),
        ("eval.shots=[0,-2]", r"'eval.shots'.*>= 0"),
        ("backbone.dtype=fp16", r"'backbone.dtype' = 'fp16'.*Did you mean 'float16'"),
        ("optim.betas=[0.9]", r"'optim.betas'.*two numbers"),
        ("method.aim.mlp_hidden=0", r"'method.aim.mlp_hidden' = 0"),
    ],
)
def test_semantic_checks(exp_dir: Path, override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("child", [override], experiments_dir=exp_dir)


@pytest.mark.parametrize("precision", ["32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true"])
def test_lightning_precisions_accepted(exp_dir: Path, precision: str) -> None:
    cfg = load_config("child", [f"trainer.precision={precision}"], experiments_dir=exp_dir)
    assert cfg.trainer.precision == precision  # `32` is parsed as int by YAML and converted back to str


def test_broken_interpolation(exp_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"'name' = '\$\{nope\}'.*cannot resolve"):
        load_config("child", ["name=${nope}"], experiments_dir=exp_dir)
    cfg = load_config("child", ["name=${backbone.family}_run"], experiments_dir=exp_dir)
    assert cfg.name == "llava_run"


# ---------------------------------------------------------------------------------------------- saving


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("toy_aim", ["trainer.max_steps=50", "eval.shots=[0,1]", "data.toy=null"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    assert path.read_text(encoding="utf-8") == to_yaml(cfg)
    again = load_config(path)  # a saved run config is itself a valid experiment file
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)
    assert again.name == "toy_aim"  # the saved name wins over the file stem ("config")


def test_to_yaml_resolves_interpolations(exp_dir: Path) -> None:
    cfg = load_config("child", ["name=${backbone.family}_run"], experiments_dir=exp_dir)
    assert "name: llava_run" in to_yaml(cfg)


@pytest.mark.parametrize(("aim_yaml", "pattern"), [
    ("projector: mlp\n    projector_init: identity\n", r"projector_init.*=identity needs method.aim.projector=linear"),
    ("projector_init: eye\n", r"'method.aim.projector_init' = 'eye'"),
])
def test_projector_init_is_checked(tmp_path: Path, aim_yaml: str, pattern: str) -> None:
    write(tmp_path / "exp.yaml", "method:\n  aim:\n    " + aim_yaml)
    with pytest.raises(ConfigError, match=pattern):
        load_config("exp", experiments_dir=tmp_path)
