"""Reference trainer: one identity -> one LoRA with peft (the published DreamBooth-LoRA recipe).

Slow by design (one identity per forward/backward); it is the ground truth the batched
multi-LoRA trainer is tested against.
"""
from __future__ import annotations

import contextlib

import peft
import torch

from pipeline.train.common import (
    IdentitySampler,
    PreparedIdentity,
    TrainContext,
    TrainResult,
    identity_generator,
    identity_losses,
    init_lora_A,
    is_finite,
    make_lr_scheduler,
    noisy_inputs,
    step_inputs,
)
from w2w_core.layout import LoraLayout
from w2w_core.multi_lora import check_layout_modules

ADAPTER = "default"


def autocast_context(device: torch.device, mixed_precision: str):
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def remove_peft_adapter(unet: torch.nn.Module) -> None:
    """Put the original linears back and drop peft's bookkeeping (the base stays clean)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(unet, attr):
            try:
                delattr(unet, attr)
            except AttributeError:
                pass


def train_reference(base, layout: LoraLayout, train_cfg, prepared: PreparedIdentity, ctx: TrainContext,
                    sync_loss: bool = True) -> TrainResult:
    """Train ONE identity with a peft adapter on `base.unet`; the adapter is removed afterwards."""
    unet = base.unet
    check_layout_modules(layout, unet)
    if prepared.latents.shape[0] == 0:
        return TrainResult.quarantined(prepared.identity_id, "identity has zero training images")
    unet = peft.inject_adapter_in_model(layout.peft_config(), unet, adapter_name=ADAPTER)
    try:
        state = peft.get_peft_model_state_dict(unet, adapter_name=ADAPTER)
        layout.check_keys(state.keys())
        return _train(base, unet, layout, train_cfg, prepared, ctx, sync_loss)
    finally:
        remove_peft_adapter(unet)


def _train(base, unet, layout, train_cfg, prepared, ctx, sync_loss) -> TrainResult:
    device = base.device
    gen = identity_generator(train_cfg.seed, prepared.seed)
    A_init = init_lora_A(layout, gen, train_cfg)
    params = []
    for module_name in layout.modules:
        module = unet.get_submodule(module_name)
        lora_A = module.lora_A[ADAPTER].weight
        lora_B = module.lora_B[ADAPTER].weight
        with torch.no_grad():
            lora_A.data = A_init[module_name].to(device=device, dtype=torch.float32)
            lora_B.data = torch.zeros(lora_B.shape, device=device, dtype=torch.float32)
        lora_A.requires_grad_(bool(train_cfg.train_lora_a))
        lora_B.requires_grad_(True)
        params += [lora_A, lora_B] if lora_A.requires_grad else [lora_B]
    optimizer = torch.optim.AdamW(
        params,
        lr=train_cfg.lr,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        eps=train_cfg.adam_eps,
        weight_decay=train_cfg.weight_decay,
    )
    lr_scheduler = make_lr_scheduler(optimizer, train_cfg)
    with_prior = ctx.class_latents is not None
    sampler = IdentitySampler(gen, prepared.latents.shape[0], ctx.class_latents.shape[0] if with_prior else 0,
                              train_cfg.batch_size, base.scheduler.config.num_train_timesteps)
    losses: list[float] = []
    unet.train(False)
    for step in range(int(train_cfg.steps)):
        clean, noise, timesteps, embeds = step_inputs(prepared, ctx, sampler, device)
        noisy, target = noisy_inputs(base.scheduler, clean, noise, timesteps)
        with autocast_context(device, train_cfg.mixed_precision):
            pred = unet(noisy.to(base.dtype), timesteps, embeds.to(base.dtype)).sample
        loss = identity_losses(pred, target, 1, train_cfg.batch_size, train_cfg.prior_loss_weight, with_prior)[0]
        value = float(loss.detach()) if sync_loss else 0.0
        if sync_loss and not is_finite(value):
            return TrainResult.quarantined(prepared.identity_id, f"non-finite loss at step {step}", losses, steps=step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        losses.append(value)
    state = peft.get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return TrainResult.ok(prepared.identity_id, layout.flatten(state), losses)
