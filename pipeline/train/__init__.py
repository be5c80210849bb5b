"""Identity fine-tuning engine: DreamBooth-LoRA per identity, many identities per batch.

Entry point for the builder:

    results = train_identities(base, layout, cfg.train, identities, trainer="batched",
                               class_latents=None, progress=None)

`identities` are IdentityInput(identity_id, images (n,3,H,W) in [-1,1], seed). Images are
VAE-encoded once, prompts encoded once, class (prior-preservation) latents generated once
(or passed in: see generate_class_latents / save_class_latents / load_class_latents).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pipeline.train.batched import BatchedOptions, train_batched
from pipeline.train.common import (
    IdentityInput,
    PreparedIdentity,
    Progress,
    TrainContext,
    TrainResult,
    generate_class_latents,
    identity_generator,
    load_class_latents,
    make_context,
    prepare_identity,
    save_class_latents,
)
from pipeline.train.reference import train_reference
from w2w_core.layout import LayoutMismatchError, LoraLayout
from w2w_core.multi_lora import MultiLoraLinear, check_layout_modules

TRAINERS = ("batched", "reference")

__all__ = [
    "BatchedOptions",
    "IdentityInput",
    "LayoutMismatchError",
    "MultiLoraLinear",
    "PreparedIdentity",
    "TrainContext",
    "TrainResult",
    "generate_class_latents",
    "identity_generator",
    "load_class_latents",
    "make_context",
    "prepare_identity",
    "save_class_latents",
    "train_batched",
    "train_identities",
    "train_reference",
]


def _validate_images(inp: IdentityInput) -> str:
    images = inp.images
    if not isinstance(images, torch.Tensor):
        return f"images must be a torch.Tensor, got {type(images).__name__}"
    if images.ndim != 4 or images.shape[1] != 3:
        return f"images must have shape (n, 3, H, W), got {tuple(images.shape)}"
    if images.shape[0] == 0:
        return "identity has zero training images"
    if not images.is_floating_point():
        return f"images must be floating point in [-1, 1], got dtype {images.dtype}"
    lo, hi = float(images.min()), float(images.max())  # NaN passes here and is caught as a non-finite loss
    if lo < -1.001 or hi > 1.001:
        return f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]"
    return ""


def _latent_shape(base) -> tuple[int, ...] | None:
    cfg = getattr(base.unet, "config", None)
    if cfg is None or not hasattr(cfg, "sample_size"):
        return None
    size = cfg.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (cfg.in_channels, *size)


def train_identities(
    base,
    layout: LoraLayout,
    train_cfg,
    identities: Sequence[IdentityInput],
    trainer: str = "batched",
    class_latents: torch.Tensor | None = None,
    progress: Progress | None = None,
    options: BatchedOptions | None = None,
) -> list[TrainResult]:
    """Train one LoRA per identity; results come back in input order.

    trainer="batched" trains train_cfg.identities_per_batch identities per forward/backward;
    "reference" trains them one by one with peft. Bad identities (no images, wrong image
    shape, non-finite loss) come back with status "quarantined" and a reason, never a vector.
    A layout that does not match base.unet raises LayoutMismatchError. `progress(done, total)`
    is called after every finished group (batched) or identity (reference).
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r} is not one of {TRAINERS}")
    check_layout_modules(layout, base.unet)
    identities = list(identities)
    total = len(identities)
    results: list[TrainResult | None] = [None] * total
    good: list[int] = []
    for i, inp in enumerate(identities):
        reason = _validate_images(inp)
        if reason:
            results[i] = TrainResult.quarantined(inp.identity_id, reason)
        else:
            good.append(i)

    if class_latents is None and train_cfg.prior_loss_weight > 0 and train_cfg.num_class_images > 0 and good:
        class_latents = generate_class_latents(base, train_cfg)
    ctx = make_context(base, train_cfg, class_latents)
    done = total - len(good)

    # Latents are encoded once per identity, one group at a time (bounded memory).
    group_size = int(train_cfg.identities_per_batch) if trainer == "batched" else 1
    options = options or BatchedOptions(compile=bool(train_cfg.compile))
    for start in range(0, len(good), group_size):
        idx = good[start : start + group_size]
        prepared = []
        for i in idx:
            p = prepare_identity(base, identities[i])
            want = tuple(ctx.class_latents.shape[1:]) if ctx.class_latents is not None else _latent_shape(base)
            if want is not None and tuple(p.latents.shape[1:]) != tuple(want):
                results[i] = TrainResult.quarantined(
                    p.identity_id,
                    f"latent shape {tuple(p.latents.shape[1:])} differs from the expected {want}: "
                    f"images must be at the base resolution ({base.resolution} px)",
                )
            else:
                prepared.append(p)
        idx = [i for i in idx if results[i] is None]
        if trainer == "batched":
            group_results = train_batched(base, layout, train_cfg, prepared, ctx, options)
        else:
            group_results = [train_reference(base, layout, train_cfg, p, ctx) for p in prepared]
        for i, r in zip(idx, group_results):
            results[i] = r
        done += len(good[start : start + group_size])
        if progress is not None:
            progress(done, total)
    return results  # type: ignore[return-value]
