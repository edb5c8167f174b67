"""`mmict --help` and `mmict data convert --help` answer without importing torch, Lightning, transformers or W&B
(each `mmict` start used to spend many seconds importing them). What is checked is the set of modules a start
imports (`python -X importtime` names every one), never the wall time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "lightning", "transformers", "wandb", "webdataset"}


def imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m mmict.cli ARGS`; its result and the top-level packages it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmict.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, {name.split(".")[0] for name in names} - {"name"}  # "name": the header line's column title


@pytest.mark.parametrize("args, expect", [
    (["--help"], "commands:"),
    (["data", "convert", "--help"], "datasets and the layouts they read"),
])
def test_help_imports_nothing_heavy(args, expect):
    proc, packages = imported(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
    assert packages, "no -X importtime lines: the check would pass for the wrong reason"
    assert "mmict" in packages  # the command itself was imported (and measured)
    assert not HEAVY & packages, f"{args}: imports {sorted(HEAVY & packages)} to print help"


def test_the_lazy_packages_still_give_their_names():
    import callbacks
    import data_modules
    from callbacks.nan_guard import NonFiniteLossGuard
    from data_modules.skips import drain_skips

    assert data_modules.drain_skips is drain_skips and callbacks.NonFiniteLossGuard is NonFiniteLossGuard
    assert set(data_modules.__all__) <= set(dir(data_modules)) and set(callbacks.__all__) <= set(dir(callbacks))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data_modules.nope  # noqa: B018
