"""One process per run folder: `<run>/run.lock` is held while a run lives in its folder.

Two identical commands started together would otherwise both continue the same interrupted run (`resume=auto`),
each moving the other's `metrics.csv` aside and writing into one folder. The lock is an advisory `flock` on
`run.lock`, which also holds who took it (PID, host, start time, SLURM job): the kernel (or, on a shared file
system, its lock server) drops a `flock` when its process ends, even by `kill -9`, so a dead run's leftover file
never blocks a new one. Where the file system has no `flock`, the file's existence is the lock and a holder is
judged dead when it ran on this host and its PID is gone.

A requeued SLURM job runs again on another host while the lock server may still hold its earlier incarnation's
lock for a lease period: a lock held by an earlier incarnation of this very job (same job id, lower restart count)
is known dead, so the file is replaced (a new file, free of the old lock) instead of refusing.

Only the launching process of a run takes the lock (global rank 0): the other ranks of a job share its folder.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# flock unsupported (some Lustre / NFS mounts): the O_EXCL file alone is the lock
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
# A probe (`holder`) holds the flock for microseconds; a start that meets it retries for this long before refusing.
_RETRY_S = 1.0


class RunLockedError(RuntimeError):
    """Another live process runs in this run folder."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    slurm_job: str | None = None
    slurm_restart: int = 0

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), datetime.now().isoformat(timespec="seconds"), _slurm_job(),
                   int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"PID {self.pid} on host {self.host} (started {self.started}{job})"

    def known_dead(self) -> bool:
        """True only when this holder certainly no longer runs."""
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if self.slurm_job and self.slurm_job == _slurm_job() and self.slurm_restart < restart:
            return True  # an earlier incarnation of this job (requeued: SLURM ended it before starting this one)
        return self.host == socket.gethostname() and not _pid_alive(self.pid)

    def is_me(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()


def _slurm_job() -> str | None:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 when it set none): only rank 0 locks a run folder."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(name, "0") or "0"
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def _read(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(**{k: data[k] for k in ("pid", "host", "started") if k in data},
                      slurm_job=data.get("slurm_job"), slurm_restart=int(data.get("slurm_restart", 0)))
    except (OSError, ValueError, TypeError):
        return None  # gone, or being written this instant


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _NO_FLOCK:
            return None
        raise


class RunLock:
    """The held lock of one run folder; `release()` (also run at exit) frees it and removes the file."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if _held.get(self.path) is self:
            del _held[self.path]
        if self._fd is None and not self.path.exists():
            return
        # unlink first, then unlock: a process waiting on the old file finds it replaced and tries the new one
        try:
            holder = _read(self.path)
            if holder is None or holder.is_me():
                self.path.unlink(missing_ok=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)  # closing drops the flock
                self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_held: dict[Path, RunLock] = {}


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()


def _refusal(run_dir: Path, found: Holder | None) -> RunLockedError:
    known = found is not None and found.pid > 0
    who = found.describe() if known else "another process (its details are not written yet)"
    return RunLockedError(
        f"run folder {run_dir} is in use: {who} is running in it ({run_dir / LOCK_FILE}). This command would "
        "continue the same run and write into its files, so it stops here, before any work. Wait for that run to "
        f"end; or stop it (kill {found.pid if known else '<pid>'}) and run this command again to continue it; or "
        f"start a separate run with resume=never (or another run_dir). If no such process runs any more (a file "
        f"system without flock keeps a killed run's lock), delete {run_dir / LOCK_FILE}")


def holder(run_dir: str | Path) -> Holder | None:
    """The live process holding `run_dir`'s lock, if any (this process's own lock does not count)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        locked = _try_flock(fd)
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # a leftover of a dead run
        who = _read(path)
        if who is not None and (who.is_me() or who.known_dead()):
            return None
        if locked is None and who is None:
            return None  # no flock here and an empty file: nobody's
        return who or Holder(0, "?", "?")
    finally:
        os.close(fd)


def refuse_if_held(run_dir: str | Path) -> None:
    """Raise `RunLockedError` when a live process holds `run_dir` (checked by the launching rank only)."""
    if launch_rank() == 0:
        found = holder(run_dir)
        if found is not None:
            raise _refusal(Path(run_dir), found)


def acquire(run_dir: str | Path) -> RunLock:
    """Lock `run_dir` for this process, or raise `RunLockedError` naming the live holder. A lock this process
    already holds there (an earlier `train` call of this process that raised) is taken over."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    if path in _held:
        _held.pop(path).release()
    if launch_rank() != 0:
        return RunLock(path, None)
    deadline = time.monotonic() + _RETRY_S
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed in between
        locked = _try_flock(fd)
        if locked is None:  # no flock on this file system: the file is the lock, and we made it or not
            if created:
                _write(fd, Holder.me())
                os.close(fd)
                lock = _held[path] = RunLock(path, None)
                return lock
            os.close(fd)
            return _acquire_without_flock(run_dir, path)
        if locked and os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
            break  # ours, and still the file under that name (not one its holder just removed)
        who = _read(path)
        os.close(fd)
        if locked:
            continue  # the file was replaced while we locked it: try the new one
        if who is not None and who.known_dead():
            log.warning("run.lock of %s is held by %s, an earlier incarnation of this SLURM job: replacing it",
                        run_dir, who.describe())
            path.unlink(missing_ok=True)
            continue
        if time.monotonic() >= deadline:
            raise _refusal(run_dir, who)
        time.sleep(0.05)
    stale = _read(path)
    if stale is not None and not stale.is_me():
        log.info("run.lock of %s was left by %s, which has ended: taking it over", run_dir, stale.describe())
    _write(fd, Holder.me())
    lock = _held[path] = RunLock(path, fd)
    return lock


def _write(fd: int, who: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(who)).encode(), 0)
    os.fsync(fd)


def _acquire_without_flock(run_dir: Path, path: Path) -> RunLock:
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            who = _read(path)
            if who is not None and (who.is_me() or who.known_dead()):
                path.unlink(missing_ok=True)
                continue
            raise _refusal(run_dir, who) from None
        _write(fd, Holder.me())
        os.close(fd)
        lock = _held[path] = RunLock(path, None)
        return lock
    raise _refusal(run_dir, _read(path))


__all__ = ["LOCK_FILE", "Holder", "RunLock", "RunLockedError", "acquire", "holder", "launch_rank", "refuse_if_held"]
