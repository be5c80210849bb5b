"""Release-format import: files written exactly as the release ships them (tiny layout), read by name."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from w2w_core.layout import LayoutMismatchError, LoraLayout, module_of
from w2w_core.model import TINY_UNET
from w2w_core.release import peft_to_kohya, release_permutation
from w2w_core.space import WeightSpace


@pytest.fixture(scope="module")
def layout():
    return LoraLayout.from_unet_config(TINY_UNET)


def release_order(layout):
    """Data-flow order (down, mid, up), A then B per module, attn1 before attn2, to_q before to_v."""
    def block_rank(module):
        return {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[module.split(".")[0]]

    modules = sorted(layout.modules, key=lambda m: (block_rank(m), layout.modules.index(m)))
    keys = []
    for m in modules:
        keys += [f"{m}.lora_A.weight", f"{m}.lora_B.weight"]
    return keys


def test_kohya_names():
    assert (
        peft_to_kohya("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    )
    assert peft_to_kohya("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight").endswith(
        "mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight"
    )


def write_release(tmp_path, layout, n=300, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = release_order(layout)
    assert keys != layout.keys  # release order (down, mid, up) differs from peft's (down, up, mid)
    assert [module_of(k) for k in keys[-8:]][0].startswith("up_blocks")
    dims = OrderedDict((peft_to_kohya(k), [(int(torch.tensor(layout.shapes[k]).prod()),), torch.Size(layout.shapes[k])])
                       for k in keys)
    d = layout.numel
    # ground truth in OUR order, then permuted to release order by name
    mean = torch.randn(d, generator=g)
    std = torch.rand(d, generator=g) + 0.5
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    comps = q.T.float()  # (k, d) ours
    coeffs = torch.randn(n, k, generator=g) * torch.linspace(3, 1, k)
    ours_to_release = lambda v: torch.cat([v[..., slice(*layout.offsets[key])] for key in keys], dim=-1)  # noqa: E731
    torch.save(dims, tmp_path / "weight_dimensions.pt")
    torch.save(ours_to_release(mean).reshape(1, d), tmp_path / "mean.pt")
    torch.save(ours_to_release(std), tmp_path / "std.pt")
    torch.save(ours_to_release(comps).T.contiguous(), tmp_path / "V.pt")  # (d, k)
    torch.save(coeffs, tmp_path / "proj_1000pc.pt")
    male = (coeffs[:, 0] > 0).to(torch.int64) * 2 - 1  # CelebA style -1/1
    torch.save({"file": [f"id{i}" for i in range(n)], "Male": male, "Young": [int(i % 2) for i in range(n)]},
               tmp_path / "identity_df.pt")
    return mean, std, comps, coeffs


def test_release_permutation_maps_by_name(tmp_path, layout):
    keys = release_order(layout)
    dims = OrderedDict((peft_to_kohya(k), [(int(torch.tensor(layout.shapes[k]).prod()),), torch.Size(layout.shapes[k])])
                       for k in keys)
    perm = release_permutation(dims, layout)
    release_vec = torch.arange(layout.numel)  # value = release position
    ours = release_vec[perm]
    # the first value of our mid_block tensor sits where the release put mid_block (before up_blocks)
    for key in layout.keys:
        rel_start = sum(int(torch.tensor(layout.shapes[k]).prod()) for k in keys[: keys.index(key)])
        s, e = layout.offsets[key]
        assert torch.equal(ours[s:e], torch.arange(rel_start, rel_start + e - s)), key
    assert not torch.equal(perm, torch.arange(layout.numel))


def test_release_round_trip(tmp_path, layout):
    mean, std, comps, coeffs = write_release(tmp_path, layout)
    space = WeightSpace.from_release(tmp_path, layout)
    assert torch.allclose(space.mean, mean) and torch.allclose(space.std, std)
    assert torch.allclose(space.components, comps, atol=1e-6)
    # a model built in our order projects to its coefficients
    w = space.reconstruct(coeffs[3])
    assert torch.allclose(w, mean + std * (coeffs[3] @ comps), atol=1e-5)
    assert torch.allclose(space.project(w), coeffs[3], atol=1e-4)
    assert space.identities[3] == "id3"
    assert set(space.attribute_names) == {"Male", "Young"}
    assert torch.equal(space.labels["Male"], (coeffs[:, 0] > 0).float())
    assert space.directions["Male"] @ torch.eye(5)[0] > 0.5  # male is planted on PC 1
    sd = space.to_lora(w)
    assert torch.equal(layout.flatten(sd), w)


def test_release_rejects_mismatched_names(tmp_path, layout):
    write_release(tmp_path, layout)
    dims = torch.load(tmp_path / "weight_dimensions.pt", weights_only=True)
    first = next(iter(dims))
    dims = OrderedDict((k.replace("attn1", "attnX") if k == first else k, v) for k, v in dims.items())
    torch.save(dims, tmp_path / "weight_dimensions.pt")
    with pytest.raises(LayoutMismatchError, match="not in the release"):
        WeightSpace.from_release(tmp_path, layout)
