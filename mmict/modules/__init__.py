"""LightningModules: one per method (AIM now; MMICT and the baselines join here)."""

from mmict.modules.aim import AIMModule

METHODS = {"aim": AIMModule}

__all__ = ["AIMModule", "METHODS"]
