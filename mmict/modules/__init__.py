"""LightningModules: one per method, on one base (`FrozenBackboneModule`)."""

from mmict.modules.aim import AIMModule
from mmict.modules.base import FrozenBackboneModule
from mmict.modules.finetune import FinetuneModule
from mmict.modules.mmict import MMICTModule

METHODS = {"aim": AIMModule, "finetune": FinetuneModule, "mmict": MMICTModule}

__all__ = ["AIMModule", "FinetuneModule", "FrozenBackboneModule", "METHODS", "MMICTModule"]
