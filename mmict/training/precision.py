"""Precision policy: which Lightning precision and which backbone dtype a run actually uses.

The frozen backbone is loaded directly in its compute dtype (bf16 on GPUs that have it, so a 7B model
takes half the memory); the trainable modules (AIM's projector, MMICT's M-Hub, LoRA) and their optimizer
state stay in fp32 and run under autocast (`bf16-mixed`).

What the user sets x what the hardware has -> what runs (`resolve_precision`):

| trainer.precision | backbone.dtype | GPU with bf16      | GPU without bf16 | CPU              |
|-------------------|----------------|--------------------|------------------|------------------|
| auto              | auto           | bf16-mixed, bf16   | 32-true, fp32    | 32-true, fp32    |
| bf16-mixed        | bfloat16       | bf16-mixed, bf16   | 32-true, fp32 (W)| 32-true, fp32 (W)|
| bf16-true         | any            | bf16-true (note)   | 32-true (W)      | 32-true (W)      |
| 16-mixed/16-true  | float16        | as set             | as set           | 32-true, fp32 (W)|
| 32-true           | float32        | as set             | as set           | as set           |

(W): an explicit setting the hardware cannot honour falls back to fp32 with a WARNING that names the
setting, the hardware and the fix, and the run records both what was asked and what ran (runtime.json,
W&B config). `auto` is the "decide for me" value: the choice is logged at INFO. `backbone.dtype: auto`
follows the effective precision (bf16-* -> bfloat16, 16-* -> float16, else float32). Nothing changes
silently.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

BF16_PRECISIONS = ("bf16-mixed", "bf16-true")
FP16_PRECISIONS = ("16-mixed", "16-true")
FP32 = "32-true"


@dataclass(frozen=True)
class Hardware:
    """What the run's accelerator can do: `kind` is cuda, cpu or mps."""

    kind: str
    bf16: bool = False
    fp16: bool = False
    name: str = ""

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"GPU {self.name or '(cuda)'} ({'with' if self.bf16 else 'without'} bf16 support)"
        return {"cpu": "CPU", "mps": "Apple MPS"}.get(self.kind, self.kind)


def detect_hardware(accelerator: str = "auto") -> Hardware:
    """The hardware `trainer.accelerator` resolves to (cpu, gpu/cuda, mps or auto)."""
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        try:  # pre-Ampere GPUs emulate bf16 (slowly); only native support counts
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch without the argument
            bf16 = torch.cuda.is_bf16_supported()
        return Hardware("cuda", bf16=bool(bf16), fp16=True, name=torch.cuda.get_device_name(0))
    if accelerator in ("mps", "auto") and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Hardware("mps")
    return Hardware("cpu")


@dataclass
class PrecisionDecision:
    """What was asked, what runs, and why (messages are what the policy said out loud)."""

    requested_precision: str
    requested_dtype: str
    precision: str
    backbone_dtype: str
    hardware: str
    changed: bool = False  # an explicit setting was overridden (said as a warning)
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dtype_for(precision: str) -> str:
    if precision in BF16_PRECISIONS:
        return "bfloat16"
    if precision in FP16_PRECISIONS:
        return "float16"
    return "float32"


def resolve_precision(precision: str, backbone_dtype: str, hw: Hardware) -> PrecisionDecision:
    """The effective (trainer.precision, backbone.dtype) for `hw`; see the module docstring's table."""
    precision, backbone_dtype = str(precision), str(backbone_dtype)
    d = PrecisionDecision(precision, backbone_dtype, precision, backbone_dtype, hw.describe())
    fix = "set trainer.precision=32-true backbone.dtype=float32 (or auto) to say so, or run on a GPU with bf16"

    if precision == "auto":
        d.precision = "bf16-mixed" if hw.bf16 else FP32
        d.messages.append(f"trainer.precision=auto -> {d.precision} on {hw.describe()}")
    elif precision in BF16_PRECISIONS and not hw.bf16:
        d.precision, d.changed = FP32, True
        d.messages.append(f"trainer.precision={precision} was set, but {hw.describe()} has no native bf16: "
                          f"training in fp32 (32-true) instead; {fix}")
    elif precision in FP16_PRECISIONS and not hw.fp16:
        d.precision, d.changed = FP32, True
        d.messages.append(f"trainer.precision={precision} was set, but {hw.describe()} has no fp16 training "
                          f"support: training in fp32 (32-true) instead; {fix}")
    elif precision == "bf16-true":
        d.messages.append("trainer.precision=bf16-true: the trainable modules and their optimizer state are "
                          "bf16 too (bf16-mixed keeps them in fp32)")

    if backbone_dtype == "auto":
        d.backbone_dtype = _dtype_for(d.precision)
        d.messages.append(f"backbone.dtype=auto -> {d.backbone_dtype} (follows precision {d.precision})")
    elif backbone_dtype == "bfloat16" and not hw.bf16:
        d.backbone_dtype, d.changed = "float32", True
        d.messages.append(f"backbone.dtype=bfloat16 was set, but {hw.describe()} has no native bf16: loading "
                          f"the frozen backbone in float32 instead; {fix}")
    elif backbone_dtype == "float16" and not hw.fp16:
        d.backbone_dtype, d.changed = "float32", True
        d.messages.append(f"backbone.dtype=float16 was set, but {hw.describe()} cannot run fp16 models well: "
                          f"loading the frozen backbone in float32 instead; {fix}")
    elif d.precision == FP32 and d.backbone_dtype != "float32":
        d.messages.append(f"backbone.dtype={d.backbone_dtype} with trainer.precision={d.precision}: the frozen "
                          "backbone computes in its own dtype, the trainable modules in fp32")
    return d


def apply_precision_policy(cfg: Any, hw: Hardware | None = None) -> PrecisionDecision:
    """Resolve and write the effective values into `cfg.trainer.precision` and `cfg.backbone.dtype` (so the
    backbone loads and the Trainer runs with them, and the saved config says what ran); warnings for every
    explicit setting that could not be honoured, INFO for `auto` choices."""
    hw = hw or detect_hardware(cfg.trainer.accelerator)
    d = resolve_precision(cfg.trainer.precision, cfg.backbone.dtype, hw)
    for message in d.messages:
        (log.warning if d.changed and "was set" in message else log.info)("precision policy: %s", message)
    cfg.trainer.precision = d.precision
    cfg.backbone.dtype = d.backbone_dtype
    return d
