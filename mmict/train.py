"""`python -m mmict.train EXP [key=value ...]` (also `mmict train`, `make train EXP=...`).

Loads the experiment, prepares its data (the toy world is written once), trains the method's
trainable parts with Lightning, then evaluates on the downstream split and prints the table.
Everything a run writes goes to `runs/<exp>/<timestamp>/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from callbacks import DemoSampler, RNGState, RunRecord, SignalCheckpoint, SkippedSamplesReport
from callbacks.divergence_guard import DivergenceGuard
from callbacks.nan_guard import NonFiniteLossGuard
from callbacks.rank_trace import RankTrace
from callbacks.rank_trace import enabled as rank_trace_enabled
from callbacks.signals import StoppedBySignal, exit_code
from data_modules.augment import transform_size
from data_modules.shots import ShotPolicy, shots_label
from data_modules.streaming_module import StreamingDataModule
from data_modules.task_episodes import TaskEpisodeDataModule
from data_modules.web_corpus import WebCorpusDataModule
from mmict.bookkeeping.folders import make_run_dir
from mmict.bookkeeping.lock import RunLockedError, launch_rank
from mmict.bookkeeping.lock import acquire as lock_run_dir
from mmict.bookkeeping.record import versions
from mmict.bookkeeping.resume import (
    FINISHED,
    find_resume,
    missed_validation,
    rank_zero_run,
    redo_validation,
    share_with_other_ranks,
)
from mmict.bookkeeping.slurm import default_run_dir, slurm_job_tag
from mmict.companions import companion_configs, run_companions, wandb_group
from mmict.config import ConfigError, load_config, save_config
from mmict.config.extra_tasks import task_configs
from mmict.eval.ranks import Ranks
from mmict.eval.runner import run_tasks
from mmict.eval.tasks import get_task
from mmict.methods import METHODS
from mmict.methods.aim.shots import report as write_trained_shots
from mmict.plots import keep_metrics_of_interrupted_run, plot_losses, read_metric
from mmict.preflight import PreflightError, preflight, require
from mmict.toy.prepare import prepare as prepare_toy
from mmict.training.fsdp import is_sharded_checkpoint
from mmict.training.precision import PrecisionDecision, apply_precision_policy, detect_hardware, resolve_precision

log = logging.getLogger("mmict")

# The frozen backbone is kept in eval mode on purpose (no dropout in a frozen model); Lightning warns
# about any module in eval mode at fit start, which here is expected and only noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


def build_datamodule(cfg: DictConfig, image_transform: Any, tokenizer: Any = None) -> StreamingDataModule:
    """Training episodes: cut from the web corpus (`data.task` null, AIM), or from a downstream task's train
    split (`data.task`, MMICT). `tokenizer` (the backbone's) counts the web texts' tokens for `data.max_text_tokens`
    (None: the texts are cut by characters only)."""
    d = cfg.data
    common = dict(image_transform=image_transform, batch_size=d.batch_size, num_workers=d.num_workers,
                  shot_policy=shot_policy(cfg), epoch_size=d.epoch_size, shuffle_buffer=d.shuffle_buffer,
                  seed=cfg.seed, val_episodes=d.val_episodes)
    if d.task is None:
        return WebCorpusDataModule(d.root, corpus=d.corpus, min_similarity=d.min_similarity,
                                   min_image_size=d.min_image_size, max_text_tokens=d.max_text_tokens,
                                   tokenizer=tokenizer, **common)
    augment_size = transform_size(image_transform) if d.augment == "mmict_reference" and image_transform else None
    return TaskEpisodeDataModule(d.root, task=get_task(d.task, d.prompt_format), val_split=d.val_split,
                                 augment_size=augment_size, **common)


def shot_policy(cfg: DictConfig) -> ShotPolicy:
    """The run's demos-per-episode policy (`data.shots`, `data.shot_schedule` or the min/max range)."""
    return ShotPolicy.from_config(cfg.data, seed=cfg.seed)


def find_shards_or_fail(cfg: DictConfig) -> None:
    """The training shards must exist; the error names the command that builds them."""
    build_datamodule(cfg, image_transform=None)._shards("train", required=True)


def train_shots(cfg: DictConfig) -> str:
    """The training shot setting in one word: `8`, `1-8` or `schedule`."""
    return shots_label(cfg.data)


def wandb_settings(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """WandbLogger arguments: the resolved config plus what a dashboard filters on (method, backbone, shots,
    git commit, effective precision, SLURM job); a pinned run folder (sweep task, SLURM job) keeps one W&B
    run id, so a requeued job resumes its W&B run instead of starting another."""
    runtime_path = run_dir / "runtime.json"
    runtime = json.loads(runtime_path.read_text()) if runtime_path.is_file() else {}
    run_versions = runtime.get("versions") or versions()
    meta = {
        "method": cfg.method.name, "backbone": cfg.backbone.name_or_path, "backbone_family": cfg.backbone.family,
        "train_shots": train_shots(cfg), "eval_shots": list(cfg.eval.shots), "eval_task": cfg.eval.task,
        "git_commit": run_versions.get("mmict_commit"),
        # the library versions and the dependency lock's sha256 (and whether the environment matched it)
        "versions": run_versions,
        "precision": (runtime.get("precision") or {}).get("precision", cfg.trainer.precision),
        "precision_requested": (runtime.get("precision") or {}).get("requested_precision", cfg.trainer.precision),
        "slurm_job": runtime.get("slurm_job"), "run_dir": str(run_dir),
    }
    settings: dict[str, Any] = dict(
        project=cfg.logger.project, entity=cfg.logger.entity, name=f"{cfg.name}/{run_dir.name}",
        save_dir=str(run_dir), offline=cfg.logger.offline, tags=list(cfg.logger.tags),
        # logger.group; a run with companions, when none is set: "<name>-<time>", which its companions share
        group=wandb_group(cfg, run_dir), config={**OmegaConf.to_container(cfg, resolve=True), "run": meta},
    )
    # One W&B run per run folder: a resumed run (same folder: `resume`, a requeued SLURM task, a pinned
    # run_dir) continues its W&B run instead of starting another.
    settings["id"] = wandb_id(run_dir)
    settings["resume"] = "allow"
    return settings


def wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.absolute()).encode()).hexdigest()[:16]


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if cfg.logger.wandb and os.environ.get("WANDB_MODE") == "disabled":
        log.info("WANDB_MODE=disabled: not logging to W&B (metrics still go to %s/logs/metrics.csv)", run_dir)
    elif cfg.logger.wandb:
        loggers.append(WandbLogger(**wandb_settings(cfg, run_dir)))
    return loggers


