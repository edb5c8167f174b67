"""Every shell command in the `bash` blocks of README.md and docs/*.md runs, without doing real work, so the
documentation cannot rot (as litgpt's tests/test_readme.py does).

- `make X VAR=... ` runs as `make -n -B X VAR=...` (a dry run that prints every recipe): the target must exist
  and expand, and every variable given must be one the Makefile reads. The mmict commands a recipe expands to
  are then checked like those written out.
- `mmict <command> ...`, `python -m mmict.<module> ...` and `python -m bench ...` run in-process through their
  `main()`: once with `--help` appended (usage, exit 0, nothing done), and once with argparse stopped right
  after parsing, so that an unknown command or flag fails; the experiment and its `key=value` overrides are
  then loaded and validated, and a `data convert` dataset and split must exist. `mmict sweep` runs its own
  `--dry-run` instead, which validates every grid point and writes nothing.
- Commands that are not ours (git, sbatch, wandb, pip, pytest, `python -m lightning...`) are only checked to be
  well-formed shell; a `python -m` module must be importable, a `bash` script must exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12_000  # characters: the README is the map; details go to docs/

SHELL_LANGS = {"bash", "sh", "shell"}
OPERATORS = {"&&", "||", "|", ";"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
REDIRECT = re.compile(r"^\d*(>>?|<)(&\d+)?$|^\d*>&\d+$")
OUR_PACKAGES = {"mmict", "bench", "data_modules", "callbacks"}


@dataclass(frozen=True)
class Command:
    source: str  # file:line, for the test id and messages
    text: str

    def tokens(self) -> list[str]:
        return shlex.split(self.text, comments=True)


# ---------------------------------------------------------------------------------------------------
# Extracting the commands


def shell_blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) of every ```bash block of a markdown file (indented ones included)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            lang = fence[3:].strip().lower()
            body, start = [], i + 2
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            if lang in SHELL_LANGS:
                yield start, body
        i += 1


def block_commands(path: Path) -> Iterator[Command]:
    rel = path.relative_to(ROOT).as_posix()
    for start, body in shell_blocks(path):
        pending, first = "", None
        for n, line in enumerate(body, start):
            if first is None:
                first = n
            stripped = line.strip()
            if stripped.endswith("\\"):  # a continued line: join it with the next
                pending += stripped[:-1] + " "
                continue
            text = (pending + stripped).strip()
            pending, line_no, first = "", first, None
            if text and shlex.split(text, comments=True):
                yield Command(f"{rel}:{line_no}", text)


def simple_commands(tokens: list[str]) -> list[list[str]]:
    """A command line's simple commands (split at && || | ;), redirections dropped, leading VAR=value too."""
    out, current = [], []
    for tok in [*tokens, ";"]:
        if tok in OPERATORS:
            while current and ASSIGNMENT.match(current[0]):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        elif not REDIRECT.match(tok):
            current.append(tok)
    return out


ALL_COMMANDS = [cmd for path in DOCS for cmd in block_commands(path)]


# ---------------------------------------------------------------------------------------------------
# Running our entry points in-process


class _Parsed(BaseException):  # noqa: N818 - a signal, not an error; BaseException so no `except Exception` eats it
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def _stop_after_parsing(self: argparse.ArgumentParser, args=None, namespace=None):
    namespace, extras = self.parse_known_args(args, namespace)
    if extras:
        self.error(f"unrecognized arguments: {' '.join(extras)}")
    raise _Parsed(namespace)


def _stop_after_intermixed_parsing(self: argparse.ArgumentParser, args=None, namespace=None):
    namespace, extras = self.parse_known_intermixed_args(args, namespace)
    if extras:
        self.error(f"unrecognized arguments: {' '.join(extras)}")
    raise _Parsed(namespace)


@contextlib.contextmanager
def _at_root() -> Iterator[None]:
    before = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def _call(main: Callable, argv: list[str], *, parse_only: bool = False) -> tuple[object, str]:
    """Run `main(argv)`; (exit code, or the parsed namespace with `parse_only`; stdout + stderr)."""
    out = io.StringIO()
    patches = contextlib.ExitStack()
    if parse_only:  # every way our commands parse (mmict eval's is intermixed): stop right after it
        patches.enter_context(mock.patch.object(argparse.ArgumentParser, "parse_args", _stop_after_parsing))
        patches.enter_context(mock.patch.object(argparse.ArgumentParser, "parse_intermixed_args",
                                                _stop_after_intermixed_parsing))
    with _at_root(), patches, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            result: object = main(argv)
        except _Parsed as parsed:
            result = parsed.namespace
        except SystemExit as exit_:
            result = exit_.code
    if result is None:
        result = 0
    return result, out.getvalue()


