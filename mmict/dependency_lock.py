"""The dependency lock (`requirements/lock.txt`): every package version a default install uses.

`make install` (and so `make train`, `make test` and CI) installs with `pip install -c requirements/lock.txt`,
so a fresh clone gets exactly the versions the suite was last green with, whatever PyPI released since.
`pyproject.toml` keeps compatible ranges for people who install mmict into an environment of their own.
`make upgrade-lock` re-resolves to the newest versions in a scratch venv, runs lint and the suite there, and
rewrites the lock (printing what changed) only when both pass.

The lock is a pip constraints file: one `name==version` a line, with a header naming the Python and platform
it was resolved on. This module writes it (`write`), compares two (`diff`), and tells a run record whether the
running environment is the locked one (`record`: the lock's sha256 and every installed package that differs).

    python -m mmict.dependency_lock write --python .venv-upgrade/bin/python [--out requirements/lock.txt]
    python -m mmict.dependency_lock diff OLD NEW
    python -m mmict.dependency_lock check          # this environment against the lock; exit 1 on drift
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK_PATH = REPO / "requirements" / "lock.txt"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised name (`Open_Clip-Torch` -> `open-clip-torch`): how pip compares package names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines; comments and blank lines are skipped."""
    pins: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"lock line {n} is not `name==version`: {line!r}. Regenerate the lock with "
                             "`make upgrade-lock` instead of editing it by hand")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per package that was added, removed or changed version, sorted by name."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        lines.append(f"+ {name} {b}" if a is None else f"- {name} {a}" if b is None else f"~ {name} {a} -> {b}")
    return lines


def installed() -> dict[str, str]:
    """{canonical name: version} of the distributions importable in this interpreter."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonical(name), dist.version)
    return out


def drift(lock: dict[str, str], have: dict[str, str]) -> dict[str, str]:
    """Installed packages whose version differs from the lock. A locked package that is not installed is not
    drift (constraints pin only what gets installed: nvidia-* wheels are absent on a Mac), nor is a package
    installed beside the lock."""
    return {name: f"installed {have[name]}, locked {version}"
            for name, version in sorted(lock.items()) if name in have and have[name] != version}


def lock_path() -> Path:
    """The lock in force: $MMICT_LOCK when set (`make upgrade-lock` tests a candidate lock that way), else
    requirements/lock.txt of this checkout."""
    return Path(os.environ.get("MMICT_LOCK") or LOCK_PATH)


def record(path: Path | None = None) -> dict[str, object]:
    """What a run record (runtime.json, results.json, W&B config) says of the lock: its file and sha256, and
    whether this environment is the locked one (`matches`; else `drift` names every differing package)."""
    path = path or lock_path()
    if not path.is_file():
        return {"file": None, "sha256": None, "matches": False,
                "note": f"no lock at {path} (mmict installed outside its checkout): the versions are as listed"}
    found = drift(parse(path.read_text()), installed())
    out: dict[str, object] = {"file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
                              "sha256": sha256(path), "matches": not found}
    if found:
        out["drift"] = found
    return out


def freeze(python: str) -> dict[str, str]:
    """{name: version} of every distribution in the environment of `python` (pip, setuptools and wheel included,
    since they decide how the rest builds), less the editable project itself."""
    cmd = [python, "-m", "pip", "list", "--format=json", "--exclude-editable", "--disable-pip-version-check"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {canonical(r["name"]): r["version"] for r in rows if canonical(r["name"]) != "mmict"}


def render(pins: dict[str, str], python: str) -> str:
    probe = [python, "-c", "import platform, sys; print(platform.python_version(), sys.platform, platform.machine())"]
    py_version, plat, machine = subprocess.run(probe, check=True, capture_output=True, text=True).stdout.split()
    header = [
        "# mmict dependency lock: every version `make install` installs (as pip constraints).",
        "# Written by `make upgrade-lock` (python -m mmict.dependency_lock write) after lint and the suite passed",
        f"# with exactly these versions. Resolved on CPython {py_version}, {plat} {machine}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}.",
        "# Do not edit by hand: `make upgrade-lock` re-resolves, tests and rewrites it.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(pins.items())]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmict.dependency_lock", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="freeze an environment into the lock and print what changed")
    w.add_argument("--python", default=sys.executable, help="the interpreter of the environment to freeze")
    w.add_argument("--out", type=Path, default=LOCK_PATH)
    d = sub.add_parser("diff", help="what changed between two locks")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    c = sub.add_parser("check", help="this environment against the lock (exit 1 on drift)")
    c.add_argument("--lock", type=Path, default=None, help="default: $MMICT_LOCK, else requirements/lock.txt")
    c.add_argument("--quiet", action="store_true", help="print only when the environment differs")
    args = parser.parse_args(argv)

    if args.cmd == "write":
        old = parse(args.out.read_text()) if args.out.is_file() else {}
        new = freeze(args.python)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(new, args.python))
        changes = diff(old, new)
        print(f"wrote {args.out} ({len(new)} packages); " + (f"{len(changes)} changed:" if changes else "no change"))
        for line in changes:
            print(line)
        return 0
    if args.cmd == "diff":
        changes = diff(parse(args.old.read_text()), parse(args.new.read_text()))
        print("\n".join(changes) if changes else "no change")
        return 0
    info = record(args.lock)
    if not (args.quiet and info["matches"]):
        print(json.dumps(info, indent=2))
    return 0 if info["matches"] else 1


if __name__ == "__main__":
    sys.exit(main())
