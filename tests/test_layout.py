import json

import peft
import pytest
import torch

from w2w_core.layout import LayoutMismatchError, LoraLayout
from w2w_core.model import SD15_UNET, TINY_UNET


@pytest.fixture(scope="module")
def sd15_layout():
    return LoraLayout.from_unet_config(SD15_UNET, rank=1, alpha=27, targets=("to_q", "to_v"))


@pytest.fixture(scope="module")
def tiny_layout():
    return LoraLayout.from_unet_config(TINY_UNET)


def test_sd15_layout_has_published_size(sd15_layout):
    assert sd15_layout.numel == 99_648
    assert sd15_layout.num_tensors == 128
    assert len(sd15_layout.modules) == 64


def test_sd15_layout_follows_peft_state_dict_order(sd15_layout):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET)
    unet = peft.inject_adapter_in_model(sd15_layout.peft_config(), unet)
    state = peft.get_peft_model_state_dict(unet)
    assert sd15_layout.keys == list(state)
    assert [sd15_layout.shapes[k] for k in state] == [tuple(v.shape) for v in state.values()]
    # peft orders down, up, mid: the release's down, mid, up order must be mapped by name.
    first_up = next(i for i, k in enumerate(sd15_layout.keys) if k.startswith("up_blocks"))
    first_mid = next(i for i, k in enumerate(sd15_layout.keys) if k.startswith("mid_block"))
    assert first_up < first_mid


def test_offsets_tile_the_vector(sd15_layout):
    stops = 0
    for key in sd15_layout.keys:
        start, stop = sd15_layout.offsets[key]
        assert start == stops
        stops = stop
    assert stops == sd15_layout.numel
    a_key = sd15_layout.keys[0]
    assert sd15_layout.shapes[a_key] == (1, 320)  # lora_A of a 320-wide to_q, rank 1


def test_flatten_unflatten_round_trip_is_exact(tiny_layout):
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(tiny_layout.numel, generator=g)
    state = tiny_layout.unflatten(vec)
    assert list(state) == tiny_layout.keys
    assert torch.equal(tiny_layout.flatten(state), vec)
    state2 = tiny_layout.unflatten(tiny_layout.flatten(state))
    assert all(torch.equal(state[k], state2[k]) for k in state)


def test_flatten_rejects_wrong_keys_and_shapes(tiny_layout):
    state = tiny_layout.unflatten(torch.zeros(tiny_layout.numel))
    missing = dict(state)
    missing.pop(tiny_layout.keys[3])
    with pytest.raises(LayoutMismatchError, match="1 missing"):
        tiny_layout.flatten(missing)
    bad_shape = dict(state)
    bad_shape[tiny_layout.keys[0]] = torch.zeros(2, 2)
    with pytest.raises(LayoutMismatchError, match="shape"):
        tiny_layout.flatten(bad_shape)
    with pytest.raises(LayoutMismatchError, match="does not fit"):
        tiny_layout.unflatten(torch.zeros(tiny_layout.numel + 1))


def test_json_round_trip_and_fingerprint(sd15_layout, tiny_layout):
    again = LoraLayout.from_json(sd15_layout.to_json())
    assert again == sd15_layout
    assert again.fingerprint == sd15_layout.fingerprint
    assert tiny_layout.fingerprint != sd15_layout.fingerprint
    data = json.loads(sd15_layout.to_json())
    data["numel"] = 5
    with pytest.raises(LayoutMismatchError, match="numel"):
        LoraLayout.from_dict(data)


def test_safetensors_save_load(tmp_path, tiny_layout):
    vec = torch.randn(tiny_layout.numel)
    path = tiny_layout.save(vec, tmp_path / "model.safetensors", metadata={"identity": "x"})
    assert torch.equal(tiny_layout.load(path), vec)
    other = LoraLayout.from_unet_config(TINY_UNET, rank=2)
    with pytest.raises(LayoutMismatchError):
        other.load(path)
    with pytest.raises(FileNotFoundError):
        tiny_layout.load(tmp_path / "missing.safetensors")


def test_layout_from_unet_matches_config(tiny_layout):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_UNET)
    assert LoraLayout.from_unet(unet) == tiny_layout


def test_conv_targets_follow_peft_conv_lora():
    """LoRA on convolutions (issue 14): the layout takes peft's conv LoRA shapes, A (r, in, kh, kw)
    with the base kernel and B (out, r, 1, 1), and round-trips them exactly."""
    layout = LoraLayout.from_unet_config(TINY_UNET, rank=4, alpha=4, targets=("to_q", "to_v", "conv1", "conv2"))
    convs = [k for k in layout.keys if ".resnets." in k]
    assert convs and all(k.split(".")[-3] in ("conv1", "conv2") for k in convs)
    assert layout.shapes["down_blocks.1.resnets.0.conv1.lora_A.weight"] == (4, 32, 3, 3)
    assert layout.shapes["down_blocks.1.resnets.0.conv1.lora_B.weight"] == (64, 4, 1, 1)
    qv = LoraLayout.from_unet_config(TINY_UNET, rank=4, alpha=4, targets=("to_q", "to_v"))
    assert layout.numel == qv.numel + sum(layout.offsets[k][1] - layout.offsets[k][0] for k in convs)
    vec = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layout.flatten(layout.unflatten(vec)), vec)
    assert LoraLayout.from_json(layout.to_json()) == layout