def _entry_point(tokens: list[str]) -> tuple[str, Callable, list[str]] | None:
    """(name, main, argv) of one of our commands, or None when the command is not ours."""
    exe = Path(tokens[0]).name
    if exe == "mmict":
        from mmict.cli import main

        return "mmict", main, tokens[1:]
    if _is_python(exe) and "-m" in tokens:
        i = tokens.index("-m")
        module = tokens[i + 1]
        if module.split(".")[0] in OUR_PACKAGES:
            return f"python -m {module}", _module_main(module), tokens[i + 2:]
    return None


def _is_python(exe: str) -> bool:
    return exe in ("python", "python3") or re.fullmatch(r"python3\.\d+", exe) is not None


def _module_main(module: str) -> Callable:
    """`main` of what `python -m module` runs; a `main()` that reads sys.argv gets it set."""
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # a package: python -m runs its __main__
        mod = importlib.import_module(f"{module}.__main__")
    main = getattr(mod, "main", None)
    assert callable(main), f"`python -m {module}` has no main() to check"
    if inspect.signature(main).parameters:
        return main

    def with_argv(argv: list[str]):
        saved = sys.argv
        sys.argv = [f"python -m {module}", *argv]
        try:
            return main()
        finally:
            sys.argv = saved

    return with_argv


def _validate(namespace: argparse.Namespace, where: str) -> None:
    """What parsing alone cannot tell: the experiment and overrides load, the dataset and split exist."""
    from mmict.config import ConfigError, config_from_dict, load_config

    ns = vars(namespace)
    try:
        if "experiment" in ns and "overrides" in ns:  # train, pretrain-toy
            load_config(ns["experiment"], ns["overrides"])
        elif "checkpoint" in ns and "exp" in ns:  # eval
            from mmict.eval.__main__ import shots_override

            overrides, checkpoint = ns["overrides"] + shots_override(ns["shots"]), ns["checkpoint"]
            if checkpoint and "=" in checkpoint:  # as eval's main reads it: an override, not a path
                overrides, checkpoint = [checkpoint, *overrides], None
            if checkpoint:  # the checkpoint's own config is not at hand: the overrides against the schema
                config_from_dict({}, overrides)
            else:
                assert ns["exp"], f"{where}: `mmict eval` needs a checkpoint or --exp EXP"
                load_config(ns["exp"], overrides)
        elif "dataset" in ns and "src" in ns:  # data convert
            from data_modules.converters import CONVERTERS

            assert ns["dataset"] in CONVERTERS, f"{where}: no converter '{ns['dataset']}' ({sorted(CONVERTERS)})"
            converter = CONVERTERS[ns["dataset"]]
            if converter.splits:
                assert ns["split"] in converter.splits, (
                    f"{where}: {ns['dataset']} --split must be one of {converter.splits}, not {ns['split']!r}")
        elif ns.get("only") and "steps" in ns:  # python -m bench.gpu_checks --only a,b: its sections
            from bench.gpu_checks import SECTIONS

            unknown = [n for n in ns["only"].split(",") if n.strip() and n.strip() not in SECTIONS]
            assert not unknown, f"{where}: unknown gpu_checks section(s) {unknown}; available: {list(SECTIONS)}"
        elif ns.get("only") and "quick" in ns:  # python -m bench --only a,b
            from bench import REGISTRY
            from bench.__main__ import load_registry

            load_registry(log=lambda *_: None)
            unknown = [n for n in ns["only"].split(",") if n.strip() and n.strip() not in REGISTRY]
            assert not unknown, f"{where}: unknown benchmark(s) {unknown}; available: {sorted(REGISTRY)}"
    except ConfigError as err:
        raise AssertionError(f"{where}: {err}") from None


