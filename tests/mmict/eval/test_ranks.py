"""Evaluation over several processes gives the numbers of one: the same checkpoint evaluated by `mmict eval` with one
process and with two (Lightning's launcher, CPU, gloo) gives identical per-query predictions, scores, context tokens
and tables; the demonstration bank is built once (by rank 0) and one results.json is written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import webdataset as wds
from helpers import REPO, tiny_aim_cfg
from PIL import Image as PILImage

from mmict.eval.ranks import Ranks, local_launch_env

WORDS = ["red", "blue", "green", "circle", "square", "left"]


def test_whole_batches_are_dealt_round_robin_and_cover_every_batch_once():
    dealt = [Ranks(rank, 3).mine(8) for rank in range(3)]
    assert dealt == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(b for mine in dealt for b in mine) == list(range(8))
    one = Ranks()
    assert one.mine(3) == [0, 1, 2] and one.gather("x") == ["x"] and one.broadcast("y") == "y" and one.main


def _shard(path, n: int, prefix: str, rng: random.Random) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            buf = io.BytesIO()
            PILImage.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
            meta = {"id": f"{prefix}{i}", "question": rng.choice(["what is it ?", "which colour ?", "where ?"]),
                    "answers": [rng.choice(WORDS)]}
            sink.write({"__key__": f"{prefix}{i:04d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()})


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _evaluate(ckpt, bank_dir, processes: int) -> tuple[dict, str]:
    """`python -m mmict.eval CKPT` with `processes` CPU processes, one thread each (as every rank of the 2-process
    run: equal threads keep float sums in the same order); its results.json and output."""
    # no rank, cluster or address settings of the process running the tests: Lightning launches the ranks itself
    env = {**local_launch_env(), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mmict.eval", str(ckpt), "trainer.accelerator=cpu", f"trainer.devices={processes}",
           f"eval.bank.dir={bank_dir}"]
    log = ckpt.parent.parent / f"eval_{processes}.log"
    # its own process group, its output in a file (a rank Lightning started holds the same stdout: a pipe would wait
    # for it too): rank 0 must end, then every rank it started, and none outlives the test
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=300)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        lingering = _group_alive(proc.pid)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{processes}-process evaluation still running after 300 s:\n{log.read_text()[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert not lingering, f"a rank did not exit within 30 s of rank 0:\n{output[-3000:]}"
    results = sorted((ckpt.parent.parent / "eval").glob("results*.json"))
    assert len(results) == 1, results  # one results.json, written by rank 0 alone
    return json.loads(results[0].read_text()), output


@pytest.mark.slow
def test_two_processes_give_the_predictions_and_scores_of_one(tmp_path, tiny_backbone_dir):
    from mmict.methods.aim.module import AIMModule

    rng = random.Random(0)
    data = tmp_path / "data" / "okvqa"
    data.mkdir(parents=True)
    _shard(data / "test-000000.tar", 11, "test", rng)  # 11 queries in batches of 4: 3 batches, dealt 2 + 1
    _shard(data / "train-000000.tar", 12, "pool", rng)
    (data / "train.summary.json").write_text(json.dumps({"written": 12, "shards": ["train-000000.tar"]}))
    cfg = tiny_aim_cfg(tiny_backbone_dir, f"data.root={tmp_path / 'data'}", f"run_root={tmp_path / 'runs'}",
                       "eval.task=okvqa", "eval.postprocess=vqa", "eval.batch_size=4", "eval.shots=[0,2]",
                       "eval.seeds=[0,1]", "eval.num_queries=null", "eval.demo_modes=[fused,images,text]",
                       "eval.max_new_tokens=3", "eval.bank.enabled=true", "eval.extra_tasks=[]", "logger.wandb=false")
    torch.manual_seed(0)
    module = AIMModule(cfg)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)  # the trainable weights only, as a run saves them
    ckpts = {}
    for n in (1, 2):  # each in its own run folder: its report lands there
        folder = tmp_path / "runs" / f"p{n}" / "checkpoints"
        folder.mkdir(parents=True)
        torch.save(checkpoint, folder / "last.ckpt")
        ckpts[n] = folder / "last.ckpt"

    one, _ = _evaluate(ckpts[1], tmp_path / "bank1", 1)
    two, out = _evaluate(ckpts[2], tmp_path / "bank2", 2)

    assert one["processes"] == 1 and two["processes"] == 2
    assert "batches dealt to 2 processes" in (ckpts[2].parent.parent / "eval" / "results.md").read_text()
    trials_one, trials_two = one["trials"], two["trials"]
    assert len(trials_one) == len(trials_two) == 2 * (3 + 1)  # seeds x (3 modes at 2 shots + zero-shot)
    for a, b in zip(trials_one, trials_two, strict=True):
        assert (a["method"], a["shots"], a["seed"]) == (b["method"], b["shots"], b["seed"])
        assert a["predictions"] == b["predictions"]  # every query, in order, answered alike
        assert a["accuracy"] == b["accuracy"] and a["context_tokens"] == b["context_tokens"]
        assert len(a["predictions"]) == 11
    def numbers(rows):  # the summary rows without the time per query (a timing: it varies run to run)
        return [{k: v for k, v in row.items() if k != "ms_per_query"} for row in rows]

    assert numbers(one["summary"]) == numbers(two["summary"])
    assert all(row["ms_per_query"] > 0 for row in two["summary"])
    # the answers are not one constant string (the comparison would then prove little)
    assert len({p["generation"] for t in trials_one for p in t["predictions"]}) > 3
    # the bank: every distinct demo computed once, by rank 0; rank 1 loaded what it stored
    computed = two["bank"]["computed_per_rank"]
    assert computed[0] == one["bank"]["computed"] > 0 and computed[1] == 0
    assert out.count("evaluating with 2 processes") == 1
