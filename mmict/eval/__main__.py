"""`python -m mmict.eval [CKPT] [--exp EXP] [--shots 0,4,8] [key=value ...]` (also `mmict eval`, `make eval`).

With a checkpoint: its experiment config (overrides on top), the frozen backbone reloaded from
`backbone.name_or_path`, the report next to the checkpoint's run folder. Without one (`--exp`): the
training-free baselines of an experiment on its frozen backbone (zero-shot, vanilla ICL, text-only
demos), reported under `runs/<exp>/eval-<time>/`; the fused demo mode needs a trained checkpoint.

Evaluation runs on `trainer.accelerator` with `trainer.devices` processes per node (`trainer.num_nodes` nodes),
started by Lightning as training's are (`srun`, `torchrun`, or `trainer.devices=N` here, CPU included): the
batches are dealt to the processes and the numbers are those of one process (`mmict.eval.ranks`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from mmict.config import ConfigError, config_from_dict, load_config, save_config
from mmict.config.extra_tasks import task_configs
from mmict.eval.ranks import Ranks, launch
from mmict.eval.runner import run_tasks
from mmict.methods import METHODS
from mmict.toy.prepare import prepare as prepare_toy


def evaluate_checkpoint(ckpt: str | Path, overrides: list[str], out: str | Path | None = None) -> list[dict]:
    """The checkpoint's evaluation, reported under its run folder's eval/ or, with `out` (an array task of
    `mmict sweep --eval`), under `out/eval` with the evaluation's config in `out/config.yaml` (`mmict compare`)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (runs keep theirs in runs/<exp>/<time>/checkpoints)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = config_from_dict(state["hyper_parameters"]["config"], overrides)
    ranks = launch_for(cfg)
    # a toy run's world and backbone, rebuilt from their recipes if this machine lacks them (by rank 0 alone)
    ranks.main_first(lambda: prepare_toy(cfg))
    module = METHODS[cfg.method.name](cfg)
    module.restore(state)
    module.to(ranks.device)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    if out is not None:
        run_dir = Path(out)
        if ranks.main and not (run_dir / "config.yaml").exists():  # a requeued task keeps its folder's
            save_config(cfg, run_dir / "config.yaml")
    rows, report = evaluate_tasks(module, cfg, run_dir / "eval", checkpoint=str(ckpt), ranks=ranks)
    if ranks.main:
        print(report)
    return rows


def evaluate_baselines(experiment: str, overrides: list[str]) -> list[dict]:
    """Training-free baselines (demo modes none / images / text) of an experiment, no checkpoint."""
    from mmict.bookkeeping.folders import make_run_dir

    cfg = load_config(experiment, overrides)
    if cfg.method.name == "mmict":
        raise ConfigError("MMICT's M-Hub has no training-free baseline (it is trained with the method): pass a "
                          "checkpoint (mmict eval runs/<exp>/<time>/checkpoints/last.ckpt)")
    cfg.eval.demo_modes = list(cfg.eval.demo_modes or ["images", "text"])  # null: the training-free ones
    if "fused" in cfg.eval.demo_modes:
        raise ConfigError(
            f"eval.demo_modes={list(cfg.eval.demo_modes)} includes fused, which needs a trained projector: pass a "
            "checkpoint (mmict eval runs/<exp>/<time>/checkpoints/last.ckpt), or evaluate the training-free "
            "baselines with eval.demo_modes=[images,text]"
        )
    ranks = launch_for(cfg)
    ranks.main_first(lambda: prepare_toy(cfg))
    module = METHODS[cfg.method.name](cfg)  # loads the backbone first: missing weights fail before any folder
    module.to(ranks.device)
    run_dir = ranks.broadcast(make_run_dir(cfg.run_root, cfg.name) if ranks.main else None)
    if ranks.main:
        save_config(cfg, run_dir / "config.yaml")
    rows, report = evaluate_tasks(module, cfg, run_dir / "eval", ranks=ranks)
    if ranks.main:
        print(f"{report}\n\nreport: {run_dir / 'eval'}")
    return rows


def launch_for(cfg) -> Ranks:
    """The evaluation's processes (`trainer.accelerator`, `trainer.devices`, `trainer.num_nodes`), started by
    Lightning; this one's rank and device."""
    tr = cfg.trainer
    return launch(tr.accelerator, tr.devices, tr.num_nodes)


def evaluate_tasks(module, cfg, eval_dir: Path, checkpoint: str | None = None,
                   ranks: Ranks | None = None) -> tuple[list[dict], str]:
    """eval.task and each of eval.extra_tasks (`run_tasks`); eval.task's rows and the reports of all."""
    outcomes = run_tasks(module, cfg, task_configs(cfg), eval_dir, checkpoint=checkpoint, ranks=ranks)
    main = outcomes.pop(cfg.eval.task)
    return main.rows, "".join([main.report, *(f"\n\n--- {task} ---\n{o.report}" for task, o in outcomes.items())])


def shots_override(shots: str | None) -> list[str]:
    """`--shots 0,4,8` (make eval SHOTS=0,4,8) as the eval.shots override."""
    if not shots:
        return []
    try:
        values = [int(s) for s in shots.split(",") if s.strip()]
    except ValueError as err:
        raise ConfigError(f"--shots/SHOTS must be comma-separated integers, e.g. 0,4,8,16,32 (got {shots!r})") from err
    return [f"eval.shots=[{','.join(map(str, values))}]"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmict eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a trained checkpoint (its run's config is used)")
    parser.add_argument("--exp", help="without a checkpoint: evaluate this experiment's training-free baselines")
    parser.add_argument("--shots", help="comma-separated shot counts, e.g. 0,4,8,16,32 (= eval.shots=[...])")
    parser.add_argument("--out", help="with a checkpoint: report into this folder (config.yaml, eval/) instead of "
                        "the checkpoint's run folder (`mmict sweep --eval` gives each array task one)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.seeds=[0,1,2]")
    # intermixed: `make eval CKPT=... SHOTS=0,4 ARGS="eval.seeds=[0]"` puts the overrides after --shots, which
    # plain parse_args refuses ("unrecognized arguments") once the positionals were filled before --shots.
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as mmict train
    overrides = args.overrides + shots_override(args.shots)
    if args.checkpoint and "=" in args.checkpoint:  # `mmict eval eval.shots=[0]` with --exp: not a path
        overrides, args.checkpoint = [args.checkpoint, *overrides], None
    if args.checkpoint:
        evaluate_checkpoint(args.checkpoint, overrides, out=args.out)
    elif args.out:
        parser.error("--out goes with a checkpoint (training-free baselines report under runs/<exp>/eval-<time>/)")
    elif args.exp:
        evaluate_baselines(args.exp, overrides)
    else:
        parser.error("give a checkpoint, or --exp EXP to evaluate an experiment's training-free baselines")


if __name__ == "__main__":
    sys.exit(main())
