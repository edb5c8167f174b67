"""Companion experiments (`eval.companions`): checked before a run trains; their rows join its table."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mmict.companions import companion_configs, merge_rows, wandb_group
from mmict.config import ConfigError, load_config


def row(method: str, shots: int) -> dict:
    return {"method": method, "shots": shots, "accuracy_mean": 0.5}


def test_companion_takes_the_runs_backbone_data_and_eval_settings():
    cfg = load_config("toy_aim", ["backbone.name_or_path=/models/mine", "data.root=/data/mine", "seed=3",
                                  "eval.shots=[0,4]", "eval.seeds=[5]", "trainer.max_steps=7"])
    [companion] = companion_configs(cfg)
    assert companion.name == "toy_mmict_binding" and companion.method.name == "mmict"
    assert (companion.backbone.name_or_path, companion.data.root, companion.seed) == ("/models/mine", "/data/mine", 3)
    assert (list(companion.eval.shots), list(companion.eval.seeds)) == ([0, 4], [5])
    assert companion.backbone.toy is None and companion.data.toy is None  # loaded as they are, never rebuilt
    assert companion.trainer.max_steps == 1000 and list(companion.eval.companions) == []  # its own recipe


def test_bad_companions_fail_before_training():
    with pytest.raises(ConfigError, match="Did you mean 'toy_mmict_binding'"):
        companion_configs(load_config("toy_aim", ["eval.companions=[toy_mmict_bindng]"]))
    with pytest.raises(ConfigError, match=r"overrides \['eval.shots=\[1\]'\]"):
        companion_configs(load_config("toy_aim", ["eval.companions=['toy_mmict_binding eval.shots=[1]']"]))


def test_a_task_specific_companion_is_evaluated_on_its_own_task_alone():
    """LIVE's and MimIC's vectors belong to the task they were trained for: such a companion keeps its task (one of
    the run's, with that task's entry's overrides) and no further tasks; MMICT's is evaluated on all of the run's."""
    cfg = load_config("toy_all_methods")
    companions = {c.name: c for c in companion_configs(cfg)}
    assert list(companions["toy_mmict_binding"].eval.extra_tasks) == list(cfg.eval.extra_tasks) != []
    for name, task, new_tokens in (("toy_live", "toy_binding", 3), ("toy_mimic", "toy_binding", 3),
                                   ("toy_live_concept", "toy_concept", 2), ("toy_mimic_concept", "toy_concept", 2)):
        c = companions[name]
        assert (c.eval.task, list(c.eval.extra_tasks), c.eval.max_new_tokens) == (task, [], new_tokens), name
        assert list(c.eval.shots) == list(cfg.eval.shots) and c.backbone.name_or_path == cfg.backbone.name_or_path
    with pytest.raises(ConfigError, match="toy_concept.*does not evaluate"):
        companion_configs(load_config("toy_aim", ["eval.extra_tasks=[]", "eval.companions=[toy_live_concept]"]))


def test_merge_keeps_both_zero_shots_apart_and_sorts_by_shots():
    ours = [row("zero-shot", 0), row("AIM (fused tokens)", 2)]
    theirs = [{**row("zero-shot", 0), "accuracy_mean": 0.4}, row("MMICT (M-Hub text features)", 2),
              row("MMICT (M-Hub text features)", 1)]
    merged = merge_rows(ours, "toy_mmict_binding", theirs)
    assert [(r["method"], r["shots"]) for r in merged] == [
        ("zero-shot", 0), ("zero-shot [toy_mmict_binding]", 0), ("MMICT (M-Hub text features)", 1),
        ("AIM (fused tokens)", 2), ("MMICT (M-Hub text features)", 2)]


def test_merge_lists_a_baseline_both_runs_measured_identically_once():
    ours = [row("zero-shot", 0), row("vanilla ICL (images+text)", 2)]
    theirs = [row("zero-shot", 0), row("vanilla ICL (images+text)", 2), row("AIM (fused tokens)", 2)]
    merged = merge_rows(ours, "toy_aim_concept_tuned", theirs)
    assert [(r["method"], r["shots"]) for r in merged] == [
        ("zero-shot", 0), ("AIM (fused tokens)", 2), ("vanilla ICL (images+text)", 2)]
    differs = merge_rows(ours, "other", [{**row("zero-shot", 0), "accuracy_mean": 0.9}])
    assert [r["method"] for r in differs] == ["zero-shot", "zero-shot [other]", "vanilla ICL (images+text)"]


def test_the_wandb_group_ties_a_run_to_its_companions():
    cfg = load_config("toy_aim")
    assert wandb_group(cfg, "runs/toy_aim/20250101-000000") == "toy_aim-20250101-000000"  # it has a companion
    assert wandb_group(load_config("toy_aim", ["eval.companions=[]"]), "runs/toy_aim/x") is None  # no group needed
    swept = load_config("toy_aim", ["logger.group=sweep-7"])
    assert wandb_group(swept, "runs/toy_aim/x") == "sweep-7"  # a set group (a sweep's id) wins
    [companion] = companion_configs(swept)
    assert companion.logger.group == "sweep-7"


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run's `run-<id>.wandb` file (a LevelDB-style log of protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, chunk, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def offline_run(path: Path) -> dict:
    """An offline run's id, name, group, job type, config (`run.method`) and the keys it logged."""
    out: dict = {"logged": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, name=run.display_name, group=run.run_group, job_type=run.job_type,
                       config={item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "history":
            out["logged"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return out


@pytest.mark.slow
def test_each_method_is_its_own_wandb_run_in_one_group(tmp_path, tiny_backbone_dir, monkeypatch):
    """`make train`'s toy_aim and its MMICT companion with W&B offline: three W&B runs (AIM, MMICT, the joint
    table), never one W&B run logged into by two methods."""
    import wandb

    from mmict.train import train

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(key, str(value))
    companion = ("toy_mmict_binding trainer.max_steps=2 trainer.val_check_interval=2 "
                 "trainer.checkpoint_every_n_steps=2 trainer.progress_bar=false data.batch_size=4 data.num_workers=0 "
                 "data.epoch_size=8 data.val_episodes=4 trainer.log_every_n_steps=1")
    cfg = load_config("toy_aim", [
        f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'toy'}", f"backbone.name_or_path={tiny_backbone_dir}",
        "backbone.toy=null", "data.toy.num_docs=40", "data.toy.val_docs=8", "data.toy.vqa_train=12",
        "data.toy.vqa_test=8", "data.toy.image_size=16", "data.toy.binding_episodes=4", "data.batch_size=4",
        "data.num_workers=0", "data.epoch_size=8", "data.val_episodes=4", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2", "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1", "optim.warmup_steps=0", "eval.num_queries=4", "eval.shots=[0,1]",
        "eval.seeds=[0]", "logger.wandb=true", "logger.offline=true", f"eval.companions=[{companion!r}]"])
    try:
        summary = train(cfg)
    finally:
        wandb.teardown()
    main_dir, companion_dir = Path(summary["run_dir"]), Path(summary["companions"]["toy_mmict_binding"])
    group = f"toy_aim-{main_dir.name}"
    found = [offline_run(path) for folder in (main_dir, companion_dir)
             for path in folder.glob("wandb/offline-run-*/run-*.wandb")]
    runs = {run["name"]: run for run in found}
    # Before: the companion's WandbLogger reused AIM's W&B run ("a wandb run already in progress"): one run.
    assert sorted(runs) == sorted([f"toy_aim/{main_dir.name}", f"toy_mmict_binding/{companion_dir.name}",
                                   f"toy_aim/{main_dir.name}/methods"]) and len(found) == 3, sorted(runs)
    aim = runs[f"toy_aim/{main_dir.name}"]
    mmict = runs[f"toy_mmict_binding/{companion_dir.name}"]
    joint = runs[f"toy_aim/{main_dir.name}/methods"]
    assert len({aim["id"], mmict["id"], joint["id"]}) == 3  # each its own id
    assert aim["group"] == mmict["group"] == joint["group"] == group and joint["job_type"] == "methods"
    # each its own config and its own results; the joint table only in the group's "methods" run
    assert aim["config"]["run"]["method"] == "aim" and mmict["config"]["run"]["method"] == "mmict"

    def logged(run: dict, key: str) -> bool:  # a table or image is logged as "<key>/_type", "<key>/path", ...
        return any(k == key or k.startswith(key + "/") for k in run["logged"])

    assert logged(aim, "eval/results") and logged(mmict, "eval/results")
    assert logged(aim, "train/loss") and logged(mmict, "train/loss")
    assert logged(joint, "methods/results") and logged(joint, "methods/methods_vs_shots")
    assert not logged(aim, "methods/results") and not logged(mmict, "methods/results")
    assert joint["config"]["companion_runs"] == {"toy_mmict_binding": str(companion_dir)}
    assert json.loads((main_dir / "eval/methods.json").read_text())["wandb_group"] == group
    assert load_config(companion_dir / "config.yaml").logger.group == group
