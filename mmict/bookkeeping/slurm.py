"""SLURM job arrays: one array task per grid point, `srun python -m mmict.train EXP overrides...` inside.

`mmict sweep EXP 'data.shots=[4,8,16]' 'seed=[1,2,3]' [--dry-run] [--submit]` (also `make sweep`):

- every `key=[a,b,...]` is a grid axis; the grid is their cartesian product (first axis slowest); any other
  `key=value` is applied to every run. A key whose own type is a list (`eval.shots`) sweeps only over a list
  of lists (`eval.shots=[[0,4],[0,8]]`); `eval.shots=[0,4]` sets it for every run.
- every grid point is validated (`load_config`) before anything is written, so a typo fails here, not on
  the cluster.
- writes `<run_root>/sweeps/<name>/<timestamp>/sweep.sbatch` (+ `grid.json`, and `logs/` for the per-task
  logs `%A_%a.out`); `--dry-run` prints the script and writes nothing; `--submit` runs `sbatch` on it.
- resources come from the experiment's `slurm:` section (partition, nodes, gpus_per_node, cpus_per_task,
  time, mem, account, qos, constraint, extra_sbatch, setup lines, python), overridable like any key.
- `#SBATCH --signal=SIGUSR1@90`: 90 s before the time limit SLURM signals the job's tasks; Lightning's
  SLURMEnvironment (auto-requeue) saves `hpc_ckpt_N.ckpt` into the run folder and requeues the array task,
  which re-runs the *same* command: the run folder is pinned per grid point (`run_dir=`), so the requeued
  task finds that checkpoint and resumes. Logs append (`--open-mode=append`).
- all runs of a sweep share a W&B group (the sweep id) and the tags `sweep`, the experiment name and the
  sweep id, so the dashboard groups and compares them; `mmict compare <sweep folder>` does it offline.

`mmict sweep --eval CKPT 'eval.seeds=[[0],[1],[2]]' 'eval.shots=[[4],[8]]'` fans one checkpoint's evaluation out
instead: each array task runs `srun python -m mmict.eval CKPT <its overrides> --out <its folder>` (its processes
share its batches, `mmict.eval.ranks`), writing config.yaml and eval/results.json into its folder, so
`mmict compare <sweep folder>` tables every trial side by side. Points are validated against the checkpoint's
config.

`lightning run` no longer exists (Lightning >= 2.5); `sbatch` + `srun python -m mmict.train` with
Lightning's SLURMEnvironment (ranks from SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID) replaces it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mmict.config import ConfigError, config_from_dict, key_takes_list, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A parsed override value back into `key=value` text that `load_config` parses to the same thing."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        if value == "" or yaml.safe_load(value) != value or any(c in value for c in ",[]{}"):
            return json.dumps(value)  # a string YAML would otherwise read as a number, bool, list...
        return value
    return str(value)


@dataclass
class Grid:
    axes: list[tuple[str, list[Any]]] = field(default_factory=list)  # swept keys, in the given order
    fixed: list[str] = field(default_factory=list)  # `key=value` applied to every run

    def points(self) -> list[list[str]]:
        """One override list per grid point (cartesian product, first axis slowest)."""
        if not self.axes:
            return [[]]
        keys = [k for k, _ in self.axes]
        return [[f"{k}={format_value(v)}" for k, v in zip(keys, combo)]
                for combo in itertools.product(*(values for _, values in self.axes))]

    def __len__(self) -> int:
        n = 1
        for _, values in self.axes:
            n *= len(values)
        return n


def parse_grid(items: Sequence[str]) -> Grid:
    """`['data.shots=[4,8,16]', 'seed=[1,2,3]', 'trainer.max_steps=100']` -> axes and fixed overrides."""
    if isinstance(items, str):
        items = shlex.split(items)
    grid = Grid()
    seen: set[str] = set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"grid item {item!r}: expected key=[v1,v2,...] (a sweep axis) or key=value")
        if key in seen:
            raise ConfigError(f"grid key '{key}' is given twice")
        seen.add(key)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"grid item {item!r}: cannot parse the value as YAML ({err.__class__.__name__}); "
                              "write lists as key=[a,b,c]") from None
        sweeps = isinstance(value, list) and (not key_takes_list(key) or all(isinstance(v, list) for v in value))
        if sweeps:
            if not value:
                raise ConfigError(f"grid axis '{key}' has no values")
            if len(set(map(format_value, value))) != len(value):
                raise ConfigError(f"grid axis '{key}' repeats a value: {value}")
            grid.axes.append((key, list(value)))
        else:
            grid.fixed.append(f"{key}={format_value(value)}")
    return grid


def _slug(overrides: Sequence[str], limit: int = 60) -> str:
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        leaf = key.rsplit(".", 1)[-1]
        value = re.sub(r"[^A-Za-z0-9.]+", "-", value).strip("-")
        parts.append(f"{leaf}{value}")
    return re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(parts))[:limit] or "run"


# ------------------------------------------------------------------------------------------------------
# The sweep and its script
# ------------------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    index: int
    overrides: list[str]
    run_dir: Path


@dataclass
class Sweep:
    experiment: str  # as passed to `python -m mmict.train` (a name, or an absolute yaml path)
    name: str
    sweep_id: str
    sweep_dir: Path
    grid: Grid
    points: list[SweepPoint]
    slurm: dict[str, Any]
    trainer_devices: int
    tags: list[str]
    command: str = ""
    checkpoint: str | None = None  # an evaluation sweep of this checkpoint (`mmict.eval`) instead of training runs

    @property
    def entry(self) -> str:
        """What each array task runs: `python -m mmict.train EXP` or `python -m mmict.eval CKPT`."""
        return f"mmict.eval {shlex.quote(self.checkpoint)}" if self.checkpoint else \
            f"mmict.train {shlex.quote(self.experiment)}"

    def folder_args(self, point: SweepPoint) -> list[str]:
        """How a task is pointed at its folder: `run_dir=` (training) or `--out` (evaluation)."""
        return ["--out", str(point.run_dir)] if self.checkpoint else [f"run_dir={point.run_dir}"]

    @property
    def script_path(self) -> Path:
        return self.sweep_dir / "sweep.sbatch"

    @property
    def log_dir(self) -> Path:
        return Path(self.slurm.get("log_dir") or self.sweep_dir / "logs").absolute()

    def common_overrides(self) -> list[str]:
        """What every task adds: its share of the job's GPUs/nodes, the W&B group and tags."""
        s = self.slurm
        # `slurm.*` shapes this script only; the runs do not need it.
        fixed = [o for o in self.grid.fixed if not o.startswith("slurm.")]
        return [*fixed, f"trainer.devices={s['gpus_per_node']}", f"trainer.num_nodes={s['nodes']}",
                f"logger.group={self.sweep_id}", f"logger.tags={format_value(self.tags)}"]


