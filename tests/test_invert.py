"""Inversion mechanics on a random tiny model (quality is measured on the real tiny world in test_e2e)."""
import pytest
import torch

from w2w_core.invert import PRESETS, invert
from w2w_core.layout import LoraLayout
from w2w_core.model import random_tiny_base
from w2w_core.render import LoraSlot


@pytest.fixture(scope="module")
def setup():
    base = random_tiny_base(0)
    layout = LoraLayout.from_unet(base.unet)
    g = torch.Generator().manual_seed(0)
    components = torch.linalg.qr(torch.randn(layout.numel, 5, generator=g))[0].T
    mean = torch.randn(layout.numel, generator=g) * 0.01
    std = torch.full((layout.numel,), 0.05)
    image = torch.rand(3, 64, 64, generator=g) * 2 - 1
    return base, layout, mean, std, components, image


def test_gradients_reach_only_the_coefficients(setup):
    base, layout, mean, std, components, image = setup
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    seen_grads = []

    def spy(step, loss):
        seen_grads.append([n for n, p in base.unet.named_parameters() if p.grad is not None])

    result = invert(base, layout, mean, std, components, image, steps=6, lr=0.1, progress=spy)
    assert all(not names for names in seen_grads), "a base (or adapter) parameter received a gradient"
    assert result.coefficients.shape == (5,)
    assert result.coefficients.abs().sum() > 0, "the coefficients did not move"
    # Frozen base unchanged, and the temporary adapter removed again.
    after = dict(base.unet.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(before[n], after[n]) for n in before)
    # The returned vector lies in the space: mean + std * (c @ V).
    expected = mean + (result.coefficients @ components) * std
    torch.testing.assert_close(result.vector, expected, atol=1e-6, rtol=1e-5)


def test_deterministic_given_seed(setup):
    base, layout, mean, std, components, image = setup
    a = invert(base, layout, mean, std, components, image, steps=3, seed=7)
    b = invert(base, layout, mean, std, components, image, steps=3, seed=7)
    assert torch.equal(a.coefficients, b.coefficients)


def test_mask_changes_the_objective(setup):
    base, layout, mean, std, components, image = setup
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    plain = invert(base, layout, mean, std, components, image, steps=2, seed=1)
    masked = invert(base, layout, mean, std, components, image, steps=2, seed=1, mask=mask)
    assert plain.losses[0] != masked.losses[0]


def test_components_capped_and_bad_inputs(setup):
    base, layout, mean, std, components, image = setup
    result = invert(base, layout, mean, std, components, image, steps=1, n_components=10_000)
    assert result.components == 5
    with pytest.raises(ValueError, match="n_components"):
        invert(base, layout, mean, std, components, image, steps=1, n_components=0)
    with pytest.raises(ValueError, match="NaN"):
        invert(base, layout, mean, std, components, image * float("nan"), steps=1)
    with pytest.raises(ValueError, match="shape"):
        invert(base, layout, mean, std, components, image[0], steps=1)
    assert PRESETS["in"]["components"] == 10_000 and PRESETS["out"]["lr"] == 1.0


def test_slot_sets_weights_and_is_removable(setup):
    base, layout, *_ = setup
    vec = torch.randn(layout.numel)
    with LoraSlot(base, layout) as slot:
        params = dict(base.unet.named_parameters())
        key = layout.keys[1]
        start, stop = layout.offsets[key]
        assert torch.equal(params[slot.param_names[key]].flatten(), vec[start:stop]) is False
        slot.set(vec)
        assert torch.equal(params[slot.param_names[key]].flatten(), vec[start:stop])
    assert not any("lora" in n for n, _ in base.unet.named_parameters())
