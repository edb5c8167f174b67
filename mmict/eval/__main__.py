"""`python -m mmict.eval [CKPT] [--exp EXP] [--shots 0,4,8] [key=value ...]` (also `mmict eval`, `make eval`).

With a checkpoint: its experiment config (overrides on top), the frozen backbone reloaded from
`backbone.name_or_path`, the report next to the checkpoint's run folder. Without one (`--exp`): the
training-free baselines of an experiment on its frozen backbone (zero-shot, vanilla ICL, text-only
demos), reported under `runs/<exp>/eval-<time>/`; the fused demo mode needs a trained checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmict.config import ConfigError, config_from_dict, load_config, save_config
from mmict.config.extra_tasks import task_configs
from mmict.eval.runner import run_tasks
from mmict.methods import METHODS
from mmict.methods.base import check_checkpoint_backbone
from mmict.toy.prepare import prepare as prepare_toy


def evaluate_checkpoint(ckpt: str | Path, overrides: list[str]) -> list[dict]:
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (runs keep theirs in runs/<exp>/<time>/checkpoints)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = config_from_dict(state["hyper_parameters"]["config"], overrides)
    prepare_toy(cfg)  # a toy run's world and backbone, rebuilt from their recipes if this machine lacks them
    module = METHODS[cfg.method.name](cfg)
    check_checkpoint_backbone(state, module.backbone)
    module.load_state_dict(state["state_dict"])
    # The module's own checkpoint hook, as Lightning calls it when it restores: what a method keeps beside its
    # weights (AIM: the shots it was trained on, for the table's header; MMICT: a warning when the checkpoint's
    # query-text setting differs from the config's).
    module.on_load_checkpoint(state)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    rows, report = evaluate_tasks(module, cfg, run_dir / "eval", checkpoint=str(ckpt))
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
    prepare_toy(cfg)
    module = METHODS[cfg.method.name](cfg)  # loads the backbone first: missing weights fail before any folder
    run_dir = make_run_dir(cfg.run_root, cfg.name)
    save_config(cfg, run_dir / "config.yaml")
    rows, report = evaluate_tasks(module, cfg, run_dir / "eval")
    print(f"{report}\n\nreport: {run_dir / 'eval'}")
    return rows


def evaluate_tasks(module, cfg, eval_dir: Path, checkpoint: str | None = None) -> tuple[list[dict], str]:
    """eval.task and each of eval.extra_tasks (`run_tasks`); eval.task's rows and the reports of all."""
    outcomes = run_tasks(module, cfg, task_configs(cfg), eval_dir, checkpoint=checkpoint)
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
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.seeds=[0,1,2]")
    # intermixed: `make eval CKPT=... SHOTS=0,4 ARGS="eval.seeds=[0]"` puts the overrides after --shots, which
    # plain parse_args refuses ("unrecognized arguments") once the positionals were filled before --shots.
    args = parser.parse_intermixed_args(argv)
    overrides = args.overrides + shots_override(args.shots)
    if args.checkpoint and "=" in args.checkpoint:  # `mmict eval eval.shots=[0]` with --exp: not a path
        overrides, args.checkpoint = [args.checkpoint, *overrides], None
    if args.checkpoint:
        evaluate_checkpoint(args.checkpoint, overrides)
    elif args.exp:
        evaluate_baselines(args.exp, overrides)
    else:
        parser.error("give a checkpoint, or --exp EXP to evaluate an experiment's training-free baselines")


if __name__ == "__main__":
    sys.exit(main())
