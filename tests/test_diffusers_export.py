"""The diffusers export must load with `load_lora_weights` and act exactly like the peft-wrapped UNet."""
import peft
import pytest
import torch

from w2w_core.config import ModelConfig
from w2w_core.layout import LoraLayout
from w2w_core.model import load_base_model


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


@pytest.mark.parametrize("lora", [{}, dict(rank=2, alpha=2, targets=("to_q", "to_v", "conv1", "conv2"))],
                         ids=["published-qv", "conv"])
def test_diffusers_export_equals_peft(tmp_path, tiny_model_dir, lora):
    base = load_base_model(ModelConfig(path=str(tiny_model_dir)), device="cpu")
    layout = LoraLayout.from_unet(base.unet, **lora)
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(layout.numel, generator=g) * 0.05

    plain = _unet_out(base.unet)

    # Reference: peft adapter injected into the UNet, weights set from the vector.
    peft_unet = load_base_model(ModelConfig(path=str(tiny_model_dir)), device="cpu").unet
    peft_unet = peft.inject_adapter_in_model(layout.peft_config(), peft_unet)
    result = peft.set_peft_model_state_dict(peft_unet, layout.unflatten(vec))
    assert not result.unexpected_keys
    expected = _unet_out(peft_unet)

    # Export, then load through diffusers' public API.
    layout.save_diffusers(vec, tmp_path / "lora")
    pipe = base.pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    got = _unet_out(pipe.unet)

    assert not torch.allclose(plain, expected, atol=1e-4), "the LoRA should change the output"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
