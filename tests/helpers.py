"""What several tests share (one module; no test imports another test module): the tiny toy backbone's size,
the paper's AIM settings on it, a small AIM episode batch, and where the committed fixtures are."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader

from mmict.batch import EpisodeBatch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent

TINY_TOY = dict(image_size=16, patch_size=8, vision_hidden_size=32, vision_layers=2, text_hidden_size=32,
                text_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0)
# The paper's AIM (final layer, PyTorch's init), not toy_aim's layer-1 reading of its own pretrained backbone.
PAPER_AIM = ("method.aim.layer=-1", "method.aim.final_norm=true", "method.aim.projector_init=default")


def tiny_aim_cfg(backbone_dir, *overrides: str):
    """toy_aim on the tiny random backbone at `backbone_dir`, with the paper's AIM settings."""
    from mmict.config import load_config

    return load_config("toy_aim", [f"backbone.name_or_path={backbone_dir}", "backbone.toy=null", *PAPER_AIM,
                                   *overrides])


def eval_section(**kw):
    """An `eval` config section as `mmict.eval.protocol.resolve` reads it: the schema's defaults under the
    openflamingo protocol, with `kw` changed (rices_model / rices_pretrained set eval.rices.*)."""
    from types import SimpleNamespace

    rices = SimpleNamespace(model=kw.pop("rices_model", None), pretrained=kw.pop("rices_pretrained", None))
    base = dict(protocol="openflamingo", num_beams=None, max_new_tokens=None, length_penalty=None, zero_shot=None,
                demo_pool_size=None, demo_image_view="full", over_context="skip", num_queries=None, rices=rices,
                min_new_tokens=None, vqa_scoring=None)
    return SimpleNamespace(**{**base, **kw})


# A small M-Hub (Q-Former) for MMICT tests on tiny backbones.
SMALL_HUB = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
             "cross_attention_frequency": 1, "num_query_tokens": 4, "max_text_tokens": 32}


def make_mmict_module(path, family="blip2", design="fused", seed=0, task="toy_vqa", **mmict):
    """An MMICT module with SMALL_HUB on the tiny backbone at `path`, seeded, trained on `task`'s episodes (None:
    the web corpus, whose queries have no prompt)."""
    import torch

    from mmict.config import config_from_dict
    from mmict.methods.mmict.module import MMICTModule

    torch.manual_seed(seed)
    cfg = config_from_dict({
        "method": {"name": "mmict", "demo_design": design, "mmict": {"hub": SMALL_HUB, **mmict}},
        "backbone": {"family": family, "name_or_path": str(path), "toy": None},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.05},
        "data": {"task": task},
    })
    return MMICTModule(cfg)


def pixels(backbone, color):
    return backbone.image_transform(PILImage.new("RGB", (16, 16), color))


def episode_batch(backbone):
    red, blue = pixels(backbone, (220, 20, 20)), pixels(backbone, (20, 20, 220))
    return EpisodeBatch(
        demo_images=[red, blue, blue],
        demo_texts=["a red circle on the left .", "Question: what color is the shape? Short answer: blue",
                    "a blue square ."],
        demo_counts=[2, 1, 0],
        query_images=[red, blue, red],
        query_prompts=["Question: what color is the shape? Short answer:", "", "a red"],
        query_targets=["red", "a blue square in the center .", "circle"],
    )


def evaluate_trained(cfg, summary, *, folder: str, task: str, shots, demo_modes, max_new_tokens: int,
                     num_queries: int = 120):
    """The run's last checkpoint, loaded into a fresh module of its method, evaluated on `task` (seed 0, the first
    `num_queries` test queries): its `evaluate` results."""
    import torch

    from data_modules.downstream import DownstreamDataModule
    from mmict.eval.loop import evaluate
    from mmict.methods import METHODS

    module = METHODS[cfg.method.name](cfg)
    state = torch.load(f"{summary['run_dir']}/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])
    dm = DownstreamDataModule(cfg.data.root, folder=folder, task=task, image_transform=module.backbone.image_transform,
                              num_queries=num_queries)
    dm.setup("test")
    return evaluate(module, dm.queries, dm.pool, shots=list(shots), seeds=[0], demo_modes=list(demo_modes), task=task,
                    max_new_tokens=max_new_tokens, progress=False)


class VectorData(L.LightningDataModule):
    """64 random 4-vectors in batches of 2, for the guards' tiny Lightning runs (tests/callbacks)."""

    shot_policy = None  # the DemoSampler callback hands its policy here

    def train_dataloader(self):
        return DataLoader([{"x": torch.randn(4)} for _ in range(64)], batch_size=2)