def finish_wandb(loggers: list[Logger]) -> None:
    """End this run's W&B run (a no-op when there is none, or it has ended). Lightning's WandbLogger leaves it open,
    and the next WandbLogger of this process (a companion's) would log into it: "a wandb run already in progress
    ... will reuse this run"."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # a dummy on ranks other than 0: nothing to finish there

def build_strategy(cfg: DictConfig, module: L.LightningModule | None = None, precision: str | None = None) -> Any:
    """`trainer.strategy`: auto / ddp as Lightning names them; fsdp built from the module's backbone adapter."""
    tr = cfg.trainer
    if tr.strategy != "fsdp":
        return tr.strategy
    if detect_hardware(tr.accelerator).kind != "cuda":
        raise ConfigError("trainer.strategy=fsdp shards the model over CUDA GPUs, and none is available here "
                          f"(trainer.accelerator={tr.accelerator}). Use trainer.strategy=auto (or ddp) on this machine")
    if module is None:
        raise ValueError("trainer.strategy=fsdp is built from the method's module: build_trainer(cfg, run_dir, module)")
    from mmict.training.fsdp import build_fsdp_strategy

    return build_fsdp_strategy(module, tr.fsdp, precision or tr.precision)


def write_runtime(run_dir: Path, precision: PrecisionDecision) -> dict[str, Any]:
    """runtime.json: what this run actually ran with (effective vs requested precision, versions, SLURM job)."""
    runtime = {"precision": precision.as_dict(), "versions": versions(), "slurm_job": slurm_job_tag()}
    (run_dir / "runtime.json").write_text(json.dumps(runtime, indent=2))
    return runtime


