"""Multi-LoRA batched trainer: K identities in ONE forward/backward of the frozen base.

Each adapted module (the layout's) is temporarily replaced by w2w_core.multi_lora's
`MultiLoraLinear` / `MultiLoraConv2d`, holding stacked A and B of the K identities. The batch is
identity-major with m samples per identity, so the LoRA branch is two batched matmuls (or grouped
convolutions): no Python loop over identities in the hot path. AdamW is elementwise, so the stacked parameters with the
summed per-identity losses are K independent trainings; gradient clipping is per identity and
reproduces torch.nn.utils.clip_grad_norm_ exactly. A non-finite loss quarantines only its own
identity (excluded from the loss, its gradients zeroed from then on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.train.common import (
    IdentitySampler,
    PreparedIdentity,
    TrainContext,
    TrainResult,
    identity_generator,
    identity_losses,
    init_lora_A,
    make_lr_scheduler,
    noisy_inputs,
    step_inputs,
)
from pipeline.train.reference import autocast_context
from w2w_core.layout import LoraLayout
from w2w_core.multi_lora import check_layout_modules, multi_lora, swap_module


@dataclass
class BatchedOptions:
    """Speed toggles (none changes the maths beyond float rounding)."""

    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False  # CUDA only
    sync_every: int = 1  # read losses back to the host (NaN check) every N steps; 0 = only at the end


def per_identity_clip_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ applied to each identity k independently (grads are (K, ...)).

    Same formula as torch: total = ||(||g_t||_2 for t)||_2, coef = clamp(max_norm / (total + 1e-6), max=1).
    Returns the per-identity total norms (K,).
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads], dim=1)  # (K, T)
    total = torch.linalg.vector_norm(norms, 2, dim=1)  # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))
    return total


def train_batched(base, layout: LoraLayout, train_cfg, prepared: list[PreparedIdentity], ctx: TrainContext,
                  options: BatchedOptions | None = None) -> list[TrainResult]:
    """Train len(prepared) identities together; returns one TrainResult each (same order)."""
    options = options or BatchedOptions()
    unet = base.unet
    linears = check_layout_modules(layout, unet)
    results: list[TrainResult | None] = [None] * len(prepared)
    live = [i for i, p in enumerate(prepared) if p.latents.shape[0] > 0]
    for i, p in enumerate(prepared):
        if p.latents.shape[0] == 0:
            results[i] = TrainResult.quarantined(p.identity_id, "identity has zero training images")
    if live:
        group = [prepared[i] for i in live]
        for i, r in zip(live, _train_group(base, unet, layout, linears, train_cfg, group, ctx, options)):
            results[i] = r
    return results  # type: ignore[return-value]


def _train_group(base, unet, layout, linears, train_cfg, group, ctx, options) -> list[TrainResult]:
    device = base.device
    K = len(group)
    gens = [identity_generator(train_cfg.seed, p.seed) for p in group]
    inits = [init_lora_A(layout, g, train_cfg) for g in gens]

    A_params, B_params, params = {}, {}, []
    for m in layout.modules:
        # (K, *peft shape): linear A (r, in), B (out, r); conv A (r, in, kh, kw), B (out, r, 1, 1)
        A = torch.nn.Parameter(torch.stack([init[m] for init in inits]).to(device=device, dtype=torch.float32),
                               requires_grad=bool(train_cfg.train_lora_a))
        B = torch.nn.Parameter(torch.zeros(K, *layout.shapes[f"{m}.lora_B.weight"], device=device, dtype=torch.float32))
        A_params[m], B_params[m] = A, B
        params += [A, B] if A.requires_grad else [B]

    for m in layout.modules:
        swap_module(unet, m, multi_lora(linears[m], A_params[m], B_params[m], layout.scaling))
    try:
        optimizer = torch.optim.AdamW(
            params,
            lr=train_cfg.lr,
            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
            **({"fused": True} if options.fused_adam and device.type == "cuda" else {}),
        )
        lr_scheduler = make_lr_scheduler(optimizer, train_cfg)
        model = unet
        if options.channels_last:
            unet.to(memory_format=torch.channels_last)
        if options.compile:
            model = torch.compile(unet)
        with_prior = ctx.class_latents is not None
        n_class = ctx.class_latents.shape[0] if with_prior else 0
        T = base.scheduler.config.num_train_timesteps
        samplers = [IdentitySampler(g, p.latents.shape[0], n_class, train_cfg.batch_size, T) for g, p in zip(gens, group)]

        alive = torch.ones(K, dtype=torch.bool)  # host copy: identities not quarantined
        quarantine: dict[int, str] = {}
        loss_hist: list[torch.Tensor] = []
        pending: list[tuple[int, torch.Tensor]] = []
        steps = int(train_cfg.steps)

        def check(step_losses) -> None:
            for s, l in step_losses:
                bad = ~torch.isfinite(l.cpu())
                for k in torch.nonzero(bad & alive).flatten().tolist():
                    quarantine[k] = f"non-finite loss at step {s}"
                alive.logical_and_(~bad)

        unet.train(False)
        for step in range(steps):
            parts = [step_inputs(p, ctx, s, device) for p, s in zip(group, samplers)]
            clean, noise, timesteps, embeds = (torch.cat(x) for x in zip(*parts))
            noisy, target = noisy_inputs(base.scheduler, clean, noise, timesteps)
            if options.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, train_cfg.mixed_precision):
                pred = model(noisy.to(base.dtype), timesteps, embeds.to(base.dtype)).sample
            losses = identity_losses(pred, target, K, train_cfg.batch_size, train_cfg.prior_loss_weight, with_prior)
            detached = losses.detach()
            loss_hist.append(detached)
            sync = options.sync_every > 0 and (step % options.sync_every == 0 or step == steps - 1)
            if sync:
                check(pending + [(step, detached)])
                pending.clear()
                all_ok = bool(alive.all())
                ok = alive.to(device)
            else:
                # no host sync this step: mask on device, attribute the failure at the next sync
                pending.append((step, detached))
                all_ok = False
                ok = alive.to(device) & torch.isfinite(detached)
            total = losses.sum() if all_ok else torch.where(ok, losses, torch.zeros_like(losses)).sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if not all_ok:
                # quarantined identities (or non-finite ones this step) get exactly zero gradient
                for p in params:
                    p.grad = torch.where(ok.view(-1, *([1] * (p.ndim - 1))), p.grad, torch.zeros_like(p.grad))
            if train_cfg.max_grad_norm > 0:
                per_identity_clip_(params, train_cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
        check(pending)

        hist = torch.stack(loss_hist).cpu() if loss_hist else torch.zeros(0, K)
        out = []
        for k, p in enumerate(group):
            if k in quarantine:
                bad_step = int(quarantine[k].rsplit(" ", 1)[1])
                out.append(TrainResult.quarantined(p.identity_id, quarantine[k], hist[:bad_step, k].tolist(), steps=bad_step))
                continue
            state = {}
            for m in layout.modules:
                state[f"{m}.lora_A.weight"] = A_params[m][k].detach()
                state[f"{m}.lora_B.weight"] = B_params[m][k].detach()
            out.append(TrainResult.ok(p.identity_id, layout.flatten(state), hist[:, k].tolist()))
        return out
    finally:
        for m in layout.modules:
            swap_module(unet, m, linears[m])
        if options.channels_last:
            unet.to(memory_format=torch.contiguous_format)
