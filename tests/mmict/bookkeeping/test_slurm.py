"""SLURM job arrays (`mmict sweep`), the run folder a SLURM job pins, and Lightning reading ranks from SLURM."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from helpers import REPO
from lightning.pytorch.plugins.environments import SLURMEnvironment

from mmict.bookkeeping.folders import make_run_dir
from mmict.bookkeeping.slurm import (
    default_run_dir,
    format_value,
    main,
    parse_grid,
    plan_sweep,
    render_sbatch,
    slurm_job_tag,
    write_sweep,
)
from mmict.config import ConfigError, load_config

NOW = datetime(2025, 1, 2, 3, 4, 5)
GRID = ["data.shots=[4,8,16]", "seed=[1,2,3]"]


def _sweep(tmp_path, *extra):
    return plan_sweep("toy_aim", [*GRID, f"run_root={tmp_path / 'runs'}", *extra], now=NOW)


def test_grid_axes_and_fixed_overrides():
    grid = parse_grid(["data.shots=[4,8,16]", "seed=[1,2,3]", "trainer.max_steps=50", "eval.shots=[0,4]",
                       "optim.lr=[1e-4,3e-4]"])
    assert [k for k, _ in grid.axes] == ["data.shots", "seed", "optim.lr"]
    assert "trainer.max_steps=50" in grid.fixed
    assert "eval.shots=[0,4]" in grid.fixed  # a list-valued key: a flat list sets it, it does not sweep
    assert len(grid) == 3 * 3 * 2
    points = grid.points()
    assert points[0] == ["data.shots=4", "seed=1", "optim.lr=1e-4"]
    assert points[-1] == ["data.shots=16", "seed=3", "optim.lr=3e-4"]
    # a list-valued key sweeps over a list of lists
    grid = parse_grid(["eval.shots=[[0,4],[0,8]]"])
    assert grid.points() == [["eval.shots=[0,4]"], ["eval.shots=[0,8]"]]
    assert parse_grid('data.shots=[4,8] seed=[1]').points() == [["data.shots=4", "seed=1"], ["data.shots=8", "seed=1"]]
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["seed=[1,2]", "seed=[3]"])
    with pytest.raises(ConfigError, match="key="):
        parse_grid(["seed"])


def test_values_survive_the_round_trip():
    for value in ("gpu", "a b", "1.0", "true", "null", "x,y", "[1]"):  # strings YAML would read as something else
        assert load_config("toy_aim", [f"name={format_value(value)}"]).name == value
    assert load_config("toy_aim", [f"eval.shots={format_value([0, 4])}"]).eval.shots == [0, 4]
    assert load_config("toy_aim", [f"trainer.gradient_clip_val={format_value(None)}"]).trainer.gradient_clip_val is None
    assert format_value(True) == "true" and format_value(1.5) == "1.5"


def test_sbatch_script_for_a_grid(tmp_path):
    sweep = _sweep(tmp_path, "slurm.partition=gpu", "slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.time=02:00:00",
                   "trainer.max_steps=50")
    script = render_sbatch(sweep)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in ("--array=0-8", "--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--partition=gpu",
                   "--time=02:00:00", "--signal=SIGUSR1@90", "--requeue", "--open-mode=append",
                   f"--output={sweep.sweep_dir / 'logs'}/%A_%a.out", "--job-name=mmict-toy_aim"):
        assert f"#SBATCH {option}" in lines, option
    assert "#SBATCH --account" not in script  # unset options are left out
    assert sum(1 for line in lines if line.strip().startswith(tuple(f"{i})" for i in range(9)))) == 9
    assert "  5) POINT=(data.shots=8 seed=3 " in script  # first axis slowest: 5 = (shots[1], seed[2])
    srun = next(line for line in lines if line.startswith("srun "))
    assert srun.startswith("srun .venv/bin/python -m mmict.train toy_aim")
    assert "trainer.devices=4" in script and "trainer.num_nodes=2" in script
    assert f"logger.group={sweep.sweep_id}" in script and sweep.sweep_id == "toy_aim-20250102-030405"
    assert sweep.sweep_dir == tmp_path / "runs" / "sweeps" / "toy_aim" / "20250102-030405"
    # every run: the fixed overrides
    assert "trainer.max_steps=50" in script.split("esac", 1)[1]


def _fake_srun(tmp_path, printed: str):
    """A folder holding a fake `srun` that writes `printed` (shell words), one per line, to $SRUN_OUT."""
    fake = tmp_path / "bin"
    fake.mkdir()
    srun = fake / "srun"
    srun.write_text(f'#!/bin/bash\nprintf "%s\\n" {printed} > "$SRUN_OUT"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return fake


def test_each_array_index_runs_its_grid_point(tmp_path):
    """Run the generated script with bash and a fake `srun`: index i gets grid point i, and the command loads."""
    sweep = _sweep(tmp_path, "slurm.setup=[\"export FROM_SETUP=1\"]")
    path = write_sweep(sweep)
    fake = _fake_srun(tmp_path, '"$FROM_SETUP" "$@"')
    for index, (shots, seed) in {0: (4, 1), 4: (8, 2), 8: (16, 3)}.items():
        out = tmp_path / f"srun_{index}.txt"
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(index),
               "SLURM_JOB_NAME": "mmict-toy_aim", "SRUN_OUT": str(out)}
        subprocess.run(["bash", str(path)], env=env, check=True, capture_output=True, text=True)
        args = out.read_text().splitlines()
        assert args[0] == "1"  # the slurm.setup lines ran first
        assert args[1:4] == [".venv/bin/python", "-m", "mmict.train"] and args[4] == "toy_aim"
        overrides = args[5:]
        assert f"data.shots={shots}" in overrides and f"seed={seed}" in overrides
        run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))
        assert run_dir == str(sweep.points[index].run_dir) and Path(run_dir).name.startswith(f"{index:03d}_")
        cfg = load_config("toy_aim", overrides)  # exactly what the task will train
        assert (cfg.data.shots, cfg.seed, cfg.run_dir) == (shots, seed, run_dir)
        assert cfg.logger.group == sweep.sweep_id and "sweep" in cfg.logger.tags and sweep.sweep_id in cfg.logger.tags
    bad = subprocess.run(["bash", str(path)], env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                                                   "SLURM_ARRAY_TASK_ID": "9", "SRUN_OUT": "/dev/null"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a grid point" in bad.stderr
    grid = json.loads((sweep.sweep_dir / "grid.json").read_text())
    assert len(grid["points"]) == 9 and grid["axes"] == {"data.shots": [4, 8, 16], "seed": [1, 2, 3]}
    assert grid["wandb"]["group"] == sweep.sweep_id
    assert (sweep.sweep_dir / "logs").is_dir()
    with pytest.raises(FileExistsError):
        write_sweep(sweep)


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    assert main(["toy_aim", *GRID, f"run_root={tmp_path / 'runs'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-8" in out and "srun " in out
    assert not (tmp_path / "runs").exists()


def test_a_bad_grid_point_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="grid point 0 .*data.shotz"):
        plan_sweep("toy_aim", ["data.shotz=[4,8]", f"run_root={tmp_path}"])
    with pytest.raises(ConfigError, match="data.min_shots"):  # a semantic error in one point only
        plan_sweep("toy_aim", ["data.min_shots=[1,9]", f"run_root={tmp_path}"])
    assert not any(tmp_path.iterdir())


SLURM_ENV = {
    "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "mmict-toy_aim", "SLURM_NODELIST": "gpu[01-02]",
    "SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1200", "SLURM_ARRAY_TASK_ID": "3",
}


def test_simulated_slurm_job_resolves_ranks(monkeypatch, tmp_path):
    """What `srun` sets for rank 5 of 8 (2 nodes x 4 GPUs): Lightning's SLURMEnvironment takes it from there."""
    from lightning_utilities.core.rank_zero import rank_zero_only  # the one Lightning's modules share

    from mmict.train import build_trainer

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    # SLURMEnvironment writes MASTER_ADDR / MASTER_PORT into os.environ itself: registered here, monkeypatch restores
    # them after the test (a later test's processes would otherwise look for the fake node "gpu01")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    # Lightning sets the process-wide rank (rank_zero_only.rank = 5): put it back after the test, or every later
    # test in this process would be "rank 5" and log nothing.
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    cfg = load_config("toy_aim", ["trainer.accelerator=cpu", "trainer.devices=4", "trainer.num_nodes=2",
                                  "trainer.strategy=ddp", "logger.wandb=false", "trainer.progress_bar=false"])
    trainer, _ = build_trainer(cfg, tmp_path)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (5, 1, 1, 8)
    assert env.main_address == "gpu01"
    assert env.auto_requeue  # SIGUSR1 -> checkpoint + scontrol requeue
    assert not trainer.is_global_zero
    # every rank and every requeue of the task write to one folder
    assert slurm_job_tag() == "1200_3"
    assert default_run_dir(cfg) == str(Path(cfg.run_root) / "toy_aim" / "slurm-1200_3")
    assert default_run_dir(load_config("toy_aim", ["run_dir=/x/y"])) == "/x/y"


