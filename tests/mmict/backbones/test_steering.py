"""The residual-stream hook changes a family's outputs only where it should: nowhere with a zero vector, nothing
before the steered layer, only at the masked positions (and after them, causally), every time in generation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny
from tiny_models.common import test_image as make_image

from mmict.backbones import load_backbone
from mmict.backbones.steering import ResidualSteering, shift_hidden, steer, steered_layers
from mmict.segments import Image, Text

FAMILIES = ("llava", "qwen2_vl", "blip2_t5")


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tmp_path_factory):
    path = save_tiny(request.param, tmp_path_factory.mktemp("steer") / request.param)
    return load_backbone("blip2" if request.param.startswith("blip2") else request.param, str(path))


def _batch(bb):
    image = bb.image_transform(make_image())
    prompts = [[Image(image), Text("what color is it"), Text("red", target=True)],
               [Image(image), Text("a red"), Text("circle here", target=True)]]
    return bb.assemble(prompts, padding_side="right")


def _logits(bb, batch):
    with torch.no_grad():
        return bb(batch, with_loss=True).logits


def _layer_outputs(bb):
    """Observers on every steered layer, registered before the steering so they see each layer's own output."""
    seen: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).clone()))
               for layer in steered_layers(bb)]
    return seen, handles


def test_a_zero_vector_leaves_the_logits_bit_identical(bb):
    batch = _batch(bb)
    before = _logits(bb, batch)
    shifts = torch.zeros(len(steered_layers(bb)), bb.hidden_size)
    with steer(bb, shifts, preserve_norm=False):
        assert torch.equal(_logits(bb, batch), before)
    with steer(bb, shifts, preserve_norm=True):  # rescaled to its own norm: equal up to rounding
        torch.testing.assert_close(_logits(bb, batch), before)
    assert torch.equal(_logits(bb, batch), before)  # hooks gone on exit


def test_a_vector_at_layer_l_changes_nothing_before_it(bb):
    batch = _batch(bb)
    n = len(steered_layers(bb))
    seen, handles = _layer_outputs(bb)
    _logits(bb, batch)
    clean, seen[:] = list(seen), []
    shifts = torch.zeros(n, bb.hidden_size)
    shifts[n - 1] = 3.0  # the last layer: every earlier output must stay put
    with steer(bb, shifts):
        steered = _logits(bb, batch)
    for h in handles:
        h.remove()
    assert len(seen) == n == len(clean)
    # each layer's own output (before its shift): unchanged up to and including layer n - 1 (up to the CPU kernels'
    # rounding, which can differ between two runs of the same layer on the same input)
    for i in range(n):
        # T5's unnormalised residual stream reaches ~100: its rounding noise is relative to that scale
        scale = float(clean[i].abs().max())
        torch.testing.assert_close(seen[i], clean[i], rtol=0, atol=1e-5 + 2e-6 * scale, msg=f"layer {i} changed")
    assert (steered - _logits(bb, batch)).abs().max() > 1e-3  # ...and the shift reached the logits


def test_a_vector_at_the_first_layer_changes_the_later_ones(bb):
    batch = _batch(bb)
    n = len(steered_layers(bb))
    if n < 2:
        pytest.skip("one layer")
    seen, handles = _layer_outputs(bb)
    _logits(bb, batch)
    clean, seen[:] = list(seen), []
    shifts = torch.zeros(n, bb.hidden_size)
    shifts[0] = 3.0
    with steer(bb, shifts):
        _logits(bb, batch)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen[0], clean[0], rtol=0, atol=1e-5 + 2e-6 * float(clean[0].abs().max()))
    assert (seen[1] - clean[1]).abs().max() > 1e-3


def test_the_position_mask_is_respected(bb):
    if bb.is_encoder_decoder:
        pytest.skip("the encoder is bidirectional: a shift at one position reaches every position")
    batch = _batch(bb)
    before = _logits(bb, batch)
    p = int(batch.attention_mask.sum(dim=1).min()) - 3
    mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    mask[:, p] = True
    shifts = torch.full((len(steered_layers(bb)), bb.hidden_size), 3.0)
    with steer(bb, shifts, positions=mask):
        after = _logits(bb, batch)
    torch.testing.assert_close(after[:, :p], before[:, :p])  # causal: nothing before p moves
    assert (after[:, p] - before[:, p]).abs().max() > 1e-3


def test_the_encoder_decoder_family_steers_its_encoder_blocks_only(tmp_path):
    bb = load_backbone("blip2", str(save_tiny("blip2_t5", tmp_path / "t5")))
    layers = steered_layers(bb)
    assert layers == list(bb.language_model.encoder.block)
    assert not any(layer is block for layer in layers for block in bb.language_model.decoder.block)


class _Toy:
    """A backbone as the hook sees it: layers of a known class inside `language_model`."""

    family, is_encoder_decoder, decoder_layer_cls = "toy", False, torch.nn.Linear

    def __init__(self) -> None:
        self.language_model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


@pytest.mark.parametrize("shift_generated", [True, False])
def test_cached_generation_steps_are_shifted_as_asked(shift_generated):
    toy = _Toy()
    steering = ResidualSteering(toy, lambda: torch.ones(2, 4), preserve_norm=False, shift_generated=shift_generated)
    steering.positions = torch.tensor([[True, False, False]])  # the prompt: 3 positions, shifted at the first only
    x = torch.randn(1, 3, 4)
    layer = toy.language_model[0]
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    out = layer(x)
    assert torch.equal(out[:, 1:], plain[:, 1:]) and torch.allclose(out[:, 0], plain[:, 0] + 1)
    step = torch.randn(1, 1, 4)  # one new token with the KV cache: not the mask's length
    plain_step = torch.nn.functional.linear(step, layer.weight, layer.bias)
    expected = plain_step + 1 if shift_generated else plain_step
    assert torch.allclose(layer(step), expected)
    steering.remove()
    assert torch.equal(layer(step), plain_step)


def test_shift_hidden_keeps_each_positions_norm():
    h = torch.randn(2, 5, 8)
    out = shift_hidden(h, torch.randn(8) * 10, preserve_norm=True)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1))
    assert not torch.allclose(out, h)


def test_a_site_the_family_lacks_is_named():
    with pytest.raises(ValueError, match="no `.mlp`"):
        steered_layers(_Toy(), site="mlp")
