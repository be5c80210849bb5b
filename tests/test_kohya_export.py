"""The kohya-format LoRA (what A1111, ComfyUI and kohya's scripts load) must mean the same model.

Checked through diffusers' own kohya loader (`load_lora_weights`, then `fuse_lora`) against the
layout's merge W + alpha/rank * B @ A, at the full SD1.5 UNet shape (320/640/1280/1280 channels),
on attention and conv modules. Alpha must be read from the file: with rank 1 and alpha 27, a
loader that defaulted alpha to the rank would be 27x off.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd15_fixture import SD15_CHANNELS, SMALL_TEXT, SMALL_VAE, sd15_lora_numel, sd15_unet_config
from w2w_core.layout import LayoutMismatchError, LoraLayout, kohya_name, module_of
from w2w_core.model import clip_text_encoder, tiny_tokenizer

TARGETS = ("to_q", "to_v", "conv1")  # attention (linear) and resnet conv1 (3x3 conv) modules


def _vector(layout, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.numel, generator=g) * scale


@pytest.fixture(scope="module")
def sd15_unet():
    """The full-size SD1.5 UNet (859.5M parameters), allocated without its random init (~30 s on
    2 cores): zeros, except the adapted modules' weights, which are random so fusing is visible."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd15_unet_config(SD15_CHANNELS))
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.zero_()
        for name, m in unet.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return unet.eval().requires_grad_(False)


def test_kohya_file_loads_in_diffusers_like_the_layout_merge(tmp_path, sd15_unet):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers import AutoencoderKL

    layout = LoraLayout.from_unet(sd15_unet, rank=1, alpha=27, targets=TARGETS)
    attn = [m for m in layout.modules if m.endswith(("to_q", "to_v"))]
    convs = [m for m in layout.modules if m.endswith("conv1")]
    assert len(attn) == 64 and len(convs) == 22  # 16 transformer blocks x 4; 22 resnets
    assert sum(math.prod(layout.shapes[k]) for k in layout.keys if module_of(k) in attn) == sd15_lora_numel()
    vec = _vector(layout)
    targets = {f"{m}.weight": sd15_unet.get_submodule(m).weight.detach().clone() for m in layout.modules}
    expected = layout.merge(vec, targets)

    path = layout.save_kohya(vec, tmp_path / "w2w_identity")
    assert path == tmp_path / "w2w_identity" / "w2w_identity.safetensors"
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SMALL_VAE), text_encoder=clip_text_encoder(tokenizer, **SMALL_TEXT), tokenizer=tokenizer,
        unet=sd15_unet, scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter modules

    for module in layout.modules:
        got = pipe.unet.get_submodule(module).weight
        torch.testing.assert_close(got, expected[f"{module}.weight"], atol=1e-6, rtol=1e-5, msg=module)
    # alpha honoured: the fused change is 27 x (up @ down), not 1 x (a loader defaulting alpha to rank)
    state = layout.unflatten(vec)
    for module in (attn[0], convs[-1]):
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        delta = pipe.unet.get_submodule(module).weight - targets[f"{module}.weight"]
        ratio = delta.flatten().double() @ (b.flatten(1) @ a.flatten(1)).flatten().double()
        ratio /= (b.flatten(1) @ a.flatten(1)).double().square().sum()
        assert abs(ratio.item() - 27.0) < 1e-3, (module, ratio.item())


