"""The run record's provenance: library versions, the code's git commit and the dependency lock."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def versions() -> dict[str, Any]:
    """Library versions, the code's git commit and the dependency lock (file, sha256, and whether this
    environment is exactly the locked one), so a number can be traced to what produced it."""
    import lightning
    import transformers

    from mmict.dependency_lock import record

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "lightning": lightning.__version__,
                           "lock": record()}
    try:
        repo = Path(__file__).resolve().parents[2]
        out["mmict_commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], check=True,
                                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["mmict_commit"] = "unknown (not a git checkout)"
    return out
