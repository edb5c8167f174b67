"""The `mmict` console script: `mmict train|eval|data ...`."""

from __future__ import annotations

import argparse
import logging
import sys

# Nothing heavy is imported here: `mmict --help` and `mmict data convert --help` answer without torch, Lightning or
# transformers (tests/test_startup.py); each command imports its own module when it runs.

USAGE = """mmict <command> [args]

commands:
  train EXP [key=value ...]        train an experiment (experiments/EXP.yaml), then evaluate it
  eval CKPT [--shots 0,4,8] [k=v]  evaluate a checkpoint at the configured (or given) shots
  eval --exp EXP [--shots ...]     evaluate an experiment's training-free baselines (no checkpoint)
  data toy [--root data/toy]       write the toy world's webdataset shards
  data convert DATASET --in SRC --out shards/DATASET/SPLIT-%06d.tar [--split S]
                                   convert a public dataset (MMC4, OBELICS, OK-VQA, ...) into shards
  pretrain-toy [EXP] [--force]     pretrain (and cache) the experiment's toy backbone; `train` does it
                                   the first time on its own
  sweep EXP 'key=[a,b]' ... [--dry-run] [--submit]
                                   write a SLURM job array (one task per grid point, srun python -m
                                   mmict.train inside); --dry-run prints the sbatch script
  doctor EXP [key=value ...]       check an experiment on this machine before training: data and resource
                                   paths, the adapter against the HF model, context per shot count,
                                   memory, a few queries end to end; a verdict per item
  compare RUN_DIR... [--format md|csv|json]
                                   compare runs (or a sweep folder) offline: method, backbone, shots,
                                   losses, eval score per shot count
"""


def pretrain_toy_main(argv: list[str]) -> None:
    from mmict.config import ConfigError, load_config
    from mmict.toy.backbone import MARKER, ensure_toy_backbone

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
    if argv and argv[0] == "convert":
        convert_main(argv[1:])
        return
    from mmict.toy.world import write_toy_world

    parser = argparse.ArgumentParser(prog="mmict data", epilog="mmict data convert --help: convert a public dataset")
    parser.add_argument("dataset", choices=["toy"])
    parser.add_argument("--root", default="data/toy")
    parser.add_argument("--force", action="store_true", help="rewrite even if an up-to-date copy exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = write_toy_world(args.root, force=args.force)
    print(f"toy world at {args.root}: {manifest.get('counts')}")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def convert_main(argv: list[str]) -> None:
    from pathlib import Path

    from data_modules.converters import CONVERTERS, ConvertOptions, convert

    layouts = "\n\n".join(f"{name} ({c.kind}{', --split ' + '|'.join(c.splits) if c.splits else ''}):\n{c.layout}"
                           for name, c in sorted(CONVERTERS.items()))
    parser = argparse.ArgumentParser(
        prog="mmict data convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a public dataset, in its own file layout, into webdataset shards.",
        epilog=f"datasets and the layouts they read:\n\n{layouts}")
    parser.add_argument("dataset", help=f"one of: {', '.join(sorted(CONVERTERS))}")
    parser.add_argument("--in", dest="src", required=True, type=Path, help="the dataset's folder (or file)")
    parser.add_argument("--out", required=True, help="shard pattern, e.g. shards/okvqa/test-%%06d.tar")
    parser.add_argument("--split", help="which of the dataset's own splits to read")
    parser.add_argument("--images", type=Path, help="image/video folder, when not where the layout puts it")
    parser.add_argument("--frames", type=int, default=8, help="video: frames sampled uniformly per clip")
    parser.add_argument("--url-map", type=Path, help="OBELICS: image url -> local file (tsv, csv, jsonl, a "
                        "url,path parquet, or img2dataset's output folder or parquet)")
    parser.add_argument("--set", dest="extra", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="a converter-specific option (see the layouts below)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--limit", type=int, help="stop after this many samples (a quick look)")
    parser.add_argument("--force", action="store_true", help="replace existing shards at --out (said, not silent)")
    args = parser.parse_args(argv)
    options = ConvertOptions(src=args.src, split=args.split, images=args.images, frames=args.frames,
                             url_map=args.url_map, limit=args.limit, extra=dict(args.extra))
    summary = convert(args.dataset, options, args.out, shard_size=args.shard_size, force=args.force)
    print(summary.text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from callbacks.nan_guard import TrainingStoppedError
            from mmict.train import main as train_main

            try:
                train_main(rest)
            except TrainingStoppedError as err:  # a guard stopped the run; the message says where and what to do
                print(f"error: {err}", file=sys.stderr)
                return 1
        elif command == "eval":
            from mmict.eval.__main__ import main as eval_main

            eval_main(rest)
        elif command == "data":
            data_main(rest)
        elif command == "pretrain-toy":
            pretrain_toy_main(rest)
        elif command == "sweep":
            from mmict.bookkeeping.slurm import main as sweep_main

            return sweep_main(rest)
        elif command == "doctor":
            from mmict.doctor import main as doctor_main

            return doctor_main(rest)
        elif command == "compare":
            from mmict.bookkeeping.compare import main as compare_main

            return compare_main(rest)
        else:
            print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
            return 2
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        # User errors: one clear message, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that end a command with one line and no traceback. The project's own are looked up only in the
    modules already imported (an error whose module was never imported cannot have been raised), so that this
    module imports neither the config package nor the converters up front."""
    errors: list[type[BaseException]] = [FileNotFoundError, FileExistsError]
    for module, name in (("mmict.config.errors", "ConfigError"), ("data_modules.converters.common", "ConvertError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