def test_kohya_keys_metadata_and_round_trip(tmp_path, tiny_model_dir):
    from w2w_core.config import ModelConfig
    from w2w_core.model import load_base_model

    unet = load_base_model(ModelConfig(path=str(tiny_model_dir)), device="cpu").unet
    layout = LoraLayout.from_unet(unet, rank=2, alpha=27, targets=("to_q", "to_v", "conv1"))
    vec = _vector(layout, seed=3)
    path = layout.save_kohya(vec, tmp_path / "lora.safetensors", metadata={"source": "test"})
    assert path == tmp_path / "lora.safetensors"

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    names = {kohya_name(m) for m in layout.modules}
    assert keys == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert any(".conv1" in m for m in layout.modules) and any(n.endswith("_attn1_to_q") for n in names)
    assert all(a.ndim == 0 and a.item() == 27.0 for a in alphas.values())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "27.0" and meta["source"] == "test"
    assert LoraLayout.from_json(meta["w2w_layout"]) == layout

    torch.testing.assert_close(layout.load(path), vec)  # `w2w edit --lora file` reads kohya files too

    # a file trained with another alpha means the same model once its alpha is folded into lora_up
    state = layout.to_kohya(vec)
    for key in [k for k in state if k.endswith(".alpha")]:
        state[key] = torch.tensor(54.0)
        up = key.replace(".alpha", ".lora_up.weight")
        state[up] = state[up] / 2
    save_file(state, str(tmp_path / "alpha54.safetensors"))
    torch.testing.assert_close(layout.load(tmp_path / "alpha54.safetensors"), vec)


def test_kohya_names_not_in_the_layout_are_refused(tmp_path, tiny_model_dir):
    from w2w_core.config import ModelConfig
    from w2w_core.model import load_base_model

    unet = load_base_model(ModelConfig(path=str(tiny_model_dir)), device="cpu").unet
    layout = LoraLayout.from_unet(unet, rank=1, alpha=27, targets=("to_q", "to_v"))
    state = layout.to_kohya(_vector(layout))
    state["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"] = torch.zeros(1, 4, 3, 3)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(LayoutMismatchError, match="lora_unet_mid_block_resnets_0_conv1.*not in this layout"):
        layout.load(tmp_path / "other.safetensors")
    assert json.loads(layout.to_json())["alpha"] == 27.0


def test_cli_sample_edit_invert_write_kohya(tmp_path, capsys):
    """`--format kohya` on the three commands that save LoRAs: the files hold the models they rendered."""
    import numpy as np
    from PIL import Image

    from jobs.cli import main
    from subspace_helpers import planted_data, tiny_layout, write_store
    from w2w_core.space import WeightSpace

    out = tmp_path / "space"
    x, labels, _ = planted_data(24, tiny_layout().numel, rank=4, noise=0.2, seed=3)
    write_store(out, x, labels)
    assert main(["pca", str(out), "-k", "4"]) == 0 and main(["directions", str(out)]) == 0
    space = WeightSpace.load(out)
    attribute = sorted(space.directions)[0]
    fast = ["--render-steps", "1"]

    assert main(["sample", str(out), "--n", "2", "--sample-seed", "7", "--save-loras", str(tmp_path / "s"),
                 "--format", "kohya", "--out", str(tmp_path / "s.png"), *fast]) == 0
    for i, vec in enumerate(space.sample(2, seed=7)):
        path = tmp_path / "s" / f"sample_{i}" / f"sample_{i}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            assert all(k.startswith("lora_unet_") for k in f.keys())
        torch.testing.assert_close(space.layout.load(path), vec)
    assert not (tmp_path / "s" / "sample_0" / "pytorch_lora_weights.safetensors").exists()

    assert main(["edit", str(out), "--sample-seed", "7", "--attribute", attribute, "--strengths=0,1",
                 "--save-loras", str(tmp_path / "e"), "--format", "kohya", "--out", str(tmp_path / "e.png"), *fast]) == 0
    base = space.sample(1, seed=7)[0]
    edited = space.layout.load(tmp_path / "e" / f"{attribute}_+1" / f"{attribute}_+1.safetensors")
    torch.testing.assert_close(edited, space.edit(base, {attribute: 1.0}))

    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "face.png")
    assert main(["invert", str(out), str(tmp_path / "face.png"), "--steps", "1", "--components", "3", "--format", "kohya",
                 "--save-lora", str(tmp_path / "inv"), "--out", str(tmp_path / "i.png"), *fast]) == 0
    torch.testing.assert_close(space.layout.load(tmp_path / "inv" / "inv.safetensors"),
                               space.layout.load(tmp_path / "inv" / "w2w_model.safetensors"))
    capsys.readouterr()