def checkpoint_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config a checkpoint was trained with, `overrides` applied (as `mmict eval CKPT key=value` builds it)."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"--eval {path}: no such checkpoint file (runs keep theirs in runs/<exp>/<time>/checkpoints)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return config_from_dict(state["hyper_parameters"]["config"], overrides)


def plan_sweep(experiment: str | None, items: Sequence[str], *, now: datetime | None = None,
               experiments_dir: str | Path | None = None, command: str = "", checkpoint: str | None = None) -> Sweep:
    """Parse the grid, validate every point's config, and lay out the sweep folder (nothing is written).
    `checkpoint`: an evaluation sweep of it (each point's config is the checkpoint's with the point's overrides)."""
    grid = parse_grid(items)

    def config(overrides: Sequence[str]) -> DictConfig:
        if checkpoint is not None:
            return checkpoint_config(checkpoint, overrides)
        return load_config(experiment, overrides, experiments_dir=experiments_dir)

    base = config(grid.fixed)
    points = grid.points()
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = f"{base.name}-eval" if checkpoint is not None else base.name
    sweep_id = f"{name}-{stamp}"
    sweep_dir = (Path(base.run_root) / "sweeps" / name / stamp).absolute()
    out: list[SweepPoint] = []
    for i, point in enumerate(points):
        try:
            config([*grid.fixed, *point])
        except ConfigError as err:
            raise ConfigError(f"grid point {i} ({' '.join(point)}): {err}") from None
        out.append(SweepPoint(i, point, sweep_dir / "runs" / f"{i:03d}_{_slug(point)}"))
    slurm = OmegaConf.to_container(base.slurm, resolve=True)
    assert isinstance(slurm, dict)
    exp = str(Path(experiment).absolute()) if str(experiment).endswith((".yaml", ".yml")) else str(experiment)
    tags = list(dict.fromkeys([*base.logger.tags, "sweep", base.name, sweep_id]))
    ckpt = str(Path(checkpoint).absolute()) if checkpoint is not None else None
    return Sweep(exp, name, sweep_id, sweep_dir, grid, out, slurm, int(slurm["gpus_per_node"]), tags,
                 command or _command_line(experiment, items, checkpoint), checkpoint=ckpt)


