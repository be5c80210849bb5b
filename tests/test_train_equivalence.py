"""The batched multi-LoRA trainer == K runs of the peft reference trainer (fp32, CPU, tiny model)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pipeline.train.batched as batched_mod
from pipeline.config import TrainConfig
from pipeline.train import (
    IdentityInput,
    LayoutMismatchError,
    generate_class_latents,
    load_class_latents,
    save_class_latents,
    train_identities,
)
from pipeline.train.common import identity_generator, init_lora_A
from w2w_core.layout import LoraLayout
from w2w_core.model import TINY_UNET, random_tiny_base

ATOL = 1e-5


@pytest.fixture(scope="module")
def world():
    base = random_tiny_base(0)
    layout = LoraLayout.from_unet(base.unet)
    cfg = TrainConfig(steps=4, lr=1e-3, num_class_images=3, class_image_steps=2, identities_per_batch=4,
                      max_grad_norm=0.0, seed=7)
    class_latents = generate_class_latents(base, cfg)
    return base, layout, cfg, class_latents


def _identities(n: int, images: int = 3, seed: int = 0) -> list[IdentityInput]:
    g = torch.Generator().manual_seed(seed)
    return [IdentityInput(f"id{i}", torch.rand(images, 3, 64, 64, generator=g) * 2 - 1, seed=100 + i) for i in range(n)]


def _assert_clean(base):
    assert not hasattr(base.unet, "peft_config")
    for name, module in base.unet.named_modules():
        assert "lora" not in name.lower() and "Lora" not in type(module).__name__, name
    assert all(not p.requires_grad for p in base.unet.parameters())


def _train_both(base, layout, cfg, ids, class_latents):
    """The same identities through the peft reference and the batched trainer; the base stays clean."""
    ref = train_identities(base, layout, cfg, ids, trainer="reference", class_latents=class_latents)
    _assert_clean(base)
    bat = train_identities(base, layout, cfg, ids, trainer="batched", class_latents=class_latents)
    _assert_clean(base)
    return ref, bat


def test_batched_equals_reference(world):
    base, layout, cfg, class_latents = world
    ref, bat = _train_both(base, layout, cfg, _identities(3), class_latents)
    for r, b in zip(ref, bat):
        assert r.status == b.status == "ok"
        assert r.identity_id == b.identity_id and b.steps == cfg.steps
        assert b.vector.dtype == torch.float32 and b.vector.shape == (layout.numel,)
        assert b.vector.abs().max() > 0.01  # really trained (B moved away from 0)
        torch.testing.assert_close(b.vector, r.vector, atol=ATOL, rtol=0)
        assert b.final_loss == pytest.approx(r.final_loss, abs=1e-4)
        assert b.loss_mean_last10 == pytest.approx(r.loss_mean_last10, abs=1e-4)
    # identities are independent: different seeds -> different vectors
    assert (bat[0].vector - bat[1].vector).abs().max() > 1e-3


def test_clipping_nan_and_empty_identities(world, monkeypatch):
    base, layout, cfg, class_latents = world
    cfg = dataclasses.replace(cfg, max_grad_norm=0.05, batch_size=2, steps=3)
    norms = []
    real_clip = batched_mod.per_identity_clip_

    def spy(params, max_norm):
        total = real_clip(params, max_norm)
        norms.append(total.clone())
        return total

    monkeypatch.setattr(batched_mod, "per_identity_clip_", spy)
    ids = _identities(4, seed=1)
    ids[1] = IdentityInput("nan", torch.full((3, 3, 64, 64), float("nan")), seed=5)
    ids.insert(2, IdentityInput("empty", torch.zeros(0, 3, 64, 64), seed=6))
    bat = train_identities(base, layout, cfg, ids, trainer="batched", class_latents=class_latents)
    _assert_clean(base)
    assert [r.status for r in bat] == ["ok", "quarantined", "quarantined", "ok", "ok"]
    assert bat[1].vector is None and bat[1].reason == "non-finite loss at step 0"
    assert bat[2].vector is None and "zero training images" in bat[2].reason
    # clipping really was active for the healthy identities
    healthy = torch.stack(norms)[:, [0, 2, 3]]
    assert (healthy > cfg.max_grad_norm).all()

    keep = [ids[0], ids[3], ids[4]]
    ref = train_identities(base, layout, cfg, keep, trainer="reference", class_latents=class_latents)
    for r, b in zip(ref, [bat[0], bat[3], bat[4]]):
        assert r.status == "ok"
        # Clipping rescales every gradient by a norm each trainer sums in its own order (float32 rounding), and
        # Adam turns a rounding-level difference in a near-zero gradient into up to one lr-sized step. So the
        # bound is a tenth of one Adam step, not ATOL (seen: 5e-5 on one element of 2,912 at lr 1e-3).
        torch.testing.assert_close(b.vector, r.vector, atol=0.1 * cfg.lr, rtol=0)
    ref_nan = train_identities(base, layout, cfg, [ids[1]], trainer="reference", class_latents=class_latents)[0]
    assert ref_nan.status == "quarantined" and ref_nan.reason == "non-finite loss at step 0"


def test_encoding_happens_once(world, monkeypatch):
    base, layout, cfg, class_latents = world
    calls = {"vae": 0, "text": 0}
    real_vae, real_text = base.vae.encode, base.text_encoder.forward

    def vae_encode(*a, **k):
        calls["vae"] += 1
        return real_vae(*a, **k)

    def text_forward(*a, **k):
        calls["text"] += 1
        return real_text(*a, **k)

    monkeypatch.setattr(base.vae, "encode", vae_encode)
    monkeypatch.setattr(base.text_encoder, "forward", text_forward)
    ids = _identities(2)
    seen = []
    for steps in (1, 3):
        calls.update(vae=0, text=0)
        train_identities(base, layout, dataclasses.replace(cfg, steps=steps), ids, class_latents=class_latents,
                         progress=lambda done, total: seen.append((done, total)))
        seen_counts = dict(calls)
        assert seen_counts == {"vae": 2, "text": 1}, (steps, seen_counts)
    assert seen[-1] == (2, 2)


def test_layout_mismatch_raises(world):
    base, _, cfg, class_latents = world
    other = LoraLayout.from_unet_config(dict(TINY_UNET, block_out_channels=(16, 32), norm_num_groups=8))
    for trainer in ("batched", "reference"):
        with pytest.raises(LayoutMismatchError, match="layout"):
            train_identities(base, other, cfg, _identities(1), trainer=trainer, class_latents=class_latents)
    _assert_clean(base)


def test_class_latents_roundtrip(world, tmp_path):
    *_, class_latents = world
    path = save_class_latents(class_latents, tmp_path / "class.safetensors", {"prompt": "person"})
    assert torch.equal(load_class_latents(path), class_latents)
    assert class_latents.shape == (3, 4, 16, 16) and torch.isfinite(class_latents).all()


def test_bad_images_are_quarantined_not_trained(world):
    base, layout, cfg, class_latents = world
    bad = [
        IdentityInput("uint8", torch.zeros(2, 3, 64, 64, dtype=torch.uint8), seed=1),
        IdentityInput("0-255", torch.full((2, 3, 64, 64), 255.0), seed=2),
        IdentityInput("shape", torch.zeros(2, 64, 64), seed=3),
        IdentityInput("resolution", torch.zeros(2, 3, 32, 32), seed=4),
    ]
    results = train_identities(base, layout, cfg, bad, class_latents=class_latents)
    assert [r.status for r in results] == ["quarantined"] * 4
    assert all(r.vector is None and r.reason for r in results)
    assert "base resolution" in results[3].reason and "[-1, 1]" in results[1].reason


def test_conv_lora_batched_equals_reference(world):
    """LoRA on resnet convolutions (issue 14): the batched trainer's grouped convolutions are
    peft's conv LoRA, identity by identity. adam_eps is raised from 1e-8 because Adam divides by
    sqrt(v) + eps: on gradients near zero, float-rounding differences between a grouped and a plain
    convolution would otherwise become lr-sized steps; the maths compared is the same."""
    base, _, cfg, class_latents = world
    layout = LoraLayout.from_unet(base.unet, rank=2, alpha=3, targets=("to_q", "conv1", "conv2", "conv_shortcut"))
    assert any(len(s) == 4 for _, s in layout.entries)
    cfg = dataclasses.replace(cfg, max_grad_norm=0.5, adam_eps=1e-5)
    ref, bat = _train_both(base, layout, cfg, _identities(3, seed=2), class_latents)
    for r, b in zip(ref, bat):
        assert r.status == b.status == "ok"
        conv_b = [k for k in layout.keys if "conv" in k and "lora_B" in k]
        moved = max(float(layout.unflatten(b.vector)[k].abs().max()) for k in conv_b)
        assert moved > 1e-3  # the conv LoRAs really trained
        torch.testing.assert_close(b.vector, r.vector, atol=ATOL, rtol=0)
        assert b.final_loss == pytest.approx(r.final_loss, abs=1e-4)


def test_frozen_lora_a_trains_only_b_in_both_trainers(world):
    """train.train_lora_a=false (LoRA-FA): every model keeps the one shared lora_A, so B @ A is linear in
    the store's row; the batched trainer still equals peft's reference, which differs from training A."""
    base, layout, cfg, class_latents = world
    frozen = dataclasses.replace(cfg, train_lora_a=False)
    ids = _identities(2, seed=3)
    ref, bat = _train_both(base, layout, frozen, ids, class_latents)
    trained_a = train_identities(base, layout, cfg, ids, trainer="batched", class_latents=class_latents)
    a_keys = [k for k in layout.keys if ".lora_A." in k]
    b_keys = [k for k in layout.keys if ".lora_B." in k]
    init = init_lora_A(layout, identity_generator(frozen.seed, 0), frozen)  # the shared init
    for r, b, t in zip(ref, bat, trained_a):
        assert r.status == b.status == "ok"
        torch.testing.assert_close(b.vector, r.vector, atol=ATOL, rtol=0)
        got, moved = layout.unflatten(b.vector), layout.unflatten(t.vector)
        for k in a_keys:
            torch.testing.assert_close(got[k], init[k.split(".lora_A.")[0]], atol=0, rtol=0)
        assert max(float((got[k] - moved[k]).abs().max()) for k in a_keys) > 1e-4  # training A would move it
        assert max(float(got[k].abs().max()) for k in b_keys) > 1e-3  # B trained


def test_train_compile_flag_reaches_the_batched_step(world, monkeypatch):
    """conf/sd15.yaml's `train.compile: true` must compile the UNet the batched trainer steps through.
    torch.compile itself is replaced by a recorder: compiling on a 2-core CI CPU takes minutes, and
    the compiled step's speed and losses were measured on a GPU (docs/BENCHMARKS.md)."""
    base, layout, cfg, class_latents = world
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    ids = _identities(2)
    train_identities(base, layout, dataclasses.replace(cfg, steps=1, compile=False), ids, class_latents=class_latents)
    assert compiled == []
    train_identities(base, layout, dataclasses.replace(cfg, steps=1, compile=True), ids, class_latents=class_latents)
    assert compiled == [base.unet]
    _assert_clean(base)


def test_lr_schedule_applies_in_both_trainers(world):
    """train.lr_scheduler (diffusers' schedules): the batched trainer still equals peft's reference under a
    decaying lr, and the decay really reaches the optimiser (the models differ from constant-lr ones, and a
    cosine decay moves lora_B less than constant lr does over the same steps)."""
    base, layout, cfg, class_latents = world
    ids = _identities(2, seed=4)
    cosine = dataclasses.replace(cfg, lr_scheduler="cosine", lr_warmup_steps=1)
    ref, bat = _train_both(base, layout, cosine, ids, class_latents)
    constant = train_identities(base, layout, cfg, ids, trainer="batched", class_latents=class_latents)
    for r, b, c in zip(ref, bat, constant):
        assert r.status == b.status == c.status == "ok"
        torch.testing.assert_close(b.vector, r.vector, atol=ATOL, rtol=0)
        assert float((b.vector - c.vector).abs().max()) > 1e-4
        b_norm = [sum(float(layout.unflatten(v)[k].norm()) for k in layout.keys if ".lora_B." in k) for v in (b.vector, c.vector)]
        assert b_norm[0] < b_norm[1]  # lora_B starts at 0: its norm is how far training moved it