def build_trainer(cfg: DictConfig, run_dir: Path,
                  module: L.LightningModule | None = None) -> tuple[L.Trainer, SkippedSamplesReport]:
    """The Trainer; `module` is needed for trainer.strategy=fsdp (its units come from the backbone adapter)."""
    tr = cfg.trainer
    skipped = SkippedSamplesReport(run_dir / "skipped_samples.json")
    # `auto` is resolved by train() (apply_precision_policy); a direct caller gets the same rule here.
    precision = tr.precision if tr.precision != "auto" else resolve_precision(
        "auto", "float32", detect_hardware(tr.accelerator)).precision
    callbacks: list[L.Callback] = [
        NonFiniteLossGuard(),  # NaN/inf loss: stop before the optimizer step; the last checkpoint stays good
        # the loss far above its start, or the weights blown up, with no NaN (callbacks/divergence_guard.py)
        *([DivergenceGuard(**tr.divergence_guard)] if tr.divergence_guard is not None else []),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=tr.checkpoint_every_n_steps, save_top_k=-1, save_last=True),
        LearningRateMonitor(logging_interval="step"),
        skipped,
        DemoSampler(shot_policy(cfg)),
        RNGState(),  # resumed runs draw the same dropout masks as the uninterrupted run would have
        RunRecord(str(run_dir), wandb_id(run_dir)),
        # SIGTERM / SIGINT: checkpoints/last.ckpt and exit status 143 / 130, not a quiet 0 (callbacks/signals.py)
        SignalCheckpoint(run_dir / "checkpoints", resume_hint="Run the same command again to continue the run "
                         f"(resume=auto), or pass resume={run_dir}"),
    ]
    if tr.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=5))
    if rank_trace_enabled():  # MMICT_RANK_TRACE: what each rank trained on, for checking multi-process runs
        callbacks.append(RankTrace())
    trainer = L.Trainer(
        default_root_dir=run_dir, accelerator=tr.accelerator, devices=tr.devices, precision=precision,
        strategy=build_strategy(cfg, module, precision), num_nodes=tr.num_nodes, max_steps=tr.max_steps, max_epochs=-1,
        # Streaming data has no length: validate every `val_check_interval` steps across epochs.
        val_check_interval=tr.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=tr.limit_val_batches, log_every_n_steps=tr.log_every_n_steps,
        gradient_clip_val=tr.gradient_clip_val, enable_progress_bar=tr.progress_bar,
        logger=build_loggers(cfg, run_dir), callbacks=callbacks, num_sanity_val_steps=0,
    )
    return trainer, skipped


