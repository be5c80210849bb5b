"""Rendering many models in one call (w2w_core.render.generate_models) equals rendering each alone
through peft's adapter (LoraSlot), for linear and conv LoRAs, with and without classifier-free
guidance, per-model prompts and timestep-gated edits."""
from __future__ import annotations

import pytest
import torch

from w2w_core.config import ModelConfig
from w2w_core.layout import LoraLayout
from w2w_core.model import load_base_model
from w2w_core.multi_lora import MultiLoraSlot
from w2w_core.render import LoraSlot, generate, generate_gated, generate_models

STEPS = 3


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    base = load_base_model(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    layout = LoraLayout.from_unet(base.unet, 2, 2.0, ["to_q", "to_v", "conv1"])
    vectors = torch.randn(3, layout.numel, generator=torch.Generator().manual_seed(0)) * 0.3
    return base, layout, vectors


def one_by_one(base, layout, vectors, prompts, seeds, **kw):
    with LoraSlot(base, layout) as slot:
        out = []
        for k, v in enumerate(vectors):
            slot.set(v)
            out.append(generate(base, prompts[k], seed=seeds, steps=STEPS, output_type="pt", **kw))
    return torch.stack(out)


@pytest.mark.parametrize("guidance", [4.0, 1.0])  # two batch copies (CFG) and one
def test_many_models_in_one_call_equal_each_alone(setup, guidance):
    base, layout, vectors = setup
    prompts = [["sks person", "a photo of sks person"], ["sks person, male", "sks person"], ["sks person", "sks"]]
    seeds = [0, 1]
    many = generate_models(base, layout, vectors, prompts, seeds, steps=STEPS, guidance_scale=guidance)
    alone = one_by_one(base, layout, vectors, prompts, seeds, guidance_scale=guidance)
    assert many.shape == alone.shape == (3, 2, 3, base.resolution, base.resolution)
    torch.testing.assert_close(many, alone, atol=1e-4, rtol=0)
    assert (alone[0] - alone[1]).abs().mean() > 1e-3  # the models do differ, so a mixed-up batch would show
    # split over calls (2 models x 2 seeds, then 1): the same images, progress after each call
    calls = []
    chunked = generate_models(base, layout, list(vectors), prompts, seeds, steps=STEPS, guidance_scale=guidance,
                              images_per_call=4, progress=lambda done, total: calls.append((done, total)))
    torch.testing.assert_close(chunked, alone, atol=1e-4, rtol=0)
    assert calls == [(2, 3), (3, 3)]
    # the UNet is bare again: the multi-LoRA modules are gone
    assert not any("MultiLora" in type(m).__name__ for m in base.unet.modules())


def test_gated_many_equals_gated_alone(setup):
    base, layout, vectors = setup
    edited = vectors.flip(0) * 2
    many = generate_models(base, layout, vectors, ["sks person"], [0], steps=STEPS, edited=edited, edit_start=0.5)
    with LoraSlot(base, layout) as slot:
        alone = torch.stack([generate_gated(base, slot, v, e, 0.5, ["sks person"], seed=[0], steps=STEPS, output_type="pt")
                             for v, e in zip(vectors, edited)])
    torch.testing.assert_close(many, alone, atol=1e-4, rtol=0)


def test_multi_lora_slot_refuses_a_unet_with_an_adapter_and_bad_shapes(setup):
    base, layout, vectors = setup
    with LoraSlot(base, layout):
        with pytest.raises(RuntimeError, match="already carries a LoRA adapter"):
            MultiLoraSlot(base, layout, 2)
    with MultiLoraSlot(base, layout, 2) as slot:
        with pytest.raises(ValueError, match=r"expected \(2, "):
            slot.set(vectors)
    with pytest.raises(ValueError, match="prompts"):
        generate_models(base, layout, vectors, [["a"], ["b"]], [0])
