"""Reading experiments: YAML files with ``base:`` inheritance, command-line ``key=value`` overrides, the merge
order (schema defaults <- bases <- experiment file <- command line), :func:`load_config`, :func:`config_from_dict`,
listing the experiments, and writing a config back out (:func:`to_yaml`, :func:`save_config`).
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmict.config.checks import _check_dotted_key, _check_semantics, _merge
from mmict.config.errors import _COMMAND_LINE, ConfigError, _did_you_mean, _where
from mmict.config.introspection import _SCHEMA_TYPES, _unwrap_optional
from mmict.config.schema import EXPERIMENTS_DIR, ExperimentConfig


def _display(path: Path) -> str:
    """Short path for messages: relative to the cwd when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def list_experiments(experiments_dir: Path | str | None = None) -> list[str]:
    """Names accepted by :func:`load_config` (``sub/name`` for files in subfolders).

    Files under ``base/`` folders are shared pieces, not experiments, so they are not listed (they can still
    be loaded by path).
    """
    root = Path(experiments_dir) if experiments_dir is not None else EXPERIMENTS_DIR
    if not root.is_dir():
        return []
    names = []
    for path in root.rglob("*"):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        rel = path.relative_to(root)
        if "base" in rel.parts[:-1]:
            continue
        names.append(rel.with_suffix("").as_posix())
    return sorted(set(names))


def _resolve_experiment(experiment: str | Path, root: Path) -> Path:
    given = Path(experiment)
    if given.suffix in (".yaml", ".yml") or isinstance(experiment, Path):
        for candidate in (given, root / given):
            if candidate.is_file():
                return candidate.resolve()
        raise ConfigError(
            f"experiment file '{experiment}' not found (looked in the current directory and in {root}). "
            f"Pass an existing .yaml path or an experiment name such as: "
            f"{', '.join(list_experiments(root)) or '(none found)'}"
        )
    for suffix in (".yaml", ".yml"):
        candidate = root / f"{experiment}{suffix}"
        if candidate.is_file():
            return candidate.resolve()
    available = list_experiments(root)
    msg = f"unknown experiment '{experiment}' (no {experiment}.yaml in {root})."
    msg += _did_you_mean(difflib.get_close_matches(str(experiment), available, n=1, cutoff=0.5))
    msg += f" Available experiments: {', '.join(available) if available else '(none)'}."
    raise ConfigError(msg)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file '{_display(path)}' not found") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"could not parse YAML in '{_display(path)}': {e}") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(
            f"'{_display(path)}' must contain a mapping of config keys at the top level, not a list"
        )
    data = OmegaConf.to_container(loaded, resolve=False)
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


def _resolve_base(ref: str, including: Path, root: Path) -> Path:
    """Bases are relative to the experiments dir; the including file's folder is a fallback so that
    experiment files kept elsewhere can still inherit from their neighbours."""
    ref_path = Path(ref)
    candidates = [ref_path] if ref_path.is_absolute() else [root / ref_path, including.parent / ref_path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(_display(c) for c in candidates)
    raise ConfigError(
        f"base '{ref}' listed in '{_display(including)}' not found (tried {tried}). "
        f"Base paths are relative to the experiments dir, e.g. 'base: [base/default.yaml]'"
    )


def _expand(path: Path, root: Path, stack: tuple[Path, ...] = ()) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (file, its keys without ``base``) in merge order: bases first (depth first), then the file."""
    if path in stack:
        chain = " -> ".join(_display(p) for p in (*stack, path))
        raise ConfigError(f"cycle in 'base:' inheritance: {chain}. Remove one of these 'base:' entries")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(
            f"'base' in '{_display(path)}' = {bases!r}: expected a path or a list of paths relative to the "
            f"experiments dir, e.g. 'base: [base/default.yaml]'"
        )
    for ref in bases:
        yield from _expand(_resolve_base(ref, path, root), root, (*stack, path))
    yield path, data


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"malformed override {item!r}: expected key=value with a dotted key, "
            f"e.g. trainer.max_steps=50 or eval.shots=[0,2,4]"
        )
    _check_dotted_key(key)
    if value == "":
        # YAML reads an empty value as null; `name=` almost always means "empty string" (as in Hydra).
        return _nest(key, "")
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    except yaml.YAMLError as e:
        # The marked error's `problem` is the useful part; its position refers to a one-line string.
        first = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(
            f"could not parse the value of override {item!r} (from {_COMMAND_LINE}) as YAML: {first}. "
            f"Quote it for the shell if it contains spaces or brackets, e.g. '{key}=[0,2,4]'"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"malformed override {item!r}: {e}. Expected key=value, e.g. trainer.max_steps=50"
        ) from None
    data = OmegaConf.to_container(parsed, resolve=False)
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _unresolved(cfg: DictConfig, dotted: str) -> Any:
    """The raw ``${...}`` text at a key (selecting it would try, and fail, to resolve it again)."""
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in re.split(r"\.|\[(\d+)\]", dotted):
        if not part:
            continue
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return "?"
    return node


def load_config(
    experiment: str | Path,
    overrides: Sequence[str] = (),
    experiments_dir: Path | str | None = None,
) -> DictConfig:
    """Load, merge and validate an experiment.

    ``experiment`` is a name (``"toy_aim"`` -> ``<experiments_dir>/toy_aim.yaml``) or a path to a YAML file.
    ``overrides`` are ``key=value`` strings whose values are parsed as YAML (``eval.shots=[0,2,4]``,
    ``backbone.name_or_path=null``). Raises :class:`ConfigError` on any problem.
    """
    if isinstance(overrides, str):
        # A bare string would be iterated character by character into nonsense overrides.
        overrides = [overrides]
    root = Path(experiments_dir) if experiments_dir is not None else EXPERIMENTS_DIR
    path = _resolve_experiment(experiment, root)

    cfg: DictConfig = OmegaConf.structured(ExperimentConfig)
    origin: dict[str, str] = {}
    for file, data in _expand(path, root):
        cfg = _merge(cfg, data, _display(file), origin)
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), _COMMAND_LINE, origin)

    try:
        # Surface broken ${...} interpolations now rather than when some callback first reads the key.
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        text = _unresolved(cfg, key)
        reason = str(getattr(e, "msg", e)).strip().splitlines()[0]
        raise ConfigError(
            f"config key '{key}' = {text!r} (from {_where(key, origin)}): "
            f"cannot resolve interpolation: {reason}"
        ) from None
    if not cfg.name:
        cfg.name = path.stem
    _check_semantics(cfg, origin)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def key_takes_list(dotted: str) -> bool:
    """Whether a config key's own value is a list (``eval.shots``): a sweep over it needs a list of lists."""
    tp = _SCHEMA_TYPES.get(dotted)
    return tp is not None and typing.get_origin(_unwrap_optional(tp)[0]) is list


def config_from_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "checkpoint"
) -> DictConfig:
    """Rebuild a validated config from a plain dict (a checkpoint's saved config), then apply overrides."""
    cfg: DictConfig = OmegaConf.structured(ExperimentConfig)
    origin: dict[str, str] = {}
    cfg = _merge(cfg, data, source, origin)
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), _COMMAND_LINE, origin)
    _check_semantics(cfg, origin)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig | ExperimentConfig) -> str:
    """The config as YAML with interpolations resolved, so a saved run is self-contained."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig | ExperimentConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``to_yaml(cfg)`` to ``path`` (parents created); it loads back with ``load_config(path)``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(cfg), encoding="utf-8")
    return out
