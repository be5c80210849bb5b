"""Inversion mechanics on a random tiny model (quality is measured on the real tiny world in test_e2e)."""
import pytest
import torch

from w2w_core.invert import PRESETS, invert, invert_batch
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


def test_batch_fits_each_image_as_alone(setup):
    """invert_batch is a faster way to run invert several times: every image's fit (coefficients, losses) is the
    one invert makes for it alone with the same seed, masks included, and the base is left without adapters."""
    base, layout, mean, std, components, image = setup
    g = torch.Generator().manual_seed(1)
    images = torch.stack([image, torch.rand(3, 64, 64, generator=g) * 2 - 1, image.flip(-1)])
    masks = torch.ones(3, 64, 64)
    masks[1, :, :32] = 0
    alone = [invert(base, layout, mean, std, components, images[i], steps=5, lr=0.5, seed=3, mask=masks[i])
             for i in range(3)]
    together = invert_batch(base, layout, mean, std, components, images, steps=5, lr=0.5, seed=3, masks=masks)
    assert len(together) == 3
    for a, b in zip(alone, together):
        assert a.coefficients.abs().max() > 0.1, "the fit did not move"
        torch.testing.assert_close(b.coefficients, a.coefficients, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(a.losses), atol=1e-5, rtol=1e-4)
    # different images really got different fits (not one fit copied N times)
    assert (together[0].coefficients - together[1].coefficients).abs().max() > 1e-3
    assert not any("lora" in n or n.endswith((".A", ".B")) for n, _ in base.unet.named_parameters())
    with pytest.raises(ValueError, match="masks"):
        invert_batch(base, layout, mean, std, components, images, steps=1, masks=masks[:2])
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        invert_batch(base, layout, mean, std, components, torch.stack([image, image * float("nan")]), steps=1)
    with LoraSlot(base, layout):  # a render adapter left on the UNet: said, with the fix
        with pytest.raises(RuntimeError, match="inversion need the bare base UNet"):
            invert(base, layout, mean, std, components, image, steps=1)


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


def test_cosine_lr_schedule_decays_the_steps(setup, monkeypatch):
    """lr_schedule="cosine" takes Adam from lr to 0 over the steps (what the report inverts with); constant, the
    published recipe, is the default; batching keeps each fit its own under the schedule too."""
    import math

    from jobs.commands._common import INVERSION_LR_SCHEDULES
    from w2w_core.invert import LR_SCHEDULES

    base, layout, mean, std, components, image = setup
    seen: list[float] = []
    adam_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    decayed = invert(base, layout, mean, std, components, image, steps=5, lr=2.0, lr_schedule="cosine", seed=2)
    expected = [2.0 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)]
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(expected))
    seen.clear()
    constant = invert(base, layout, mean, std, components, image, steps=5, lr=2.0, seed=2)
    assert seen == [2.0] * 5
    assert (decayed.coefficients - constant.coefficients).abs().max() > 1e-3, "the schedule did not change the fit"
    assert decayed.losses[0] == constant.losses[0]  # the same draws; only the steps' sizes differ
    monkeypatch.undo()

    g = torch.Generator().manual_seed(4)
    images = torch.stack([image, torch.rand(3, 64, 64, generator=g) * 2 - 1])
    alone = [invert(base, layout, mean, std, components, images[i], steps=4, lr=1.0, lr_schedule="cosine", seed=5)
             for i in range(2)]
    together = invert_batch(base, layout, mean, std, components, images, steps=4, lr=1.0, lr_schedule="cosine", seed=5)
    for a, b in zip(alone, together):
        torch.testing.assert_close(b.coefficients, a.coefficients, atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match="lr_schedule 'linear'.*constant, cosine"):
        invert(base, layout, mean, std, components, image, steps=1, lr_schedule="linear")
    assert INVERSION_LR_SCHEDULES == LR_SCHEDULES  # the CLIs' choices (spelled out there to keep --help light)
