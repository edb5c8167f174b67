"""Vanilla fine-tuning baseline: the query alone (no demonstrations), LoRA adapters on the LLM.

The same episode batches as AIM, with the demos dropped: what in-context tuning is compared against.
Only the LoRA weights train (peft, `backbone.lora.r > 0`) and only they are saved.
"""

from __future__ import annotations

from omegaconf import DictConfig

from mmict.backbones import Backbone
from mmict.methods.base import FrozenBackboneModule


class FinetuneModule(FrozenBackboneModule):
    train_demo_mode = "none"

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            raise ValueError(
                "method.name=finetune trains LoRA adapters on the language model, and none are set: "
                "add backbone.lora.r=8 (or another rank) to the experiment or the command line"
            )
