"""`python -m mmict.eval CKPT [key=value ...]`: evaluate a trained checkpoint.

The experiment config is read from the checkpoint (overrides apply on top), the frozen backbone is
reloaded from `backbone.name_or_path`, and the report goes next to the checkpoint's run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmict.config import config_from_dict
from mmict.eval.runner import run_eval
from mmict.modules import METHODS
from mmict.modules.base import check_checkpoint_backbone


def evaluate_checkpoint(ckpt: str | Path, overrides: list[str]) -> list[dict]:
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (runs keep theirs in runs/<exp>/<time>/checkpoints)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = config_from_dict(state["hyper_parameters"]["config"], overrides)
    module = METHODS[cfg.method.name](cfg)
    check_checkpoint_backbone(state, module.backbone)
    module.load_state_dict(state["state_dict"])
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    rows, report = run_eval(module, cfg, run_dir / "eval", checkpoint=str(ckpt))
    print(report)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmict eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.shots=[0,4,8]")
    args = parser.parse_args(argv)
    evaluate_checkpoint(args.checkpoint, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
