"""AIM's demonstration bank: what an AIM reading depends on (its key), and a bank of an AIM module's readings.

The bank itself (`mmict.bank.DemoBank`: storage, checksums, staleness) knows nothing of AIM; this module says
what identifies a stored reading (the backbone, the layer read, the final norm, how the demo is read: its
`read_format`, `read_span`, answer cues and chat template, the store and, for stored fused tokens, the
projector's weights) and how a missing one is computed. The default reading (raw, whole text) adds nothing to
the key, so banks built before the reading could be chosen keep theirs; any other reading has its own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmict.bank import FORMAT_VERSION, STORES, DemoBank, ModuleHash, backbone_fingerprint
from mmict.segments import Pixels


def aim_key(backbone: Any, layer: int, final_norm: bool, store: str, projector_hash: str | None,
            fingerprint: str | None = None, reading: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every part an AIM reading depends on (see the module docstring); `reading`: `DemoReader.reading_key()`."""
    if store not in STORES:
        raise ValueError(f"unknown bank store '{store}': use one of {STORES}")
    return {
        "format": FORMAT_VERSION,
        "backbone": str(backbone.name_or_path),
        "family": backbone.family,
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "fingerprint": fingerprint or backbone_fingerprint(backbone),
        "layer": int(layer),
        "final_norm": bool(final_norm),
        "store": store,
        "projector": projector_hash if store == "fused" else None,
        **({"reading": reading} if reading else {}),  # the default reading keeps the key it always had
    }


def aim_bank(module: Any, root: str | Path, *, store: str = "hidden", pool: str = "pool", batch_size: int = 16,
             progress: bool = True) -> DemoBank:
    """A bank of an `AIMModule`'s demo readings: hidden states (`store="hidden"`) or fused tokens (`"fused"`,
    keyed by the projector's weights as they are at each lookup)."""
    if store not in STORES:
        raise ValueError(f"unknown bank store '{store}': use one of {STORES}")
    reader, backbone = module.reader, module.backbone
    projector_hash = ModuleHash(module.projector) if store == "fused" else None
    final_norm = bool(reader.final_norm and not reader.is_final)  # the final layer is normed either way
    # the backbone is frozen: fingerprinted once
    static = aim_key(backbone, reader.layer, final_norm, store, None, reading=reader.reading_key())

    def key() -> dict[str, Any]:
        return static if projector_hash is None else {**static, "projector": projector_hash()}

    def compute(images: list[Pixels], texts: list[str]) -> list[torch.Tensor]:
        hidden = reader.read(images, texts)
        return hidden if store == "hidden" else module.project(hidden)

    return DemoBank(root, compute, key, pool=pool, store=store, batch_size=batch_size, progress=progress)