def _command_line(experiment: str | None, items: Sequence[str], checkpoint: str | None = None) -> str:
    head = ["--eval", str(checkpoint)] if checkpoint is not None else [str(experiment)]
    return " ".join(["mmict", "sweep", *map(shlex.quote, head), *map(shlex.quote, items)])


def sbatch_header(slurm: Mapping[str, Any], job_name: str, array: str, output: str) -> list[str]:
    s = slurm
    lines = [f"--job-name={job_name}", f"--array={array}", f"--nodes={s['nodes']}",
             f"--ntasks-per-node={s['gpus_per_node']}", f"--gres=gpu:{s['gpus_per_node']}",
             f"--cpus-per-task={s['cpus_per_task']}", f"--time={s['time']}"]
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if s.get(key):
            lines.append(f"--{key}={s[key]}")
    lines += [f"--output={output}", "--open-mode=append", f"--signal=SIGUSR1@{s['signal_seconds']}", "--requeue"]
    lines += [str(x) for x in s.get("extra_sbatch") or []]
    return [f"#SBATCH {line}" for line in lines]


def render_sbatch(sweep: Sweep) -> str:
    n = len(sweep.points)
    array = f"0-{n - 1}" + (f"%{sweep.slurm['max_concurrent']}" if sweep.slurm.get("max_concurrent") else "")
    axes = " ".join(f"{k}={format_value(v)}" for k, v in sweep.grid.axes) or "(no axis: one run)"
    lines = [
        "#!/bin/bash",
        f"# mmict sweep {sweep.sweep_id}: {sweep.name}, {n} run(s), one per array index ({array})",
        f"# grid: {axes}",
        *( [f"# fixed settings: {' '.join(sweep.grid.fixed)}"] if sweep.grid.fixed else []),
        f"# made by: {sweep.command}",
        f"# submit:  sbatch {sweep.script_path}",
        "# Each array task " + ("evaluates the checkpoint at" if sweep.checkpoint else "trains") + " one grid point: "
        "srun starts one process per GPU and Lightning's SLURMEnvironment",
        "# reads the ranks from SLURM. SIGUSR1 (sent 90 s before the time limit) makes Lightning save",
        "# hpc_ckpt_N.ckpt in the run folder and requeue the task, which re-runs this command and resumes.",
        *sbatch_header(sweep.slurm, f"mmict-{sweep.name}", array, str(sweep.log_dir / "%A_%a.out")),
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        "export PYTHONUNBUFFERED=1",
        *[str(line) for line in sweep.slurm.get("setup") or []],
        "",
        'case "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}" in',
    ]
    for p in sweep.points:
        args = " ".join(shlex.quote(a) for a in [*p.overrides, *sweep.folder_args(p)])
        lines.append(f"  {p.index}) POINT=({args}) ;;")
    lines += [
        f'  *) echo "array index $SLURM_ARRAY_TASK_ID is not a grid point (0-{n - 1})" >&2; exit 2 ;;',
        "esac",
        "",
        'echo "[$(date)] $SLURM_JOB_NAME task $SLURM_ARRAY_TASK_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
        '$(hostname): ${POINT[*]}"',
        f"srun {shlex.quote(str(sweep.slurm['python']))} -m {sweep.entry} "
        '"${POINT[@]}" \\',
        *[f"    {shlex.quote(a)} \\" for a in sweep.common_overrides()[:-1]],
        f"    {shlex.quote(sweep.common_overrides()[-1])}",
        "",
    ]
    return "\n".join(lines)


