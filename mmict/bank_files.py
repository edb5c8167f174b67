"""A demonstration bank folder's files (`mmict.bank`): whether the folder can be written, and the files in it that no
index entry refers to.

A key folder holds ``index.json``, the ``shard-*.safetensors`` it names and ``.lock``. Anything else of ours is
left over: a shard whose index was deleted (or whose writer died between writing it and merging the index), and
the temporary files of an interrupted write. Such a shard can never be looked up again (which demo each tensor
holds is recorded only in ``index.json``), so it is removed, with a warning, when the folder is opened; in a
folder that cannot be written it is only reported.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger("mmict.bank")

SHARDS = "shard-*.safetensors"
# An interrupted write's temporary files: ours (".<shard>.tmp<pid>", ".index.json.tmp<pid>"), safetensors' own
# (".tmpXXXXXX", next to the file it writes) and a writability probe's.
TEMPORARY = (".shard-*.tmp*", ".index.json.tmp*", ".tmp*", ".probe-*")


def unwritable(folder: Path) -> str | None:
    """None when files can be made in `folder` (created if missing), else why not (the OS's words)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        where = e.filename if e.filename and not Path(e.filename).name.startswith(".probe-") else None
        return f"{e.strerror or e}" + (f": {where}" if where else "")
    return None


def warn_not_cached(folder: Path, why: str) -> None:
    log.warning("demo bank: %s cannot be written (%s): demos are computed afresh and kept in memory for this run "
                "only, never cached. Fix: make the folder writable, or set eval.bank.dir to a writable folder "
                "(eval.bank.enabled=false turns the bank off)", folder, why)


def orphans(folder: Path, referenced: Collection[str]) -> list[Path]:
    """The shards in `folder` that no index entry names (`referenced`: the shard names the index holds) and the
    temporary files of interrupted writes."""
    found = {p for p in folder.glob(SHARDS) if p.name not in referenced}
    for pattern in TEMPORARY:
        found.update(folder.glob(pattern))
    return sorted(p for p in found if p.is_file())


def clean_orphans(folder: Path, referenced: Collection[str], *, removable: bool) -> list[Path]:
    """Remove (`removable`; the caller holds the folder's lock, under which every write happens) or report the
    orphaned files of `folder`, with one warning that names them; the files found."""
    files = orphans(folder, referenced) if folder.is_dir() else []
    if not files:
        return []
    size = sum(p.stat().st_size for p in files if p.exists()) / 2**20
    names = ", ".join(p.name for p in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    why = ("left by a deleted index.json or an interrupted write; which demo a stored tensor holds is recorded only in "
           "index.json, so they can never be looked up")
    if not removable:
        log.warning("demo bank %s: %d files no index entry refers to (%s; %.1f MB), %s. Not removed: the folder is "
                    "read-only; delete them by hand once it is writable", folder, len(files), names, size, why)
        return files
    failed = []
    for p in files:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            failed.append(p.name)
    log.warning("demo bank %s: removed %d files no index entry refers to (%s; %.1f MB), %s%s", folder,
                len(files) - len(failed), names, size, why, f"; could not remove {', '.join(failed)}" if failed else "")
    return files
