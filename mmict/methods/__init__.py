"""The methods: one folder each, and this registry of them.

A method is a LightningModule on `base.FrozenBackboneModule` (a frozen backbone, checkpoints of what trains
only) with everything that is its own in its folder: its nn parts, its module, and what evaluation reports of
it. Adding a method is a new folder and one line in `REGISTRY` (docs/adding-a-method.md).

The registry names each method's module class by import path and imports it on first use, as transformers'
auto classes do: `mmict.config` validates `method.name` against these names without importing torch-heavy
method code (which itself imports the config schema).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

# method.name -> "module path:class name" of its LightningModule
REGISTRY: dict[str, str] = {
    "aim": "mmict.methods.aim.module:AIMModule",
    "finetune": "mmict.methods.finetune.module:FinetuneModule",
    "live": "mmict.methods.live.module:LIVEModule",
    "mmict": "mmict.methods.mmict.module:MMICTModule",
    "mimic": "mmict.methods.mimic.module:MimICModule",
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


def method_class(name: str) -> type:
    """The LightningModule class of `method.name`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown method '{name}': use one of {', '.join(METHOD_NAMES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


class _Methods(Mapping[str, type]):
    """`METHODS[name]` -> the module class, imported on first use."""

    def __getitem__(self, name: str) -> type:
        return method_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


METHODS: Mapping[str, type] = _Methods()

__all__ = ["METHODS", "METHOD_NAMES", "REGISTRY", "method_class"]