def grid_json(sweep: Sweep) -> dict[str, Any]:
    return {
        "sweep_id": sweep.sweep_id, "experiment": sweep.experiment, "name": sweep.name, "command": sweep.command,
        "checkpoint": sweep.checkpoint,
        "created": datetime.now().isoformat(timespec="seconds"),
        "axes": {k: v for k, v in sweep.grid.axes}, "fixed": sweep.grid.fixed,
        "common_overrides": sweep.common_overrides(), "wandb": {"group": sweep.sweep_id, "tags": sweep.tags},
        "points": [{"index": p.index, "overrides": p.overrides, "run_dir": str(p.run_dir)} for p in sweep.points],
        "slurm": sweep.slurm, "script": str(sweep.script_path), "logs": str(sweep.log_dir),
    }


def write_sweep(sweep: Sweep) -> Path:
    if sweep.sweep_dir.exists():
        raise FileExistsError(f"sweep folder {sweep.sweep_dir} exists already (nothing is overwritten)")
    sweep.sweep_dir.mkdir(parents=True)
    sweep.log_dir.mkdir(parents=True, exist_ok=True)
    sweep.script_path.write_text(render_sbatch(sweep))
    sweep.script_path.chmod(0o755)
    (sweep.sweep_dir / "grid.json").write_text(json.dumps(grid_json(sweep), indent=2))
    return sweep.script_path


# ------------------------------------------------------------------------------------------------------
# Inside a SLURM job
# ------------------------------------------------------------------------------------------------------


def slurm_job_tag(env: Mapping[str, str] | None = None) -> str | None:
    """`<array job>_<task>` or `<job>` (plus `-step<N>` for a later srun step) when running under SLURM
    (sbatch/srun, not an interactive shell): the same on every rank and across requeues."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        tag = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        tag = env["SLURM_JOB_ID"]
    step = env.get("SLURM_STEP_ID", "0")
    if step.isdigit() and int(step) not in (0, 4294967294, 4294967295):  # batch/extern steps read as these
        tag += f"-step{step}"
    return tag


def default_run_dir(cfg: DictConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The pinned run folder: `run_dir` when set, else `<run_root>/<name>/slurm-<job tag>` under SLURM (all
    ranks of a job must write to one folder, and a requeued job must find its checkpoint), else None (a new
    timestamped folder)."""
    if cfg.get("run_dir"):
        return str(cfg.run_dir)
    tag = slurm_job_tag(env)
    return str(Path(cfg.run_root) / cfg.name / f"slurm-{tag}") if tag else None


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmict sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write (and optionally submit) a SLURM job array with one task per grid point.",
        epilog="example: mmict sweep aim_okvqa 'data.shots=[4,8,16]' 'seed=[1,2,3]' slurm.partition=gpu --dry-run")
    parser.add_argument("experiment", nargs="?", help="name under experiments/ or a yaml path (not with --eval)")
    parser.add_argument("grid", nargs="*", help="key=[a,b,...] (a grid axis) or key=value (every run)")
    parser.add_argument("--eval", metavar="CKPT", help="fan this checkpoint's evaluation out instead of training "
                        "(e.g. 'eval.seeds=[[0],[1],[2]]'): one `mmict eval` per array task")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, write nothing")
    parser.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    args = parser.parse_intermixed_args(argv)
    if args.eval and args.experiment and "=" in args.experiment:  # no experiment with --eval: a grid item
        args.grid, args.experiment = [args.experiment, *args.grid], None
    if bool(args.eval) == bool(args.experiment):
        parser.error("give an experiment to train, or --eval CKPT to evaluate a checkpoint (not both)")
    sweep = plan_sweep(args.experiment, args.grid, checkpoint=args.eval)
    if args.dry_run:
        print(render_sbatch(sweep))
        print(f"# dry run: {len(sweep.points)} run(s); would write {sweep.script_path} and grid.json",
              file=sys.stderr)
        return 0
    path = write_sweep(sweep)
    print(f"wrote {path} ({len(sweep.points)} array task(s)) and {sweep.sweep_dir / 'grid.json'}")
    print(f"runs: {sweep.sweep_dir / 'runs'}/NNN_*   logs: {sweep.log_dir}/%A_%a.out   W&B group: {sweep.sweep_id}")
    print(f"compare when done: mmict compare {sweep.sweep_dir}")
    if args.submit:
        if shutil.which("sbatch") is None:
            print("error: sbatch is not on PATH (not a SLURM login node?); submit the script there", file=sys.stderr)
            return 1
        return subprocess.run(["sbatch", str(path)], check=False).returncode
    print(f"submit: sbatch {path}")
    return 0
