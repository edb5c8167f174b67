"""End to end: `mmict train` fits a few steps on a tiny toy world, evaluates, and writes the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mmict.config import load_config
from mmict.dependency_lock import lock_path, sha256
from mmict.eval.__main__ import evaluate_checkpoint
from mmict.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("e2e")
    cfg = load_config("toy_aim", [
        f"run_root={root / 'runs'}", f"data.root={root / 'toy'}",
        f"backbone.name_or_path={tiny_backbone_dir}", "backbone.toy=null",
        "data.toy.num_docs=80", "data.toy.val_docs=16", "data.toy.vqa_train=20", "data.toy.vqa_test=12",
        "data.toy.image_size=16", "data.toy.binding_episodes=4", "data.toy.concept_episodes=4",
        "data.toy.concept_tuning_episodes=4", "data.toy.concept_tuning_val_episodes=2", "data.batch_size=4",
        "data.num_workers=0",
        "data.epoch_size=40",
        "data.val_episodes=8", "trainer.max_steps=12", "trainer.val_check_interval=6",
        "trainer.checkpoint_every_n_steps=6", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "optim.warmup_steps=0", "optim.lr=3e-3", "eval.num_queries=8", "eval.shots=[0,2]", "eval.seeds=[0,1]",
        f"eval.companions=[{COMPANION!r}]", f"eval.extra_tasks=[{EXTRA_TASK!r}]",
    ])
    return cfg, train(cfg)


# toy_aim's MMICT companion, briefly (its own recipe otherwise; backbone, data and eval come from the run).
COMPANION = ("toy_mmict_binding trainer.max_steps=3 trainer.val_check_interval=3 trainer.checkpoint_every_n_steps=3 "
             "trainer.progress_bar=false data.batch_size=4 data.num_workers=0 data.epoch_size=40 data.val_episodes=8")


# A further task the same weights are evaluated on, with an evaluation override of its own.
EXTRA_TASK = "toy_concept eval.max_new_tokens=2"


def test_run_folder_has_everything(finished_run):
    cfg, summary = finished_run
    run = summary["run_dir"]
    run = Path(run)
    for name in ("config.yaml", "logs/metrics.csv", "loss.png", "checkpoints/last.ckpt", "eval/results.json",
                 "eval/results.md", "eval/score_vs_shots.png", "eval/cost_vs_shots.png", "skipped_samples.json",
                 "trained_shots.json"):
        assert (run / name).exists(), name
    # AIM's demos per training episode, in results.json beside the shots evaluated
    trained = json.loads((run / "trained_shots.json").read_text())["episodes_per_shot_count"]
    assert json.loads((run / "eval/results.json").read_text())["trained_shots"] == trained
    assert summary["loss"]["first"] > 0 and summary["loss"]["last"] < summary["loss"]["first"]
    results = json.loads((run / "eval/results.json").read_text())
    methods = {(r["method"], r["shots"]) for r in results["summary"]}
    assert methods == {("zero-shot", 0), ("AIM (fused tokens)", 2), ("vanilla ICL (images+text)", 2),
                       ("text-only demos", 2)}
    assert all(r["seeds"] == 2 and r["queries"] == 8 for r in results["summary"])
    assert results["metric"] == "exact_match" and results["selection"] == "random (in-episode)"  # toy_binding
    assert results["shots"] == [0, 2] and results["seeds"] == [0, 1] and results["decoding"]["num_beams"] == 1
    assert {"torch", "transformers", "lightning", "mmict_commit"} <= set(results["versions"])
    # the dependency lock the numbers came from, in results.json and runtime.json alike
    runtime = json.loads((run / "runtime.json").read_text())
    assert results["versions"]["lock"]["sha256"] == runtime["versions"]["lock"]["sha256"] == sha256(lock_path())
    assert all(r["peak_memory_mb"] is None for r in results["summary"])  # CPU: not measured, not faked
    trial = results["trials"][0]  # every answer is kept, so a score can be checked by hand
    assert len(trial["predictions"]) == 8
    assert {"id", "answer", "generation", "reference"} <= set(trial["predictions"][0])
    saved = OmegaConf.to_container(load_config(run / "config.yaml"), resolve=True)
    assert saved == OmegaConf.to_container(cfg, resolve=True)


def test_companion_trains_on_the_same_backbone_and_joins_the_table(finished_run):
    cfg, summary = finished_run
    companion = Path(summary["companions"]["toy_mmict_binding"])
    assert companion.parent.name == "toy_mmict_binding" and (companion / "checkpoints/last.ckpt").exists()
    own = load_config(companion / "config.yaml")
    assert own.backbone.name_or_path == cfg.backbone.name_or_path and own.data.root == cfg.data.root
    assert (own.trainer.max_steps, list(own.eval.seeds), own.eval.num_queries) == (3, [0, 1], 8)
    joint = json.loads((Path(summary["run_dir"]) / "eval/methods.json").read_text())
    methods = {(r["method"], r["shots"]) for r in joint["summary"]}
    assert methods == {("zero-shot", 0), ("AIM (fused tokens)", 2), ("vanilla ICL (images+text)", 2),
                       ("text-only demos", 2),
                       ("MMICT (M-Hub text features; text-free query features; fresh M-Hub)", 2),
                       ("zero-shot (no demos, M-Hub trained as MMICT; text-free query features; fresh M-Hub)", 0)}
    assert (Path(summary["run_dir"]) / "eval/methods_vs_shots.png").exists()
    # web-trained: the M-Hub read no query text in training, so none at evaluation either (issue 23 item 5)
    assert "MMICT (M-Hub text features; text-free query features; fresh M-Hub)" in summary["eval_report"]


def test_extra_task_evaluates_the_same_weights_and_joins_the_joint_table(finished_run):
    _, summary = finished_run
    run = Path(summary["run_dir"])
    main = json.loads((run / "eval/results.json").read_text())
    extra = json.loads((run / "eval/toy_concept/results.json").read_text())
    assert (main["task"], extra["task"]) == ("toy_binding", "toy_concept")
    assert extra["checkpoint"] == main["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    # its own override, the run's other settings
    assert (main["decoding"]["max_new_tokens"], extra["decoding"]["max_new_tokens"]) == (3, 2)
    assert extra["shots"] == main["shots"] and extra["seeds"] == main["seeds"]
    references = {json.dumps(p["reference"]) for t in extra["trials"] for p in t["predictions"]}
    assert references and all("yes" in r or "no" in r for r in references)  # its own queries, not binding's
    companion = Path(summary["companions"]["toy_mmict_binding"])
    assert (companion / "eval/toy_concept/results.json").exists()  # companions evaluate the further tasks too
    joint = json.loads((run / "eval/methods.json").read_text())
    concept_rows = {(r["method"], r["shots"]) for r in joint["extra_tasks"]["toy_concept"]["summary"]}
    assert ("AIM (fused tokens)", 2) in concept_rows
    assert ("MMICT (M-Hub text features; text-free query features; fresh M-Hub)", 2) in concept_rows
    assert summary["eval_tasks"]["toy_concept"] == joint["extra_tasks"]["toy_concept"]["summary"]
    md = (run / "eval/methods.md").read_text()
    assert "## toy_binding" in md and "## toy_concept" in md
    assert (run / "eval/methods_vs_shots_toy_concept.png").exists()


def test_checkpoint_is_trainable_weights_and_config(finished_run):
    _, summary = finished_run
    ckpt = torch.load(Path(summary["run_dir"]) / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {"projector.net.weight", "projector.net.bias"}
    assert ckpt["hyper_parameters"]["config"]["method"]["name"] == "aim"
    assert ckpt["global_step"] == 12


def test_after_fsdp_a_whole_module_is_rebuilt_from_the_checkpoint_for_evaluation(finished_run, tmp_path, caplog):
    """FSDP wraps the trained module's parts in place: evaluation after it gets a fresh module with the saved weights
    (the strategy itself needs GPUs); a sharded checkpoint (a folder) is named with how to consolidate it."""
    from mmict.train import fsdp_trained_module
    from mmict.training.fsdp import SHARDED_METADATA_FILE

    cfg, summary = finished_run
    ckpt = Path(summary["run_dir"]) / "checkpoints/last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    module = fsdp_trained_module(cfg, ckpt)
    assert set(saved) == {"projector.net.weight", "projector.net.bias"}
    assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    (sharded / SHARDED_METADATA_FILE).write_text("")
    assert fsdp_trained_module(cfg, sharded) is None
    assert "consolidate_checkpoint" in caplog.text


def test_eval_of_checkpoint_never_overwrites(finished_run):
    _, summary = finished_run
    run = Path(summary["run_dir"])
    rows = evaluate_checkpoint(run / "checkpoints/last.ckpt", ["eval.shots=[0]", "eval.seeds=[0]"])
    assert [r["shots"] for r in rows] == [0]
    assert (run / "eval/results-1.json").exists()  # the training run's results.json is kept
    first = json.loads((run / "eval/results.json").read_text())
    assert {r["shots"] for r in first["summary"]} == {0, 2}


def test_baselines_evaluate_without_a_checkpoint(finished_run, capsys):
    from mmict.config import ConfigError
    from mmict.eval.__main__ import main

    cfg, _ = finished_run
    base = [f"{k}={v}" for k, v in (("run_root", cfg.run_root), ("data.root", cfg.data.root),
                                     ("backbone.name_or_path", cfg.backbone.name_or_path))]
    base += ["backbone.toy=null", "data.toy.image_size=16", "data.toy.num_docs=80", "data.toy.val_docs=16",
             "data.toy.vqa_train=20", "data.toy.vqa_test=12", "data.toy.binding_episodes=4",
             "eval.num_queries=6", "eval.seeds=[0]"]
    with pytest.raises(ConfigError, match="needs a trained projector"):
        main(["--exp", "toy_aim", "eval.demo_modes=[fused,images]", *base])
    with pytest.raises(ConfigError, match="M-Hub has no training-free baseline"):
        main(["--exp", "toy_mmict_vqa", *base])
    main(["--exp", "toy_aim", "--shots", "0,1", *base])  # eval.demo_modes null: the training-free ones
    assert "vanilla ICL" in capsys.readouterr().out
    runs = sorted(Path(cfg.run_root, cfg.name).glob("*/eval/results.json"))
    latest = json.loads(runs[-1].read_text())
    assert {(r["method"], r["shots"]) for r in latest["summary"]} == {
        ("zero-shot", 0), ("vanilla ICL (images+text)", 1), ("text-only demos", 1)}
    with pytest.raises(ConfigError, match="comma-separated integers"):
        main(["--exp", "toy_aim", "--shots", "0,four", *base])


def test_mmict_trains_on_the_task_and_its_checkpoint_evaluates(tmp_path_factory, tiny_backbone_dir):
    root = tmp_path_factory.mktemp("e2e_mmict")
    cfg = load_config("toy_mmict_vqa", [
        f"run_root={root / 'runs'}", f"data.root={root / 'toy'}",
        f"backbone.name_or_path={tiny_backbone_dir}", "backbone.toy=null", "method.demo_design=concat",
        "data.toy.num_docs=8", "data.toy.val_docs=4", "data.toy.vqa_train=40", "data.toy.vqa_test=12",
        "data.toy.image_size=16", "data.toy.binding_episodes=2", "data.batch_size=4", "data.num_workers=0",
        "data.epoch_size=40", "data.val_episodes=8", "trainer.max_steps=10", "trainer.val_check_interval=5",
        "trainer.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1", "trainer.progress_bar=false",
        "optim.warmup_steps=0", "optim.lr=1e-3", "eval.num_queries=8", "eval.shots=[0,2]", "eval.seeds=[0]",
    ])
    summary = train(cfg)
    run = Path(summary["run_dir"])
    assert summary["val_loss"]["after"] < summary["val_loss"]["before"]  # validated on data.val_split=test
    results = json.loads((run / "eval/results.json").read_text())
    assert {(r["method"], r["shots"]) for r in results["summary"]} == {
        ("zero-shot (no demos, M-Hub trained as vanilla ICT; text-free query features; fresh M-Hub)", 0),
        ("vanilla ICT (visual features + demo text; text-free query features; fresh M-Hub)", 2)}  # reference's ICT
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("hub.") for k in ckpt["state_dict"])  # no frozen weights
    rows = evaluate_checkpoint(run / "checkpoints/last.ckpt", ["eval.shots=[2]"])
    assert rows[0]["accuracy_mean"] == results["summary"][1]["accuracy_mean"]  # same weights, same demos


def _small_run(root, tiny_backbone_dir, *overrides):
    return load_config("toy_aim", [
        f"run_root={root / 'runs'}", f"data.root={root / 'toy'}", f"backbone.name_or_path={tiny_backbone_dir}",
        "backbone.toy=null", "data.toy.num_docs=40", "data.toy.val_docs=8", "data.toy.vqa_train=12",
        "data.toy.vqa_test=8", "data.toy.image_size=16", "data.toy.binding_episodes=4", "data.batch_size=4",
        "data.num_workers=0", "data.epoch_size=16", "data.val_episodes=4", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=4", "trainer.progress_bar=false",
        "optim.warmup_steps=0", "eval.num_queries=4", "eval.shots=[0]", "eval.seeds=[0]", "eval.companions=[]",
        *overrides])


def test_a_run_whose_evaluation_failed_is_evaluated_when_run_again(tmp_path, tiny_backbone_dir, monkeypatch,
                                                                    caplog):
    import mmict.train as train_module

    cfg = _small_run(tmp_path, tiny_backbone_dir)
    real_eval = train_module.run_tasks

    def failing(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(train_module, "run_tasks", failing)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(cfg)
    run = next((tmp_path / "runs" / "toy_aim").iterdir())
    assert (run / "checkpoints" / "last.ckpt").exists() and not (run / "summary.json").exists()
    monkeypatch.setattr(train_module, "run_tasks", real_eval)
    fits = []
    monkeypatch.setattr(train_module.L.Trainer, "fit", lambda *a, **k: fits.append(1))
    with caplog.at_level("WARNING"):
        summary = train(cfg)  # the same command again
    assert not fits  # not trained again
    assert "evaluating it now, not training it again" in caplog.text
    assert list((run / "logs").glob("metrics.part-*.csv"))  # the training's metrics kept, not deleted by the logger
    assert Path(summary["run_dir"]) == run and (run / "summary.json").exists() and summary["eval"]


def test_a_refused_start_names_every_fix_and_leaves_no_run_folder(tmp_path, tiny_backbone_dir):
    from mmict.preflight import PreflightError

    cfg = _small_run(tmp_path, tiny_backbone_dir, "trainer.accelerator=gpu", "eval.task=okvqa",
                     "eval.selection=random")
    from mmict.toy.prepare import prepare

    prepare(cfg)  # the toy world exists; the okvqa shards do not
    # OK-VQA val converted to val-*.tar instead of test-*.tar
    (tmp_path / "toy" / "okvqa").mkdir(parents=True)
    (tmp_path / "toy" / "okvqa" / "val-000000.tar").write_bytes(b"")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the accelerator check passes here")
    with pytest.raises(PreflightError) as err:
        train(cfg)
    text = str(err.value)
    assert "trainer.accelerator=cpu" in text  # the GPU asked for, none visible
    assert "okvqa/test-*.tar" in text and "found val-*.tar" in text and "mmict data convert okvqa" in text
    assert "okvqa/train-*.tar" in text  # the demo pool too
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))
