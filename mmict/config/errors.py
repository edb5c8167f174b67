""":class:`ConfigError` and the helpers that word its messages: where a key's value came from, did-you-mean
suggestions for unknown keys and values, and the unknown-key / wrong-type / not-a-choice errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from mmict.config.introspection import _SCHEMA_TYPES, _expected_type, _fields, _is_section, _unwrap_optional
from mmict.config.schema import ExperimentConfig

# Names of the sources messages attribute a key to (besides a YAML file's path).
_COMMAND_LINE = "command line"
_SCHEMA_DEFAULT = "schema default"


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what is wrong and how to fix it."""


def _suggest(full_key: str) -> list[str]:
    """Nearest valid full dotted keys for an unknown one.

    Siblings in the same section come first (a typo in the leaf is the common case), then the same leaf
    name in other sections (``trainer.batch_size`` -> ``data.batch_size``), then whole-key matches, which
    are what catch typos in the section name itself (``trainr.max_steps``).
    """
    parent, _, leaf = full_key.rpartition(".")
    found: list[str] = []
    parent_tp = _SCHEMA_TYPES.get(parent) if parent else ExperimentConfig
    if parent_tp is not None and _is_section(parent_tp):
        siblings = list(_fields(_unwrap_optional(parent_tp)[0]))
        prefix = f"{parent}." if parent else ""
        found += [prefix + s for s in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    found += [k for k in _SCHEMA_TYPES if k.rpartition(".")[2] == leaf and k != full_key]
    # Whole-key matches: ancestors are excluded ('trainer' is "close" to 'trainer.zzz' but never meant).
    # Within a valid section the shared prefix inflates every sibling's score, so there only near-certain
    # matches count; a loose cutoff is kept for when the section name itself is the typo.
    parent_ok = parent_tp is not None and _is_section(parent_tp)
    candidates = [k for k in _SCHEMA_TYPES if not full_key.startswith(k + ".")]
    found += difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.8 if parent_ok or found else 0.6)
    return list(dict.fromkeys(found))[:3]


def _did_you_mean(options: Sequence[str]) -> str:
    if not options:
        return ""
    quoted = [f"'{o}'" for o in options]
    if len(quoted) == 1:
        return f" Did you mean {quoted[0]}?"
    return f" Did you mean {', '.join(quoted[:-1])} or {quoted[-1]}?"


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    msg = f"unknown config key '{full_key}' (from {source})."
    suggestions = _suggest(full_key)
    if suggestions:
        msg += _did_you_mean(suggestions)
    else:
        parent = full_key.rpartition(".")[0]
        parent_tp = _SCHEMA_TYPES.get(parent) if parent else ExperimentConfig
        if parent_tp is not None and _is_section(parent_tp):
            valid = ", ".join(_fields(_unwrap_optional(parent_tp)[0]))
            msg += f" Valid keys {'under ' + repr(parent) if parent else 'at the top level'}: {valid}."
    return ConfigError(msg)


def _type_error(full_key: str, value: Any, source: str, expected: str | None = None) -> ConfigError:
    expected = expected or _expected_type(full_key) or "a value of the schema's type"
    return ConfigError(f"config key '{full_key}' = {value!r} (from {source}): expected {expected}")


def _where(key: str, origin: Mapping[str, str]) -> str:
    # A key inherits the source of its nearest recorded ancestor (e.g. a whole section set on the CLI).
    probe = key
    while probe:
        if probe in origin:
            return origin[probe]
        probe = probe.rpartition(".")[0]
    return _SCHEMA_DEFAULT


def _choice_error(key: str, value: Any, choices: Sequence[str], origin: Mapping[str, str]) -> ConfigError:
    options = ", ".join(repr(c) for c in choices)
    msg = f"config key '{key}' = {value!r} (from {_where(key, origin)}): expected one of {options}."
    msg += _did_you_mean(difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5))
    return ConfigError(msg)