def check_ours(name: str, main: Callable, argv: list[str], where: str) -> None:
    shown = shlex.join([name, *argv])
    if name == "mmict" and argv[:1] == ["sweep"]:
        # Its own dry run: every grid point validated, the sbatch script printed, nothing written.
        dry = argv if "--dry-run" in argv else [*argv, "--dry-run"]
        code, output = _call(main, dry)
        assert code == 0, f"{where}: `{shown}` as a dry run exited {code}:\n{output[-2000:]}"
        assert "#SBATCH" in output, f"{where}: `{shown}` printed no sbatch script:\n{output[-2000:]}"
    code, output = _call(main, [*argv, "--help"])
    assert code == 0 and output.strip(), f"{where}: `{shown} --help` exited {code}:\n{output[-2000:]}"
    result, output = _call(main, argv, parse_only=True)
    if isinstance(result, argparse.Namespace):
        _validate(result, f"{where}: `{shown}`")
    else:
        asked_help = "--help" in argv or "-h" in argv
        assert result == 0 and asked_help, f"{where}: `{shown}` does not parse (exit {result}):\n{output[-2000:]}"


# ---------------------------------------------------------------------------------------------------
# make


def makefile_variables() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)", text)) | set(
        re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", text, re.M))


def recipe_lines(output: str) -> list[str]:
    return [line for line in re.sub(r"\\\n\s*", " ", output).splitlines() if line.strip()]


def check_make(args: list[str], where: str) -> None:
    known = makefile_variables()
    for arg in args:
        if ASSIGNMENT.match(arg):
            name = arg.split("=", 1)[0]
            assert name in known, f"{where}: make variable {name} is not read by the Makefile ({sorted(known)})"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, f"{where}: `make -n {shlex.join(args)}` failed:\n{proc.stderr}"
    for line in recipe_lines(proc.stdout):
        for tokens in simple_commands(shlex.split(line)):
            entry = _entry_point(tokens)
            if entry is not None:
                check_ours(*entry, f"{where} (make expands it to `{shlex.join(tokens)}`)")
            elif Path(tokens[0]).name == "bash" and len(tokens) > 1:
                assert (ROOT / tokens[1]).is_file(), f"{where}: the recipe runs a missing script {tokens[1]}"


# ---------------------------------------------------------------------------------------------------
# Any command


def check_command(text: str, where: str) -> None:
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as err:
        raise AssertionError(f"{where}: not well-formed shell ({err}): {text}") from None
    for simple in simple_commands(tokens):
        exe = Path(simple[0]).name
        entry = _entry_point(simple)
        if exe == "make":
            check_make(simple[1:], where)
        elif entry is not None:
            check_ours(*entry, where)
        elif _is_python(exe) and "-m" in simple:  # not ours: the module must at least be there
            module = simple[simple.index("-m") + 1]
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module} for `{text}`"
        elif _is_python(exe) and len(simple) > 1 and not simple[1].startswith("-"):
            assert (ROOT / simple[1]).is_file(), f"{where}: no script {simple[1]}"
        elif exe == "bash" and len(simple) > 1 and not simple[1].startswith("-"):
            assert (ROOT / simple[1]).is_file(), f"{where}: no script {simple[1]}"
        # anything else (git, sbatch, wandb, huggingface-cli, ...) is not ours: well-formed is all we check


# ---------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.source for c in ALL_COMMANDS])
def test_documented_command_runs(command: Command) -> None:
    check_command(command.text, command.source)


def test_readme_has_the_two_commands_and_stays_a_map() -> None:
    readme = [c.tokens()[:2] for c in ALL_COMMANDS if c.source.startswith("README.md:")]
    assert ["make", "train"] in readme and ["make", "test"] in readme
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size < README_LIMIT, f"README.md has {size} characters (limit {README_LIMIT}): move details to docs/"


@pytest.mark.parametrize("bad", [
    "make no-such-target",
    "make train EPX=toy_aim",
    "mmict trian toy_aim",
    "mmict train toy_aim --no-such-flag",
    "mmict train toy_aim trainer.max_step=5",
    "mmict train no_such_experiment",
    "mmict eval runs/x/last.ckpt --seeds 0,1",
    "mmict data convert okvqa --in x --split test --out y/test-%06d.tar",
    "mmict sweep toy_aim 'trainer.max_step=[1,2]' --dry-run",
    "python -m mmict.train toy_aim trainer.no_such_key=1",
])
def test_a_wrong_command_fails(bad: str) -> None:
    with pytest.raises(AssertionError):
        check_command(bad, "example")
