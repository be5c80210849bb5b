"""WeightSpace: load, project/reconstruct, sample, edit, nearest, LoRA export, pipeline; import hygiene."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from subspace_helpers import tiny_layout, write_space
from w2w_core.space import WeightSpace

N, K = 80, 10


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("space_store")
    x = write_space(out, N, K, quarantine={"id0007": "nan loss"}, disentangle={"beard": ["male"]})
    return out, x


@pytest.fixture(scope="module")
def space(built):
    return WeightSpace.load(built[0])


def test_load_and_project_reconstruct(space, built):
    out, x = built
    assert space.k == K and space.numel == x.shape[1] and space.layout == tiny_layout()
    assert "id0007" not in space.identities and len(space.identities) == N - 1
    assert space.attribute_names == ["male", "beard", "young"]  # the manifest's order, not the file's hash order
    torch.testing.assert_close(space.components @ space.components.T, torch.eye(K), atol=1e-5, rtol=0)
    # training models: projection = stored coefficients
    rows = [int(i[2:]) for i in space.identities]
    torch.testing.assert_close(space.project(torch.from_numpy(x[rows])), space.coefficients, atol=2e-3, rtol=1e-4)
    c = torch.randn(3, K)
    torch.testing.assert_close(space.project(space.reconstruct(c)), c, atol=1e-4, rtol=1e-4)
    assert space.reconstruct(c[:, :4]).shape == (3, space.numel)


def test_sample_statistics_match_training_coefficients(space):
    w = space.sample(4000, seed=0)
    assert w.shape == (4000, space.numel)
    c = space.project(w)
    torch.testing.assert_close(c.mean(0), space.coefficients.mean(0), atol=0.08 * float(space.coef_std.max()), rtol=0)
    torch.testing.assert_close(c.std(0), space.coefficients.std(0), rtol=0.05, atol=1e-3)
    assert torch.equal(space.sample(2, seed=5), space.sample(2, seed=5))


def test_edit_moves_projection_by_calibrated_amount(space):
    w = space.reconstruct(space.coefficients[0]) + 0.01  # off-subspace residual must survive
    e = space.edit(w, {"beard": 1.0, "young": -0.5})
    expected = space.strengths["beard"] * space.directions["beard"] - 0.5 * space.strengths["young"] * space.directions["young"]
    torch.testing.assert_close(space.project(e) - space.project(w), expected, atol=1e-4, rtol=1e-4)
    d_beard = space.attribute_score(space.edit(w, {"beard": 2.0}), "beard") - space.attribute_score(w, "beard")
    assert abs(float(d_beard) - 2 * space.strengths["beard"]) < 1e-3
    # beard was disentangled from male: a beard edit leaves the male score unchanged
    d_male = space.attribute_score(space.edit(w, {"beard": 3.0}), "male") - space.attribute_score(w, "male")
    assert abs(float(d_male)) < 1e-3
    with pytest.raises(ValueError, match="valid attributes: beard, male, young"):
        space.edit(w, {"hat": 1.0})


def test_strength_is_spread_of_training_projections(space):
    proj = space.coefficients @ space.directions["young"]
    assert abs(float(proj.std()) - space.strengths["young"]) < 1e-4
    assert float(space.directions["young"].norm()) == pytest.approx(1.0, abs=1e-5)


def test_nearest_uses_coefficients(space, built):
    _, x = built
    hits = space.nearest(x[12], k=3)
    assert hits[0][0] == "id0012" and hits[0][1] < 1e-2
    assert len(hits) == 3 and hits[1][1] >= hits[0][1]


def test_to_lora_round_trip_and_diffusers_export(space, tmp_path):
    w = space.sample(1, seed=1)[0]
    sd = space.to_lora(w)
    assert list(sd) == space.layout.keys
    assert torch.equal(space.layout.flatten(sd), w)
    path = space.save_lora(w, tmp_path / "lora")
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert set(loaded) == {f"unet.{k}" for k in space.layout.keys}
    torch.testing.assert_close(space.layout.flatten({k[5:]: v for k, v in loaded.items()}), w)


def test_pipeline_loads_lora_on_tiny_model(space, tiny_model_dir):
    from w2w_core.config import ModelConfig

    w = space.sample(1, seed=2)[0]
    pipe = space.pipeline(w, ModelConfig(path=str(tiny_model_dir), device="cpu"))
    from peft.tuners.lora import LoraLayer

    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(space.layout.modules)
    key = space.layout.keys[0]
    module = pipe.unet.get_submodule(key.split(".lora_")[0])
    got = module.lora_A["w2w"].weight
    torch.testing.assert_close(got, space.to_lora(w)[key])
    assert module.scaling["w2w"] == pytest.approx(space.layout.scaling)
    img = pipe("sks person", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_default_model_config_comes_from_store(space):
    cfg = space.model_config()
    assert cfg.path == "builtin:tiny"


def test_load_missing_subspace(tmp_path):
    with pytest.raises(FileNotFoundError, match="w2w pca"):
        WeightSpace.load(tmp_path)


def test_w2w_core_does_not_import_ray_dask_or_pipeline():
    code = (
        "import sys, w2w_core, w2w_core.space, w2w_core.release, w2w_core.directions\n"
        "from w2w_core import WeightSpace\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'dask', 'pipeline')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_timestep_gated_edits(space, tiny_model_dir):
    """--edit-start / WeightSpace.pipeline(original=..., edit_start=...): the unedited model denoises the
    first fraction of the steps, the edited one the rest (issue 14 item 5)."""
    from w2w_core.config import ModelConfig
    from w2w_core.model import load_base_model
    from w2w_core.render import LoraSlot, edit_switch_step, generate, generate_gated

    assert edit_switch_step(0.0, 25) == 0 and edit_switch_step(0.4, 25) == 10
    with pytest.raises(ValueError, match="edit_start"):
        edit_switch_step(1.0, 25)
    w = space.sample(1, seed=2)[0] * 50  # large enough that the LoRA visibly changes the render
    e = space.edit(w, {"beard": 30.0})
    base = load_base_model(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    kw = dict(seed=0, steps=4, output_type="pt")
    with LoraSlot(base, space.layout) as slot:
        slot.set(e)
        edited = generate(base, ["sks person"], **kw)
        slot.set(w)
        original = generate(base, ["sks person"], **kw)
        torch.testing.assert_close(generate_gated(base, slot, w, e, 0.0, ["sks person"], **kw), edited)
        half = generate_gated(base, slot, w, e, 0.5, ["sks person"], **kw)
    assert (half - edited).abs().mean() > 1e-3 and (half - original).abs().mean() > 1e-3

    pipe = space.pipeline(e, ModelConfig(path=str(tiny_model_dir), device="cpu"), original=w, edit_start=0.5)
    active = []
    real = pipe.pipe.set_adapters
    pipe.pipe.set_adapters = lambda name, *a, **k: (active.append(name), real(name, *a, **k))[1]
    img = pipe("sks person", num_inference_steps=4, height=32, width=32, output_type="np").images
    assert active == ["w2w_unedited", "w2w"] and np.isfinite(img).all()


def test_unknown_inversion_preset_fails_before_loading_a_model(space, monkeypatch):
    """A typo in `preset` is said at once, naming the presets, without first loading the base model."""
    def no_load(*a, **k):
        raise AssertionError("the base model was loaded before the preset was checked")

    monkeypatch.setattr(type(space), "base_model", no_load)
    image = torch.zeros(3, 64, 64)
    with pytest.raises(ValueError, match="unknown inversion preset 'inn'; choose one of: in, out"):
        space.invert(image, preset="inn")
    with pytest.raises(ValueError, match="unknown inversion preset 'inn'"):
        space.invert_batch(image[None], preset="inn")
