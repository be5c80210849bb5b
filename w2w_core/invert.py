"""Single-image inversion into the w2w space (REFERENCE.md section 3).

Only the PC coefficients c are optimised (start at 0); the LoRA weights are constrained to
w(c) = mean + std * (c @ V) and enter the frozen UNet through torch.func.functional_call,
so gradients reach c and nothing else.
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
from w2w_core.render import LoraSlot

# The published settings: in-distribution faces (10,000 PCs) and out-of-distribution
# inputs such as paintings or cartoons (1,000 PCs, larger steps). `components` is capped
# by the number of PCs the space has.
PRESETS: dict[str, dict] = {
    "in": dict(components=10_000, lr=0.1, weight_decay=1e-10, steps=400),
    "out": dict(components=1_000, lr=1.0, weight_decay=1e-10, steps=800),
}


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
    prompt: str = "sks person",
    n_components: int | None = None,
    steps: int = 400,
    lr: float = 0.1,
    weight_decay: float = 1e-10,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    compile: bool = False,
) -> InversionResult:
    """Fit the first `n_components` PC coefficients to one image (3, H, W) in [-1, 1].

    `mask` (H, W) in [0, 1] weights the loss per pixel (e.g. a face mask), resized to the latents.
    `compile=True` runs the UNet call through torch.compile: one image per step leaves a large
    UNet launch-bound (about 8,000 kernels per step at SD1.5 shape), and fusing them is what
    shortens the step on a GPU (docs/BENCHMARKS.md); the first steps pay the compilation.
    """
    available = components.shape[0]
    k = available if n_components is None else int(n_components)
    if k < 1:
        raise ValueError(f"n_components must be >= 1, got {k}")
    k = min(k, available)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or inf values")

    device = base.device
    started = time.perf_counter()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    latents = base.encode_images(image[None]).float()
    text = base.encode_prompts([prompt])
    weight = None
    if mask is not None:
        weight = F.interpolate(mask.float()[None, None], size=latents.shape[-2:], mode="bilinear", align_corners=False)
        weight = weight.to(device).expand_as(latents)

    mean = mean.to(device, torch.float32)
    basis = (components[:k].to(device, torch.float32) * std.to(device, torch.float32))  # (k, D)
    coefficients = torch.zeros(k, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr, weight_decay=weight_decay)
    scheduler = base.scheduler
    num_train_timesteps = scheduler.config.num_train_timesteps
    losses: list[float] = []

    with LoraSlot(base, layout, adapter_name="w2w_invert") as slot:

        def predict_noise(vector, noisy, timestep):
            params = slot.functional_params(vector)
            return functional_call(base.unet, params, (noisy, timestep), {"encoder_hidden_states": text}).sample

        if compile:
            predict_noise = torch.compile(predict_noise)
        for step in range(steps):
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timestep = torch.randint(0, num_train_timesteps, (1,), generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timestep).to(base.unet.dtype)
            vector = mean + coefficients @ basis
            with torch.autocast(device.type, dtype=base.dtype, enabled=base.dtype != torch.float32):
                pred = predict_noise(vector, noisy, timestep)
            error = (pred.float() - noise) ** 2
            loss = (error * weight).sum() / weight.sum().clamp_min(1e-8) if weight is not None else error.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"inversion loss became {loss.item()} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])

    coefficients = coefficients.detach()
    with torch.no_grad():
        vector = (mean + coefficients @ basis).cpu()
    return InversionResult(
        coefficients=coefficients.cpu(),
        vector=vector,
        losses=losses,
        seconds=time.perf_counter() - started,
        components=k,
    )
