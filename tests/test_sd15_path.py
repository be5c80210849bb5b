"""The real-checkpoint path of conf/sd15.yaml: an SD1.5-family model from a diffusers folder or
from one original-layout .safetensors file (diffusers from_single_file + model.config_dir),
bf16 frozen base, fp32 LoRA. Random weights at small width (tests/sd15_fixture.py); set
W2W_SD15_FULL=1 to run the same checks on the genuine 859.5M-parameter SD1.5 UNet shape.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import peft
import pytest
import torch

from sd15_fixture import SD15_CHANNELS, SMALL_CHANNELS, sd15_checkpoints, sd15_lora_numel
from pipeline.config import load_config
from w2w_core.layout import LoraLayout, peft_lora_config
from w2w_core.model import SD15_UNET, load_base_model

REPO = Path(__file__).resolve().parents[1]
SD15_YAML = REPO / "conf" / "sd15.yaml"

WIDTHS = [pytest.param(SMALL_CHANNELS, id="small")]
if os.environ.get("W2W_SD15_FULL") == "1":
    WIDTHS.append(pytest.param(SD15_CHANNELS, id="full", marks=pytest.mark.slow))


@pytest.fixture(scope="module", params=WIDTHS)
def sd15(request, tmp_path_factory):
    return sd15_checkpoints(tmp_path_factory.mktemp("sd15"), block_out_channels=request.param)


def _load(ckpt, single_file: bool, *extra: str):
    cfg = load_config(SD15_YAML, ckpt.overrides(single_file) + list(extra))
    return cfg, load_base_model(cfg.model)


def test_layout_arithmetic_matches_peft_for_true_sd15():
    # 16 transformer blocks x (attn1, attn2) x (to_q, to_v), rank 1 (REFERENCE.md section 1)
    assert sd15_lora_numel(SD15_CHANNELS) == 99_648
    assert LoraLayout.from_unet_config(SD15_UNET, rank=1, alpha=27, targets=("to_q", "to_v")).numel == 99_648


@pytest.mark.parametrize("single_file", [False, True], ids=["diffusers_dir", "single_file"])
def test_sd15_loads_bf16_frozen_exact(sd15, single_file):
    cfg, base = _load(sd15, single_file)
    assert cfg.model.dtype == "bfloat16" and cfg.lora.targets == ["to_q", "to_v"]
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(base, name)
        params = list(module.parameters())
        assert all(p.dtype == torch.bfloat16 for p in params), name
        assert not any(p.requires_grad for p in params), f"{name} is not frozen"
        assert not module.training
        # every tensor arrives, converted exactly (the single file is stored fp16, as community files are)
        original = sd15.components[name].state_dict()
        loaded = module.state_dict()
        assert loaded.keys() == original.keys()
        for key, value in original.items():
            expected = value.to(torch.float16) if single_file else value
            assert torch.equal(loaded[key], expected.to(torch.bfloat16)), f"{name}.{key}"
    assert base.unet.config.cross_attention_dim == 768
    assert tuple(base.unet.config.down_block_types) == SD15_UNET["down_block_types"]
    assert tuple(base.unet.config.up_block_types) == SD15_UNET["up_block_types"]


@pytest.mark.parametrize("single_file", [False, True], ids=["diffusers_dir", "single_file"])
def test_sd15_layout_and_fp32_lora_forward(sd15, single_file):
    cfg, base = _load(sd15, single_file)
    layout = LoraLayout.from_unet(base.unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets)
    assert layout.num_tensors == 128
    assert layout.numel == sd15_lora_numel(sd15.block_out_channels)
    if sd15.block_out_channels == SD15_CHANNELS:
        assert layout.numel == 99_648

    # fp32 LoRA on the bf16 frozen base: one forward + backward at a small latent size
    unet = peft.inject_adapter_in_model(peft_lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets), base.unet)
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
        p.requires_grad_(True)
    assert sum(p.numel() for p in lora) == layout.numel
    text = base.encode_prompts([cfg.train.instance_prompt])
    assert text.shape == (1, 77, 768) and text.dtype == torch.bfloat16
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    out = unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample
    assert out.shape == latents.shape and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)


def test_single_file_without_config_dir_names_the_fix(sd15, tmp_path):
    lonely = tmp_path / "model.safetensors"
    lonely.symlink_to(sd15.single_file)
    cfg = load_config(SD15_YAML, [f"model.path={lonely}", "model.device=cpu"])
    with pytest.raises(FileNotFoundError, match="model.config_dir"):
        load_base_model(cfg.model)


def test_config_dir_missing_tokenizer_is_named(sd15, tmp_path):
    import shutil

    broken = tmp_path / "configs"
    shutil.copytree(sd15.config_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    cfg = load_config(SD15_YAML, [f"model.path={sd15.single_file}", f"model.config_dir={broken}", "model.device=cpu"])
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/"):
        load_base_model(cfg.model)


@pytest.mark.slow
def test_sd15_one_build_shard_through_ray(sd15, tmp_path):
    """`w2w build conf/sd15.yaml` (bf16 frozen base, bf16 autocast, fp32 LoRA, batched trainer,
    prior preservation) on a random SD1.5-architecture checkpoint: one shard through a local Ray.
    Overrides only for sizes, paths and the CPU-only Ray slot."""
    import json
    import subprocess
    import sys

    from pipeline.builder.store import WeightStore
    from pipeline.data.synthfaces import write_identity_source

    if sd15.block_out_channels != SMALL_CHANNELS:
        pytest.skip("one build shard at full SD1.5 width takes minutes on a CPU")
    src = write_identity_source(tmp_path / "identities", 2, 2, seed=0)
    out = tmp_path / "store"
    overrides = sd15.overrides(single_file=False) + [
        f"data.source={src}", "data.images_per_identity=2", "model.resolution=64", f"build.out={out}",
        'build.ray_address=""', "build.gpus_per_worker=0", "build.cpus_per_worker=1", "build.workers=1",
        "build.rows_per_shard=2", "train.steps=2", "train.num_class_images=2", "train.class_image_steps=2",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    w2w = str(Path(sys.executable).parent / "w2w")
    res = subprocess.run([w2w, "build", str(SD15_YAML), *overrides, "--no-progress"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    store = WeightStore.open(str(out), mode="r")
    cfg = store.attrs["config"]
    assert cfg["model"]["dtype"] == "bfloat16" and cfg["train"]["mixed_precision"] == "bf16"
    assert cfg["build"]["trainer"] == "batched" and cfg["lora"]["targets"] == ["to_q", "to_v"]
    assert store.n_shards == 1 and store.done_shards(verify=True) == {0}
    assert store.marker(0).quarantined == {}
    assert store.numel == sd15_lora_numel(sd15.block_out_channels)
    assert store.layout.numel == LoraLayout.from_unet(
        sd15.components["unet"], rank=1, alpha=27, targets=("to_q", "to_v")).numel
    rows = np.asarray(store.array[:])
    assert rows.shape == (2, store.numel) and np.isfinite(rows).all()
    assert (np.abs(rows) > 0).any(axis=1).all()
    assert Path(store.class_latents_path).is_file()
    assert json.loads((out / "shards" / "000000.json").read_text())["identities"] == \
        store.manifest().column("identity").to_pylist()
