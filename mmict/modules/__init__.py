"""LightningModules: one per method, on one base (`FrozenBackboneModule`); MMICT joins here."""

from mmict.modules.aim import AIMModule
from mmict.modules.base import FrozenBackboneModule
from mmict.modules.finetune import FinetuneModule

METHODS = {"aim": AIMModule, "finetune": FinetuneModule}

__all__ = ["AIMModule", "FinetuneModule", "FrozenBackboneModule", "METHODS"]
