"""run_eval reports what its queries and its demo pool lost: results.json's "skipped", the table's header, the log,
each trial's record and the W&B run; a clean evaluation says nothing of it."""

from __future__ import annotations

import io
import json
import logging
import random

import webdataset as wds
from PIL import Image as PILImage

from mmict.config import load_config
from mmict.eval.runner import log_to_wandb, run_eval
from mmict.methods.base import FrozenBackboneModule

WORDS = ["red", "blue", "green", "circle"]


def _png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, n: int, prefix: str, rng: random.Random, bad_images: int = 0, bad_json: int = 0) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            meta = {"id": f"{prefix}{i}", "question": "what is it ?", "answers": [rng.choice(WORDS)]}
            sink.write({"__key__": f"{prefix}{i:04d}", "png": _png(rng), "json": json.dumps(meta).encode()})
        for i in range(bad_images):
            meta = {"id": f"{prefix}bad{i}", "question": "what is it ?", "answers": ["red"]}
            sink.write({"__key__": f"{prefix}bad{i}", "png": b"not an image", "json": json.dumps(meta).encode()})
        for i in range(bad_json):
            sink.write({"__key__": f"{prefix}badjson{i}", "png": _png(rng), "json": b"{"})


def write_okvqa(root, broken: bool) -> None:
    """okvqa test (10 queries) and train (two shards of 8) splits with the converter's summary; `broken`: 4 corrupt
    test queries (3 images that do not decode, 1 json that does not parse), a corrupt pool image, the second train
    shard cut in half and an empty third one the summary counts 8 examples for."""
    rng = random.Random(0)
    folder = root / "okvqa"
    folder.mkdir(parents=True)
    _shard(folder / "test-000000.tar", 10, "test", rng, bad_images=3 * broken, bad_json=1 * broken)
    _shard(folder / "train-000000.tar", 8 - broken, "a", rng, bad_images=1 * broken)
    _shard(folder / "train-000001.tar", 8, "b", rng)
    shards = ["train-000000.tar", "train-000001.tar"]
    if broken:
        data = (folder / "train-000001.tar").read_bytes()
        (folder / "train-000001.tar").write_bytes(data[: len(data) // 2])
        (folder / "train-000002.tar").write_bytes(b"")
        shards.append("train-000002.tar")
    (folder / "train.summary.json").write_text(json.dumps({"written": 8 * len(shards), "shards": shards}))


class FakeConfig(dict):
    def update(self, data: dict, allow_val_change: bool = False) -> None:
        super().update(data)


class FakeRun:
    """What log_to_wandb writes to: the run's config, summary and logged values."""

    def __init__(self) -> None:
        self.config = FakeConfig()
        self.summary: dict = {}
        self.logged: dict = {}

    def log(self, data: dict) -> None:
        self.logged.update(data)


def _evaluate(tmp_path, backbone, backbone_dir, *overrides):
    cfg = load_config("toy_aim", [
        f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", f"backbone.name_or_path={backbone_dir}",
        "backbone.toy=null", "eval.task=okvqa", "eval.postprocess=vqa", "eval.batch_size=8", "eval.shots=[2]",
        "eval.demo_modes=[images]", "eval.max_new_tokens=null", "logger.wandb=false", *overrides])
    run = FakeRun()
    outcome = run_eval(FrozenBackboneModule(cfg, backbone=backbone), cfg, tmp_path / "eval", wandb_run=run)
    return outcome, json.loads((tmp_path / "eval" / "results.json").read_text()), run


def test_skipped_queries_and_pool_examples_are_reported_everywhere(tmp_path, tiny_backbone, tiny_backbone_dir,
                                                                    caplog):
    write_okvqa(tmp_path / "data", broken=True)
    with caplog.at_level(logging.WARNING, logger="mmict.eval.runner"):
        outcome, results, run = _evaluate(tmp_path, tiny_backbone, tiny_backbone_dir, "eval.seeds=[0]")
    skipped = results["skipped"]
    assert skipped["queries"] == {"image does not decode": 3, "json does not parse": 1}
    assert outcome.skipped == skipped  # for the run's summary.json
    pool = skipped["detail"]["pool"]
    # every example the summary records (24) is kept or skipped under a reason
    assert pool["recorded"] == 24 and pool["kept"] + pool["skipped"] == 24 and pool["kept"] < 23
    assert skipped["pool"]["image does not decode"] == 1 and skipped["pool"]["lost with broken or missing shards"] > 0
    assert set(pool["shards"]) == {"train-000001.tar", "train-000002.tar"}
    # the table's header, the log and each trial say so
    line = next(h for h in outcome.how if h.startswith("Skipped: "))
    assert line.startswith("Skipped: 4 test queries (image does not decode: 3, json does not parse: 1); ")
    assert f"{pool['skipped']} pool examples (" in line and "train-000001.tar broke off after" in line
    assert f"- {line}" in (tmp_path / "eval" / "results.md").read_text()
    assert line in caplog.text
    assert all(t["skipped"] == {"queries": skipped["queries"], "pool": skipped["pool"]} for t in results["trials"])
    assert results["query_subsets"]["0"]["skipped"] == skipped["queries"]
    # and the W&B run: the record in its config, the counts in its summary
    assert run.config["eval_skipped"] == skipped
    assert run.summary == {"eval/skipped_queries": 4, "eval/skipped_pool": pool["skipped"]}


def test_each_seeded_trial_says_which_of_its_drawn_queries_were_skipped(tmp_path, tiny_backbone, tiny_backbone_dir):
    write_okvqa(tmp_path / "data", broken=True)
    _, results, _ = _evaluate(tmp_path, tiny_backbone, tiny_backbone_dir, "eval.protocol=openflamingo",
                              "eval.seeds=[0,1,2]", "eval.num_queries=8", "eval.demo_pool_size=8")
    subsets = results["query_subsets"]
    for seed, drawn in subsets.items():
        bad = [p for p in drawn["query_positions"] if p >= 10]  # the 4 corrupt queries follow the 10 good ones
        assert sum(drawn["skipped"].values()) == len(bad) == 8 - drawn["num_queries"]
        trial = next(t for t in results["trials"] if str(t["seed"]) == seed)
        assert trial["skipped"].get("queries", {}) == drawn["skipped"]
        assert trial["num_queries"] == len(trial["query_ids"]) == drawn["num_queries"]
    union = {p for d in subsets.values() for p in d["query_positions"] if p >= 10}
    assert sum(results["skipped"]["queries"].values()) == len(union) > 0


def test_a_clean_evaluation_reports_nothing_skipped(tmp_path, tiny_backbone, tiny_backbone_dir, caplog):
    write_okvqa(tmp_path / "data", broken=False)
    with caplog.at_level(logging.WARNING):
        outcome, results, run = _evaluate(tmp_path, tiny_backbone, tiny_backbone_dir, "eval.seeds=[0]")
    assert results["skipped"]["queries"] == {} and results["skipped"]["pool"] == {}
    assert results["skipped"]["detail"]["pool"] == {"kept": 16, "skipped": 0, "reasons": {}, "shards": {},
                                                    "recorded": 16}
    assert not any(h.startswith("Skipped") for h in outcome.how) and "Skipped" not in outcome.report
    assert "Skipped" not in caplog.text and "corrupt or unusable" not in caplog.text
    assert all(t["skipped"] == {} for t in results["trials"])
    assert run.summary == {"eval/skipped_queries": 0, "eval/skipped_pool": 0}


def test_a_further_tasks_counts_go_under_its_prefix():
    prefix = "eval_okvqa"  # a further task's (eval.extra_tasks)
    run = FakeRun()
    record = {"queries": {"image does not decode": 2}, "pool": {}, "detail": {}}
    log_to_wandb(run, [], {}, prefix=prefix, skipped=record)
    assert run.config[f"{prefix}_skipped"] == record
    assert run.summary == {f"{prefix}/skipped_queries": 2, f"{prefix}/skipped_pool": 0}
