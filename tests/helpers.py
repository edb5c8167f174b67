"""What several tests share (one module; no test imports another test module): the tiny toy backbone's size,
the paper's AIM settings on it, a small AIM episode batch, and where the committed fixtures are."""

from __future__ import annotations

from pathlib import Path

from PIL import Image as PILImage

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
