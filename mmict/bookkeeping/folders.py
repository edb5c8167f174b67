"""Run folders and files that are never overwritten silently."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)


def make_run_dir(run_root: str | Path, name: str, pinned: str | Path | None = None) -> Path:
    """`<run_root>/<name>/<YYYYmmdd-HHMMSS>/`, with a numeric suffix if that folder already exists; or `pinned`
    (config `run_dir`, a SLURM job's folder), created if needed and reused as is (a requeued job resumes there)."""
    if pinned:
        path = Path(pinned)
        if path.is_dir() and any(path.iterdir()):
            log.info("reusing run folder %s", path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path(run_root) / name / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{n}")
        n += 1
    path.mkdir(parents=True)
    return path


def unique_path(path: str | Path) -> Path:
    """`path` if free, else `stem-1.ext`, `stem-2.ext`, ... (and say so): results are never overwritten."""
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    if candidate != path:
        log.warning("%s exists; writing %s instead (nothing is overwritten)", path, candidate)
    return candidate


def write_text_unique(path: str | Path, text: str) -> Path:
    target = unique_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target
