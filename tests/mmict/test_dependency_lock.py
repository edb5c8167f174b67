"""The dependency lock: complete, consistent with pyproject.toml, used by `make install`, and recorded in runs."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself needs there
    import tomli as tomllib

from mmict.dependency_lock import (
    LOCK_PATH,
    REPO,
    canonical,
    diff,
    drift,
    installed,
    lock_path,
    main,
    parse,
    record,
    sha256,
)


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and its `dev` extra: what `make install` asks for."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_lock_pins_every_declared_dependency_within_its_range():
    pins = parse(LOCK_PATH.read_text())
    for req in declared():
        name = canonical(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked: run make upgrade-lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"the lock's {name}=={pins[name]} is outside pyproject.toml's range {req}")


def test_lock_is_closed_under_dependencies():
    """Every requirement of every locked package (on this platform, without extras) is locked too: nothing
    `make install` pulls in is left to resolve freshly."""
    pins, have = parse(LOCK_PATH.read_text()), installed()
    env = {**default_environment(), "extra": ""}
    missing = set()
    for name in pins:
        if name not in have:
            continue  # locked for another platform's needs (or not needed here)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if (req.marker is None or req.marker.evaluate(env)) and canonical(req.name) not in pins:
                missing.add(f"{req.name} (needed by {name})")
    assert not missing, f"not in the lock: {sorted(missing)}"


@pytest.mark.skipif(os.environ.get("MMICT_UNLOCKED") == "1", reason="installed with LOCK= (newest versions)")
def test_this_environment_is_the_locked_one():
    """`make install` gives exactly the locked versions (under `make upgrade-lock`: the candidate lock's)."""
    info = record()
    assert info["sha256"] == sha256(lock_path())
    assert info["matches"], f"installed versions differ from {lock_path()}: {info.get('drift')}"


def test_parse_diff_and_drift():
    old = parse("# header\n\ntorch==2.15.0\nOpen_Clip-Torch==3.1.0\nnumpy==2.4.6\n")
    assert old == {"torch": "2.15.0", "open-clip-torch": "3.1.0", "numpy": "2.4.6"}
    new = {"torch": "2.16.0", "open-clip-torch": "3.1.0", "pillow": "12.0"}
    assert diff(old, new) == ["- numpy 2.4.6", "+ pillow 12.0", "~ torch 2.15.0 -> 2.16.0"]
    assert diff(old, old) == []
    # installed with another version is drift; locked but absent (another platform's) or unlocked extras are not
    assert drift(old, {"torch": "2.14.1", "numpy": "2.4.6", "six": "1.16"}) == {
        "torch": "installed 2.14.1, locked 2.15.0"}


def test_malformed_lock_line_is_named():
    with pytest.raises(ValueError, match=r"line 2 is not `name==version`.*make upgrade-lock"):
        parse("torch==2.15.0\ntransformers>=5\n")


def test_record_of_a_drifted_or_missing_lock(tmp_path):
    lock = tmp_path / "lock.txt"
    pytest_version = metadata.version("pytest")
    lock.write_text(f"pytest=={pytest_version}\ntorch==0.0.1\n")
    info = record(lock)
    assert info["sha256"] == sha256(lock) and info["matches"] is False
    assert list(info["drift"]) == ["torch"]
    missing = record(tmp_path / "absent.txt")
    assert missing["sha256"] is None and missing["matches"] is False and "no lock" in missing["note"]


def test_check_command_exit_code(tmp_path, capsys):
    lock = tmp_path / "lock.txt"
    lock.write_text(f"pytest=={metadata.version('pytest')}\n")
    assert main(["check", "--lock", str(lock), "--quiet"]) == 0 and capsys.readouterr().out == ""
    lock.write_text("pytest==0.0.1\n")
    assert main(["check", "--lock", str(lock), "--quiet"]) == 1 and "installed" in capsys.readouterr().out


def test_make_install_uses_the_lock_for_every_pip_call(tmp_path):
    """`make install` (so `make train`, `make test` and CI) installs under the lock's constraints, pip and the
    build backend included; LOCK= drops them."""
    def dry_run(*args: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}", *args], cwd=REPO,
                             check=True, capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if "pip install" in line]

    locked = dry_run()
    assert len(locked) == 2 and all("-c requirements/lock.txt" in line for line in locked)
    assert "--no-build-isolation" in locked[1] and "setuptools" in locked[0]
    assert not any("-c " in line for line in dry_run("LOCK="))
