"""Two-process training on CPU (DDP over gloo), as `mmict train ... trainer.devices=2 trainer.strategy=ddp` runs it.

Lightning starts the second rank by running the same command again, so the two-process runs are subprocesses (the
one-process reference runs in the test's process). What each rank trained on comes from the rank trace
(`callbacks/rank_trace.py`, `MMICT_RANK_TRACE`): per trained batch its step, data epoch, documents and loss on that
rank.

One process with batch 4 is the reference for two with batch 2 each. The corpus is made so that the two see exactly
the same global batches: every document holds two image-text pairs and `data.shots=1`, so a document gives one
episode whatever the rank's random draws (the window can only start at its first pair); there is no shuffle buffer,
so one process reads documents d0 d1 d2 d3 at a step where rank 0 reads d0 d2 and rank 1 d1 d3; and every text is
four tokens, so the mean of the two ranks' token-mean losses is the token-mean loss of the four. DDP averages the
ranks' gradients, so the losses must agree step by step up to float rounding (`LOSS_TOLERANCE`; measured: about
1e-6), while the learning rate is high enough that the loss moves a hundred times that far. Ranks training apart
differ by far more (measured by hand with DDP's gradient all-reduce replaced by a no-op: up to 1e-2), and so would
ranks on other documents or a resume that lost its place.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import webdataset as wds
from helpers import REPO
from PIL import Image

from callbacks.rank_trace import ENV
from mmict.config import load_config
from mmict.eval.ranks import local_launch_env
from mmict.train import train

pytestmark = pytest.mark.slow

LOSS_TOLERANCE = 1e-4  # float32 sums in another order (two half batches, an all-reduce) than one batch's
STEPS, EPOCH_STEPS, CHECKPOINT_EVERY = 12, 4, 4
KILL_AFTER_STEP = 6  # rank 0 has finished this step: the checkpoint of step 4 is complete, steps 7-12 remain
COLORS = ("red", "blue", "green", "yellow", "purple")
SHAPES = ("square", "circle", "triangle", "star")
RGB = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 30),
       "purple": (150, 30, 160)}


def _png(color: str, shape: str) -> str:
    image = Image.new("RGB", (16, 16), RGB[color])
    image.putpixel((SHAPES.index(shape), 0), (0, 0, 0))  # shapes differ in pixels too, however faintly
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_corpus(folder: Path, split: str, docs: int, offset: int) -> None:
    """`docs` web documents of exactly two (image, text) pairs, each text `a <color> <shape> .` (four tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
        for n in range(offset, offset + docs):
            pairs = [(COLORS[(n + i) % len(COLORS)], SHAPES[(n // len(COLORS) + 2 * i) % len(SHAPES)]) for i in (0, 1)]
            doc = {"text_list": [f"a {c} {s} ." for c, s in pairs],
                   "image_info": [{"matched_text_index": i, "image_base64": _png(c, s)} for i, (c, s) in
                                  enumerate(pairs)]}
            sink.write({"__key__": f"doc{n:04d}", "json": json.dumps(doc).encode()})


def _write_task(root: Path, queries: int = 6, pool: int = 6) -> None:
    """An OK-VQA-shaped task under `root` for the evaluation after the two-process training."""
    folder = root / "okvqa"
    folder.mkdir(parents=True)
    for split, n in (("test", queries), ("train", pool)):
        with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
            for i in range(n):
                meta = {"id": f"{split}{i}", "question": "what colour is it ?", "answers": [COLORS[i % len(COLORS)]]}
                sink.write({"__key__": f"{split}{i:04d}", "png": base64.b64decode(_png(COLORS[i % 5], SHAPES[i % 4])),
                            "json": json.dumps(meta).encode()})
    (folder / "train.summary.json").write_text(json.dumps({"written": pool, "shards": ["train-000000.tar"]}))


# The two-process run is evaluated after training, in the processes the Trainer started (mmict/eval/ranks.py).
EVAL = ["eval.task=okvqa", "eval.postprocess=vqa", "eval.shots=[0,1]", "eval.seeds=[0]", "eval.num_queries=null",
        "eval.batch_size=2", "eval.demo_modes=[fused,images]", "eval.max_new_tokens=2", "eval.extra_tasks=[]",
        "eval.bank.enabled=false"]


def _overrides(root: Path, backbone: Path, run_root: Path, *, devices: int) -> list[str]:
    return [
        f"run_root={run_root}", f"data.root={root}", "data.toy=null", f"backbone.name_or_path={backbone}",
        "backbone.toy=null", "data.shots=1", "data.shuffle_buffer=0", f"data.batch_size={4 // devices}",
        "data.num_workers=1", f"data.epoch_size={4 * EPOCH_STEPS}", "data.val_episodes=4",
        f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={CHECKPOINT_EVERY}",
        f"trainer.checkpoint_every_n_steps={CHECKPOINT_EVERY}", "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", "optim.warmup_steps=0", "optim.lr=0.05",
        "eval.enabled=false", "eval.companions=[]", "logger.wandb=false",
    ]


def _start(overrides: list[str], trace: Path, log: Path) -> subprocess.Popen:
    # no rank or SLURM settings of the process running the tests: Lightning must launch the second rank itself
    env = {k: v for k, v in local_launch_env().items() if k != "MMICT_RANK_ZERO_RUN"}
    env.update(WANDB_MODE="disabled", MMICT_RANK_TRACE=str(trace), PYTHONUNBUFFERED="1")
    # its own process group: a kill takes the rank Lightning started too
    return subprocess.Popen([sys.executable, "-m", "mmict.cli", "train", "toy_aim", *overrides], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, f"training exited with {proc.returncode}:\n{log.read_text()[-6000:]}"


def _trace(folder: Path) -> dict[int, list[dict]]:
    """rank -> its trace records in order (a line a kill cut short is left out)."""
    out: dict[int, list[dict]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        out[int(path.stem.removeprefix("rank"))] = [json.loads(line) for line in path.read_text().splitlines()
                                                    if line.endswith("}")]
    return out


def _kill_after(proc: subprocess.Popen, trace: Path, step: int, log: Path, timeout: float = 240) -> None:
    """SIGKILL the run's whole process group once rank 0 has finished training step `step`."""
    deadline = time.monotonic() + timeout
    rank0 = trace / "rank0.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before step {step}:\n{log.read_text()[-6000:]}")
        if rank0.is_file() and any(json.loads(line)["global_step"] >= step for line in
                                   rank0.read_text().splitlines() if line.endswith("}")):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"step {step} not reached in {timeout} s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone_dir):
    """The one-process reference run, and a two-process run killed after step 6 and resumed to the end."""
    base = tmp_path_factory.mktemp("ddp_cpu")
    root = base / "corpus"
    _write_corpus(root / "web", "train", docs=24, offset=0)
    _write_corpus(root / "web", "val", docs=4, offset=100)
    # the reference in this process: one Python start less (a rank-0 run never reads MMICT_RANK_ZERO_RUN, which
    # train() sets here; _start keeps it from the subprocesses)
    os.environ[ENV] = str(base / "trace_single")
    try:
        train(load_config("toy_aim", _overrides(root, tiny_backbone_dir, base / "single", devices=1)))
    finally:
        del os.environ[ENV]
    _write_task(root)
    ddp = [o for o in _overrides(root, tiny_backbone_dir, base / "ddp", devices=2) if o != "eval.enabled=false"]
    ddp += EVAL
    killed = _start(ddp, base / "trace_killed", base / "killed.log")
    _kill_after(killed, base / "trace_killed", KILL_AFTER_STEP, base / "killed.log")
    checkpoints_at_kill = sorted(p.name for p in (base / "ddp").rglob("*.ckpt"))
    resumed = _start(ddp, base / "trace_resumed", base / "resumed.log")  # the same command again: resume=auto
    _finish(resumed, base / "resumed.log")
    return {"base": base, "single": _trace(base / "trace_single"), "killed": _trace(base / "trace_killed"),
            "resumed": _trace(base / "trace_resumed"), "checkpoints_at_kill": checkpoints_at_kill}


def _resumed_from(runs: dict) -> int:
    """The step the resumed run continued from (its first batch's stream step)."""
    return runs["resumed"][0][0]["step"]


def _ddp_trajectory(runs: dict) -> dict[int, list[dict]]:
    """rank -> its records of the whole two-process run: the killed run up to the checkpoint it resumed from, then
    the resumed run (the steps after that checkpoint that the kill cut off are trained again, and count once)."""
    start = _resumed_from(runs)
    return {rank: [r for r in runs["killed"][rank] if r["step"] < start] + runs["resumed"][rank] for rank in (0, 1)}


def test_both_ranks_train_the_same_number_of_batches_on_disjoint_documents(runs):
    assert set(runs["killed"]) == set(runs["resumed"]) == {0, 1}
    ddp = _ddp_trajectory(runs)
    for rank in (0, 1):
        assert [r["step"] for r in ddp[rank]] == list(range(STEPS)), f"rank {rank} did not train every step once"
        assert all(len(r["sources"]) == 2 for r in ddp[rank])
    by_epoch: dict[int, Counter] = defaultdict(Counter)
    for rank in (0, 1):
        for record in ddp[rank]:
            by_epoch[record["epoch"]].update(record["sources"])
    assert sorted(by_epoch) == list(range(STEPS // EPOCH_STEPS))
    for epoch, read in by_epoch.items():
        twice = [doc for doc, n in read.items() if n > 1]
        assert not twice, f"epoch {epoch}: documents read twice across the ranks: {twice}"
        assert sum(read.values()) == 4 * EPOCH_STEPS
    # the two ranks read, step by step, the documents the one process read in its batch of four
    single = {r["step"]: sorted(r["sources"]) for r in runs["single"][0]}
    assert {r0["step"]: sorted(r0["sources"] + r1["sources"]) for r0, r1 in zip(ddp[0], ddp[1])} == single


def test_loss_trajectory_matches_one_process_with_the_same_global_batch(runs):
    single = [r["loss"] for r in runs["single"][0]]
    ddp = _ddp_trajectory(runs)
    both = [(r0["loss"] + r1["loss"]) / 2 for r0, r1 in zip(ddp[0], ddp[1])]
    assert len(single) == len(both) == STEPS
    assert single[0] - min(single) > 100 * LOSS_TOLERANCE  # the loss moves: the comparison below can tell
    worst = max(abs(a - b) for a, b in zip(single, both))
    assert worst < LOSS_TOLERANCE, f"two ranks {both} vs one process {single}"


def test_a_killed_run_resumes_on_both_ranks_from_its_checkpoint(runs):
    assert "step000004.ckpt" in runs["checkpoints_at_kill"]
    newest = max(int(name[4:10]) for name in runs["checkpoints_at_kill"] if name.startswith("step"))
    assert _resumed_from(runs) == newest  # the first step after the checkpoint, on both ranks
    for rank in (0, 1):
        resumed = runs["resumed"][rank]
        assert [r["step"] for r in resumed] == list(range(newest, STEPS))
        assert resumed[-1]["global_step"] == STEPS
        assert len({r["pid"] for r in resumed}) == 1
    assert runs["resumed"][0][0]["pid"] != runs["resumed"][1][0]["pid"]  # two processes, not one doing both


def test_one_run_folder_and_checkpoints_written_once(runs):
    folders = [p for p in (runs["base"] / "ddp" / "toy_aim").iterdir()]
    assert len(folders) == 1, f"the ranks wrote to several run folders: {folders}"
    run = folders[0]
    assert (run / "summary.json").is_file() and (run / "config.yaml").is_file()
    written = sorted(p.relative_to(run).as_posix() for p in run.rglob("*.ckpt"))
    assert written == ["checkpoints/last.ckpt"] + [f"checkpoints/step{s:06d}.ckpt" for s in
                                                    range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == STEPS
    # one file holds both ranks' stream positions (gathered to rank 0), which is what let both ranks continue
    streams = next(v for k, v in state.items() if "DataModule" in k)
    assert streams["world_size"] == 2 and len(streams["ranks"]) == 2


def test_the_two_process_run_is_evaluated_by_both_ranks_into_one_report(runs):
    """Evaluation after the two-process training runs in both processes (batches dealt to them) instead of on rank 0
    alone, and rank 0 writes the one report (the numbers equal one process's: tests/mmict/eval/test_ranks.py)."""
    run = next((runs["base"] / "ddp" / "toy_aim").iterdir())
    reports = sorted(p.name for p in (run / "eval").glob("results*.json"))
    assert reports == ["results.json"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["processes"] == 2 and results["checkpoint"].endswith("last.ckpt")
    assert {(t["method"], t["shots"]) for t in results["trials"]} == {("none", 0), ("fused", 1), ("images", 1)}
    assert all(len(t["predictions"]) == 6 for t in results["trials"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"] and "batches dealt to 2 processes" in summary["eval_report"]
