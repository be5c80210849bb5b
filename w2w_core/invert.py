"""Single-image inversion into the w2w space (REFERENCE.md section 3).

Only the PC coefficients c are optimised (start at 0); the LoRA weights are constrained to
w(c) = mean + std * (c @ V) and enter the frozen UNet through torch.func.functional_call,
so gradients reach c and nothing else. `invert_batch` fits several images at once, one
coefficient vector each, through one forward pass of K stacked LoRAs (w2w_core.multi_lora):
each image's fit is the one `invert` makes alone, only faster per image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from w2w_core.layout import LoraLayout
from w2w_core.model import BaseModel
from w2w_core.multi_lora import MultiLoraSlot

# The published settings: in-distribution faces (10,000 PCs) and out-of-distribution
# inputs such as paintings or cartoons (1,000 PCs, larger steps). `components` is capped
# by the number of PCs the space has.
PRESETS: dict[str, dict] = {
    "in": dict(components=10_000, lr=0.1, weight_decay=1e-10, steps=400),
    "out": dict(components=1_000, lr=1.0, weight_decay=1e-10, steps=800),
}
# How the Adam lr moves over the steps. The published inversion keeps it constant; "cosine" decays it to 0 by
# the last step, so the fit ends settled instead of jittering by about lr per step (in the tiny world a cosine
# from lr 4 beat constant lr 1, the report's old setting, by +0.034 ID over 32 held-out identities;
# docs/TINY_WORLD.md, "A decaying learning rate for the inversion").
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class InversionResult:
    coefficients: torch.Tensor  # (k,)
    vector: torch.Tensor  # (D,) the LoRA, in the space's layout
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    components: int = 0


def invert(
    base: BaseModel,
    layout: LoraLayout,
    mean: torch.Tensor,
    std: torch.Tensor,
    components: torch.Tensor,
    image: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    **settings,
) -> InversionResult:
    """Fit the first `n_components` PC coefficients to one image (3, H, W) in [-1, 1].

    `mask` (H, W) in [0, 1] weights the loss per pixel (e.g. a face mask), resized to the latents.
    The other settings (prompt, n_components, steps, lr, lr_schedule, weight_decay, seed, progress, compile) are
    `invert_batch`'s.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    masks = None if mask is None else mask[None]
    return invert_batch(base, layout, mean, std, components, image[None], masks=masks, **settings)[0]


def invert_batch(
    base: BaseModel,
    layout: LoraLayout,
    mean: torch.Tensor,
    std: torch.Tensor,
    components: torch.Tensor,
    images: torch.Tensor,
    *,
    prompt: str = "sks person",
    n_components: int | None = None,
    steps: int = 400,
    lr: float = 0.1,
    lr_schedule: str = "constant",
    weight_decay: float = 1e-10,
    masks: torch.Tensor | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    compile: bool = False,
) -> list[InversionResult]:
    """Fit one coefficient vector per image of `images` (N, 3, H, W) in [-1, 1], all in one batch.

    Each image draws the noise and timesteps `invert` draws for it alone with the same `seed`, and
    the loss is the sum of the images' own losses, so each image's gradient (and Adam's elementwise
    update) is its own: the fits are `invert`'s up to float rounding. `masks` (N, H, W) in [0, 1]
    weights each image's loss per pixel. `progress(step, loss)` gets the images' mean loss. `lr_schedule`
    is one of LR_SCHEDULES: "cosine" takes Adam's lr from `lr` down to 0 over the `steps`.
    The UNet must carry no peft adapter (see MultiLoraSlot). `compile=True` runs the UNet call
    through torch.compile: a small batch leaves a large UNet launch-bound (about 8,000 kernels
    per step at SD1.5 shape), and fusing them is what shortens the step on a GPU
    (docs/BENCHMARKS.md); the first steps pay the compilation.
    """
    available = components.shape[0]
    k = available if n_components is None else int(n_components)
    if k < 1:
        raise ValueError(f"n_components must be >= 1, got {k}")
    k = min(k, available)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown inversion lr_schedule {lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    bad = [i for i in range(images.shape[0]) if not torch.isfinite(images[i]).all()]
    if bad:
        raise ValueError(f"image(s) {bad} contain NaN or inf values")
    if masks is not None and (masks.ndim != 3 or masks.shape[0] != images.shape[0]):
        raise ValueError(f"masks must be (N, H, W) with N = {images.shape[0]}, got shape {tuple(masks.shape)}")

    n = images.shape[0]
    device = base.device
    started = time.perf_counter()
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(n)]
    latents = base.encode_images(images).float()
    text = base.encode_prompts([prompt]).expand(n, -1, -1)
    weight = None
    if masks is not None:
        weight = F.interpolate(masks.float()[:, None], size=latents.shape[-2:], mode="bilinear", align_corners=False)
        weight = weight.to(device).expand_as(latents)

    mean = mean.to(device, torch.float32)
    basis = (components[:k].to(device, torch.float32) * std.to(device, torch.float32))  # (k, D)
    coefficients = torch.zeros(n, k, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr, weight_decay=weight_decay)
    lr_scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps) if lr_schedule == "cosine"
                    else None)
    scheduler = base.scheduler
    num_train_timesteps = scheduler.config.num_train_timesteps
    losses: list[list[float]] = [[] for _ in range(n)]

    with MultiLoraSlot(base, layout, n) as slot:

        def predict_noise(vectors, noisy, timesteps):
            params = slot.functional_params(vectors)
            return functional_call(base.unet, params, (noisy, timesteps), {"encoder_hidden_states": text}).sample

        if compile:
            predict_noise = torch.compile(predict_noise)
        for step in range(steps):
            draws = [(torch.randn(latents.shape[1:], generator=g), torch.randint(0, num_train_timesteps, (1,), generator=g))
                     for g in generators]
            noise = torch.stack([d[0] for d in draws]).to(device)
            timesteps = torch.cat([d[1] for d in draws]).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps).to(base.unet.dtype)
            vectors = mean + coefficients @ basis
            with torch.autocast(device.type, dtype=base.dtype, enabled=base.dtype != torch.float32):
                pred = predict_noise(vectors, noisy, timesteps)
            error = (pred.float() - noise) ** 2
            if weight is not None:
                per_image = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-8)
            else:
                per_image = error.flatten(1).mean(1)
            if not torch.isfinite(per_image).all():
                which = torch.nonzero(~torch.isfinite(per_image)).flatten().tolist()
                raise FloatingPointError(f"inversion loss of image(s) {which} became non-finite at step {step}; "
                                         "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            per_image.sum().backward()
            optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
            values = per_image.detach().cpu().tolist()
            for i, v in enumerate(values):
                losses[i].append(v)
            if progress is not None:
                progress(step, sum(values) / n)

    coefficients = coefficients.detach()
    with torch.no_grad():
        vectors = (mean + coefficients @ basis).cpu()
    seconds = (time.perf_counter() - started) / n
    return [InversionResult(coefficients=coefficients[i].cpu(), vector=vectors[i], losses=losses[i], seconds=seconds,
                            components=k) for i in range(n)]