def loss_summary(metrics_csv: Path, window: int = 5) -> dict[str, float] | None:
    """Mean train loss over the first and last `window` logged points: did it learn?"""
    points = read_metric(metrics_csv, "train/loss")
    if len(points) < 2:
        return None
    w = max(1, min(window, len(points) // 2))
    first = sum(v for _, v in points[:w]) / w
    last = sum(v for _, v in points[-w:]) / w
    return {"first": first, "last": last, "steps_first": points[w - 1][0], "steps_last": points[-w][0]}


def fsdp_trained_module(cfg: DictConfig, ckpt: Path) -> Any:
    """A whole module (backbone reloaded) with the weights an FSDP run saved in `ckpt`; None, with a warning saying
    how to evaluate them, when they were saved sharded (a folder of shards)."""
    if is_sharded_checkpoint(ckpt):
        log.warning("trainer.strategy=fsdp saved the trained weights sharded (%s), so evaluation is not run here: "
                    "consolidate them (`python -m lightning.pytorch.utilities.consolidate_checkpoint %s`) and run "
                    "`mmict eval` on the result (trainer.devices=N evaluates on N GPUs)", ckpt, ckpt)
        return None
    module = METHODS[cfg.method.name](cfg)
    module.restore(ckpt)
    return module


def train(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    # Effective precision and backbone dtype for this hardware, said out loud (before the backbone loads).
    precision = apply_precision_policy(cfg)
    prepare_toy(cfg)  # the toy world's shards and toy backbone, when the experiment has them
    # Everything the run will need (data, evaluation splits, NLTK data, CLIP weights, tokenizers, weights, the GPU)
    # is checked here, before a run folder exists: a refused start leaves nothing behind, and nothing is found
    # missing after training (mmict/preflight.py).
    checks = preflight(cfg, training_shards=lambda: find_shards_or_fail(cfg))
    for check in checks:
        log.info("check %s", check.line())
    require(checks)
    companions = companion_configs(cfg)  # bad names fail here, not after training
    extra_tasks = task_configs(cfg) if cfg.eval.enabled else []  # likewise further tasks' overrides
    module = METHODS[cfg.method.name](cfg)
    pinned = default_run_dir(cfg)
    joined = rank_zero_run()  # a rank that Lightning started by running this command again: rank 0's run and resume
    resume = joined[1] if joined is not None else find_resume(cfg, pinned)
    if joined is not None:
        run_dir = joined[0]
        run_lock = lock_run_dir(run_dir)  # takes nothing off rank 0 (rank 0 holds the folder)
    elif resume is not None:
        run_dir = resume.run_dir
        run_lock = lock_run_dir(run_dir)  # before anything is touched there: a second command refuses (lock.py)
        if resume.trained:
            log.warning("run %s trained to its last step (%s) but its evaluation did not finish: evaluating it now, "
                        "not training it again (resume=never starts a new run instead)", run_dir,
                        resume.checkpoint.name)
        else:
            log.warning("continuing the interrupted run %s from %s (resume=never starts a new run instead)", run_dir,
                        resume.checkpoint.name)
        # rank 0 alone moves it (SLURM starts every rank at once: two renames of one file, and one fails)
        kept = keep_metrics_of_interrupted_run(run_dir / "logs") if launch_rank() == 0 else None
        if kept is not None:
            log.info("the interrupted run's metrics stay in %s", kept)
    else:
        run_dir = make_run_dir(cfg.run_root, cfg.name, pinned)
        run_lock = lock_run_dir(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    share_with_other_ranks(run_dir, resume)
    if launch_rank() == 0:  # the run folder's files are rank 0's: the other ranks share the folder
        write_runtime(run_dir, precision)
    log.info("run folder: %s", run_dir)

    datamodule = build_datamodule(cfg, module.backbone.image_transform, module.backbone.tokenizer)
    trainer, skipped = build_trainer(cfg, run_dir, module=module)
    tr = cfg.trainer
    # Validation before any step is the reference the trained parts are judged against (a resumed run has it).
    has_val = datamodule.has_val()
    before_file = run_dir / "val_before.json"
    if has_val and resume is not None and before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = trainer.validate(module, datamodule=datamodule, verbose=False) if has_val else []
        if trainer.is_global_zero:
            before_file.write_text(json.dumps(before))
    missed = missed_validation(resume, tr.val_check_interval) if resume is not None and any(before) else None
    if missed is not None:  # Lightning would go on as if the validation the interruption cut short had run
        log.warning("the interrupted run's validation at step %d never finished: running it now", missed)
        redo_validation(trainer, module, datamodule, resume, missed)
    if resume is not None and resume.trained:  # evaluate the trained weights as they are (Lightning's fit would
        # restore them too, but also the loops, only to stop at once)
        module.restore(resume.checkpoint)
    else:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None)
        except SIGTERMException as stop:  # a SystemExit without a code, i.e. status 0: say it was stopped instead
            raise StoppedBySignal(exit_code() - 128) from stop
    if trainer.is_global_zero and getattr(module, "trained_shots", None) is not None:
        write_trained_shots(module.trained_shots(), run_dir, [])  # AIM: demos per training episode, in the run folder
    # fit validates every `val_check_interval` steps; when that includes the last step, its result is
    # the "after" number and validating again would only repeat the work.
    if not has_val or not any(before):  # no val split, or one too small for a single episode (warned)
        after = []
    elif tr.max_steps % tr.val_check_interval == 0 and "val/loss" in trainer.callback_metrics:
        after = [{"val/loss": float(trainer.callback_metrics["val/loss"])}]
    else:
        after = trainer.validate(module, datamodule=datamodule, verbose=False)

    summary: dict[str, Any] = {"run_dir": str(run_dir), "skipped": dict(skipped.counts)}
    if precision.changed:
        summary["precision"] = precision.messages
    if before and after and "val/loss" in before[0] and "val/loss" in after[0]:
        summary["val_loss"] = {"before": before[0]["val/loss"], "after": after[0]["val/loss"]}
    metrics_csv = run_dir / "logs" / "metrics.csv"
    if metrics_csv.exists():
        summary["loss"] = loss_summary(metrics_csv)
        if trainer.is_global_zero:
            plot_losses(metrics_csv, run_dir / "loss.png")
    if cfg.eval.enabled and cfg.trainer.strategy == "fsdp":
        # FSDP wrapped the module's parts in place: evaluate a fresh, whole module with the trained weights (every rank
        # holds one and evaluates its share of the batches), or say how to when they were saved sharded
        module = fsdp_trained_module(cfg, run_dir / "checkpoints" / "last.ckpt")
    if cfg.eval.enabled and module is not None:
        # Every process the Trainer started evaluates its share of the batches (mmict.eval.ranks); rank 0 writes. The
        # Trainer's teardown put the module back on the CPU: evaluation runs on this rank's device.
        ranks = Ranks.current(trainer.strategy.root_device)
        module.to(ranks.device)
        wandb_run = next((lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        # eval.task, then the same weights on each further task (eval/<task>/)
        outcomes = run_tasks(module, cfg, extra_tasks, run_dir / "eval",
                             checkpoint=str(run_dir / "checkpoints" / "last.ckpt"), wandb_run=wandb_run, ranks=ranks)
        # This run's W&B run ends before any companion starts: each companion is a W&B run of its own, in this run's
        # group, and the joint table goes to one more run of the group (mmict/companions.py).
        finish_wandb(trainer.loggers)
        if companions:
            outcomes, summary["companions"] = run_companions(
                cfg, companions, outcomes, run_dir / "eval", train,
                wandb_group=wandb_group(cfg, run_dir) if wandb_run is not None else None)
        outcome = outcomes[cfg.eval.task]
        summary["eval"], summary["eval_report"] = outcome.rows, outcome.report
        # what each task's evaluation lost (skipped queries and pool examples by reason; empty when nothing was)
        summary["eval_skipped"] = {task: o.skipped for task, o in outcomes.items()}
        if extra_tasks:
            summary["eval_tasks"] = {task: o.rows for task, o in outcomes.items() if task != cfg.eval.task}
            summary["eval_task_reports"] = {task: o.report for task, o in outcomes.items() if task != cfg.eval.task}
    finish_wandb(trainer.loggers)
    if trainer.is_global_zero:  # rank 0's run folder: the other ranks neither mark it finished nor report it
        # The mark of a finished run: `resume=auto` never continues it.
        (run_dir / FINISHED).write_text(json.dumps(summary, indent=2, default=str))
    run_lock.release()
    if trainer.is_global_zero:
        print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    run_dir = Path(summary["run_dir"])
    print(f"\n=== run folder: {run_dir}")
    val = summary.get("val_loss")
    if val:
        print(f"val loss: {val['before']:.3f} before training -> {val['after']:.3f} after")
    loss = summary.get("loss")
    if loss:
        print(f"train loss: {loss['first']:.3f} (first logged steps) -> {loss['last']:.3f} (last logged steps); "
              f"curve: {run_dir / 'loss.png'}")
    for message in summary.get("precision") or []:
        print(f"NOTE precision: {message}")
    if summary.get("companions"):
        print("\n" + "\n".join(f"companion {name}: {path}" for name, path in summary["companions"].items()))
    if summary.get("eval"):
        files = "methods.{json,md}, methods_vs_shots.png" if summary.get("companions") else \
            "results.{json,md}, score_vs_shots.png"
        print(f"\n{summary['eval_report']}\n\nreport: {run_dir / 'eval'}/{files}")
    for task, report in (summary.get("eval_task_reports") or {}).items():
        where = run_dir / "eval" / ("methods.md" if summary.get("companions") else f"{task}/results.md")
        print(f"\n--- {task} ---\n{report}\n\nreport: {where}")
    print(f"checkpoints: {run_dir / 'checkpoints'}   logs: {run_dir / 'logs' / 'metrics.csv'} (+ wandb/ when enabled)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmict train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", default="toy_aim", help="name under experiments/ or a yaml path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.max_steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(load_config(args.experiment, args.overrides))
    except PreflightError as err:  # a message with the fixes, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunLockedError as err:  # the same run is live in another process: its PID, and what to do
        print(f"error: {err}", file=sys.stderr)
        sys.exit(75)  # EX_TEMPFAIL: try again once that run has ended
    except SIGTERMException:  # stopped outside fit (a validation): Lightning's stop would exit 0
        sys.exit(exit_code())


if __name__ == "__main__":
    sys.exit(main())
