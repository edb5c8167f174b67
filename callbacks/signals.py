"""SIGTERM and SIGINT end training with a resumable checkpoint and a non-zero exit status, never a quiet 0.

Lightning's own SIGTERM handling (its signal connector) sets `trainer.received_sigterm`, and its loops then raise
`SIGTERMException` at the end of the step (or in the middle of a validation): a `SystemExit` without a code, so the
process would exit 0 and a scheduler or script would take the killed run for a finished one. `SignalCheckpoint`
saves `checkpoints/last.ckpt` when that happens (the run continues from it: `resume=auto`), says so, and
`StoppedBySignal` ends the run with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's
convention for a process ended by a signal. Under SLURM with auto-requeue, Lightning checkpoints and requeues on
the warning signal (SIGUSR1) first; the SIGTERM that follows ends the job the same way.

SIGINT (Ctrl+C) is turned into the same graceful stop during `fit`: the first one stops after the current step,
with a checkpoint; a second one stops at once (KeyboardInterrupt), without one. Outside `fit` (loading, evaluation)
both signals keep their default effect, which is a non-zero exit too.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

# The signal that stopped this process's training, for the exit status (set by `SignalCheckpoint`).
_received: dict[str, int] = {}


def exit_code(default: int = signal.SIGTERM) -> int:
    """128 + the signal that stopped training (SIGTERM when none was recorded): 143 SIGTERM, 130 SIGINT."""
    return 128 + int(_received.get("signum", default))


class StoppedBySignal(SystemExit):
    """Training stopped on a signal: exits with 128 + its number, after `SignalCheckpoint` saved the run."""

    def __init__(self, signum: int, checkpoint: Path | None = None) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.checkpoint = checkpoint


class SignalCheckpoint(L.Callback):
    """On SIGTERM / SIGINT during `fit`: save `<dirpath>/last.ckpt` (resumable), say what was saved and how to
    continue, and make the run end with a non-zero status (`StoppedBySignal`, `exit_code`).

    ``resume_hint``: how to continue the run, appended to the message (e.g. "run the same command again").
    """

    def __init__(self, dirpath: str | Path, resume_hint: str = "") -> None:
        self.dirpath = Path(dirpath)
        self.resume_hint = resume_hint
        self.signum: int | None = None
        self.saved: Path | None = None
        self._previous_sigint: Any = None

    # ---- SIGINT: the same graceful stop as SIGTERM ------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signum, self.saved = None, None
        _received.pop("signum", None)
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now, no checkpoint
        self.signum = _received["signum"] = signal.SIGINT
        print("\nSIGINT: stopping after this step with a checkpoint (Ctrl+C again stops at once, without one)",
              file=sys.stderr, flush=True)
        # Lightning's SIGTERM handler (registered by fit) sets `trainer.received_sigterm`: its loops then stop at the
        # end of the step on every rank (it broadcasts the flag under DDP) and raise SIGTERMException.
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)

    # ---- the stop -------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal at the last step: Lightning's loops finish normally (the run is trained) and the flag would be
        # forgotten, so the evaluation would run on as if nothing had been asked. Stop here like at any other step.
        if trainer.received_sigterm or self.signum is not None:
            raise StoppedBySignal(self.signum or signal.SIGTERM)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException | StoppedBySignal):
            return  # a crash (the last periodic checkpoint stands) or a second Ctrl+C
        signum = self.signum or getattr(exception, "signum", None) or signal.SIGTERM
        self.signum = _received["signum"] = signum
        if trainer.state.fn != TrainerFn.FITTING:
            return  # a validation outside fit: nothing trained to save (the exit status still says it stopped)
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part (a sharded strategy gathers); rank 0 writes
        self.saved = path
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            message = (f"{name} at step {trainer.global_step}: saved the resumable checkpoint {path}; "
                       f"exiting with status {128 + signum}. {self.resume_hint}").strip()
            log.warning(message)  # stderr, also where logging is not set up (Python's last-resort handler)


__all__ = ["SignalCheckpoint", "StoppedBySignal", "exit_code"]
