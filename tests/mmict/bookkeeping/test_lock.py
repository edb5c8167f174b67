"""A run folder is locked while a run lives in it: a second command refuses, naming the live PID; a killed run's
lock never blocks the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmict.bookkeeping import lock
from mmict.bookkeeping.lock import LOCK_FILE, RunLockedError, acquire, holder

REPO = Path(__file__).resolve().parents[3]
# Holds the lock of argv[1] until killed; says so on stdout first.
HOLD = ("import sys, time; from mmict.bookkeeping.lock import acquire; acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture()
def held(tmp_path):
    """A live process holding `tmp_path`'s lock (killed with -9 at the end, as a crash would be)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_with_its_pid_and_a_killed_one_is_taken_over(tmp_path, held):
    found = holder(tmp_path)
    assert found is not None and found.pid == held.pid
    with pytest.raises(RunLockedError, match=rf"in use: PID {held.pid} on host .*kill {held.pid}.*resume=never"):
        acquire(tmp_path)
    os.kill(held.pid, signal.SIGKILL)  # kill -9: no chance to clean up; its run.lock stays behind
    held.wait()
    assert (tmp_path / LOCK_FILE).exists() and holder(tmp_path) is None
    taken = acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    taken.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_this_process_takes_its_own_lock_over_and_other_ranks_do_not_lock(tmp_path, monkeypatch):
    first = acquire(tmp_path)  # e.g. a train() call that raised and never released
    assert holder(tmp_path) is None  # its own lock does not count against this process
    second = acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()
    first.release()  # already released by the takeover: a no-op
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank of a run that rank 0 locked
    assert lock.launch_rank() == 1
    acquire(tmp_path).release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_an_earlier_incarnation_of_a_requeued_slurm_job_does_not_block_it(tmp_path, monkeypatch):
    # written by the job before its requeue, on another host; a lock server may still hold it for a while
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-a", "started": "earlier",
                                                  "slurm_job": "77", "slurm_restart": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert lock.Holder(1, "node-a", "earlier", "77", 0).known_dead()
    assert not lock.Holder(1, "node-a", "earlier", "78", 0).known_dead()  # another job on another host: unknown
    acquire(tmp_path).release()


def test_without_flock_the_file_is_the_lock_and_a_dead_local_pid_frees_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "_try_flock", lambda fd: None)  # e.g. a Lustre mount without flock
    taken = acquire(tmp_path)
    with monkeypatch.context() as m:  # another process of this host would see this PID alive
        m.setattr(lock.Holder, "is_me", lambda self: False)
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            acquire(tmp_path)
    taken.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                                  "started": "earlier"}))
    acquire(tmp_path).release()
