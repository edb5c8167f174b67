"""The `mmict` console script: `mmict train|eval|data ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from mmict.config import ConfigError

USAGE = """mmict <command> [args]

commands:
  train EXP [key=value ...]        train an experiment (experiments/EXP.yaml), then evaluate it
  eval CKPT [--shots 0,4,8] [k=v]  evaluate a checkpoint at the configured (or given) shots
  eval --exp EXP [--shots ...]     evaluate an experiment's training-free baselines (no checkpoint)
  data toy [--root data/toy]       write the toy world's webdataset shards
  pretrain-toy [EXP] [--force]     pretrain (and cache) the experiment's toy backbone; `train` does it
                                   the first time on its own
"""


def pretrain_toy_main(argv: list[str]) -> None:
    from mmict.backbones.toy import MARKER, ensure_toy_backbone
    from mmict.config import load_config

    parser = argparse.ArgumentParser(prog="mmict pretrain-toy")
    parser.add_argument("experiment", nargs="?", default="toy_aim")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. backbone.toy.pretrain_steps=500")
    parser.add_argument("--force", action="store_true", help="pretrain again even if an up-to-date backbone exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.experiment, args.overrides)
    if cfg.backbone.toy is None:
        raise ConfigError(f"experiment {args.experiment} has no backbone.toy section: its backbone is not a toy one")
    path = ensure_toy_backbone(cfg.backbone.name_or_path, cfg.backbone.toy, force=args.force)
    print(f"toy backbone at {path}; recipe, loss and binding probe: {path / MARKER}")


def data_main(argv: list[str]) -> None:
    from data_modules.toy_world import write_toy_world

    parser = argparse.ArgumentParser(prog="mmict data")
    parser.add_argument("dataset", choices=["toy"])
    parser.add_argument("--root", default="data/toy")
    parser.add_argument("--force", action="store_true", help="rewrite even if an up-to-date copy exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = write_toy_world(args.root, force=args.force)
    print(f"toy world at {args.root}: {manifest.get('counts')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from mmict.train import main as train_main

            train_main(rest)
        elif command == "eval":
            from mmict.eval.__main__ import main as eval_main

            eval_main(rest)
        elif command == "data":
            data_main(rest)
        elif command == "pretrain-toy":
            pretrain_toy_main(rest)
        else:
            print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
            return 2
    except (ConfigError, FileNotFoundError) as err:
        # User errors: one clear message, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