def test_no_slurm_no_pinned_folder(monkeypatch):
    for key in SLURM_ENV:
        monkeypatch.delenv(key, raising=False)
    assert slurm_job_tag() is None
    assert default_run_dir(load_config("toy_aim")) is None
    assert slurm_job_tag({**SLURM_ENV, "SLURM_JOB_NAME": "bash"}) is None  # an interactive shell
    env = {k: v for k, v in SLURM_ENV.items() if not k.startswith("SLURM_ARRAY")}
    assert slurm_job_tag({**env, "SLURM_STEP_ID": "2"}) == "1234-step2"


def test_pinned_run_folder_is_reused(tmp_path):
    first = make_run_dir(tmp_path, "exp", tmp_path / "pinned")
    (first / "checkpoints").mkdir()
    again = make_run_dir(tmp_path, "exp", tmp_path / "pinned")
    assert again == first and (again / "checkpoints").is_dir()
    fresh = make_run_dir(tmp_path, "exp")
    assert fresh.parent == tmp_path / "exp"


def test_make_sweep_target_passes_the_grid(tmp_path):
    make = subprocess.run(["make", "-n", "sweep", "EXP=toy_aim", "GRID=data.shots=[4,8] seed=[1,2]", "DRY_RUN=1"],
                          cwd=REPO, capture_output=True,
                          text=True)
    assert make.returncode == 0, make.stderr
    line = next(x for x in make.stdout.splitlines() if "mmict sweep" in x)
    assert "'data.shots=[4,8]' 'seed=[1,2]'" in line and "--dry-run" in line


def test_an_evaluation_sweep_runs_mmict_eval_on_the_checkpoint_per_array_task(tmp_path):
    """`mmict sweep --eval CKPT`: each array task evaluates the checkpoint at its grid point into its own folder
    (`--out`, where `mmict compare` finds config.yaml and eval/), with the checkpoint's config and its overrides."""
    import torch
    from omegaconf import OmegaConf

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    cfg = load_config("toy_aim", [f"run_root={tmp_path / 'runs'}", "eval.shots=[0,4]"])
    torch.save({"hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)}, "state_dict": {}}, ckpt)
    with pytest.raises(ConfigError, match="grid point 0 .*eval.seedz"):
        plan_sweep(None, ["eval.seedz=[[0],[1]]"], checkpoint=str(ckpt))
    assert main(["--eval", str(ckpt), "eval.seeds=[[0],[1],[2]]", "--dry-run"]) == 0  # no experiment with --eval
    sweep = plan_sweep(None, ["eval.seeds=[[0],[1],[2]]"], checkpoint=str(ckpt), now=NOW)
    assert sweep.sweep_dir == tmp_path / "runs" / "sweeps" / "toy_aim-eval" / "20250102-030405"
    path = write_sweep(sweep)
    fake = _fake_srun(tmp_path, '"$@"')
    out = tmp_path / "srun.txt"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1", "SRUN_OUT": str(out),
           "SLURM_JOB_NAME": "mmict-toy_aim-eval"}
    subprocess.run(["bash", str(path)], env=env, check=True, capture_output=True, text=True)
    args = out.read_text().splitlines()
    assert args[1:4] == ["-m", "mmict.eval", str(ckpt)]
    rest = args[4:]
    folder = rest[rest.index("--out") + 1]
    assert folder == str(sweep.points[1].run_dir)
    overrides = [a for a in rest if "=" in a]
    from mmict.bookkeeping.slurm import checkpoint_config

    point = checkpoint_config(ckpt, overrides)  # exactly what the task evaluates
    assert list(point.eval.seeds) == [1] and list(point.eval.shots) == [0, 4]
    assert point.logger.group == sweep.sweep_id
