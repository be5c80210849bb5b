"""Pretrain the tiny world's base diffusion model on SynthFaces (reproducible; CPU or GPU).

    python -m jobs.pretrain_tiny --out w2w_core/assets/tiny --seed 0
    python -m jobs.pretrain_tiny --out /tmp/tiny --device cuda --unet-batch 256 --unet-steps 12000

Stages, all with the SD1.5 code paths (diffusers AutoencoderKL / UNet2DConditionModel /
DDPMScheduler, transformers CLIPTextModel):
  1. VAE: L1 reconstruction + small KL on random crops, then full 64x64 images.
  2. Latent scaling factor set so that the training latents have unit std (SD's 0.18215 idea).
  3. UNet + text encoder jointly: epsilon-MSE with the DDPMScheduler from the components,
     on cached VAE latents, captions built from the identity's attributes and (--captions traits,
     the default) the traits identities differ in: "a photo of a person, male long blonde hair
     blue eyes fair skin beard"; plain "a photo of a person" (15%), or "" for CFG (10%).
Identities: SynthFaces seed 1000 (SEED_PRETRAIN), disjoint from the LoRA/demo identities (seed 0)
and the evaluator identities (seeds 2000/3000). See docs/TINY_WORLD.md.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

# words used for each attribute value (every word is in TINY_VOCAB_WORDS); None: not named
ATTR_WORDS = {
    "male": ("male", "female"),
    "young": ("young", "old"),
    "beard": ("beard", None),
    "eyeglasses": ("eyeglasses", None),
    "bangs": ("bangs", None),
    "smiling": ("smiling", None),
    "pale_skin": ("pale skin", None),
}
CLASS_PROMPT = "a photo of a person"


def caption(attrs: dict[str, int], rng: random.Random, traits: list[str] = (), p_plain: float = 0.15,
            p_empty: float = 0.1) -> str:
    """Caption for one training image: attribute words and trait phrases (each kept with prob 0.85,
    shuffled). With trait phrases the skin phrase already says "pale skin"."""
    r = rng.random()
    if r < p_empty:
        return ""
    if r < p_empty + p_plain:
        return CLASS_PROMPT
    words = [pos if attrs.get(name, 0) else neg for name, (pos, neg) in ATTR_WORDS.items()
             if not (traits and name == "pale_skin")]
    words = [w for w in words + list(traits) if w is not None and rng.random() < 0.85]
    rng.shuffle(words)
    return CLASS_PROMPT + (", " + " ".join(words) if words else "")


def _render_identities(args: tuple[int, int, int, int]):
    """Images, attributes and trait phrases of identities [start, stop) (one pool task)."""
    import numpy as np

    from pipeline.data.synthfaces import render, sample_identity, trait_phrases

    seed, start, stop, images_per_identity = args
    images, attrs, traits = [], [], []
    for i in range(start, stop):
        ident = sample_identity(seed, i)
        phrases = trait_phrases(ident)
        images += [render(ident, k) for k in range(images_per_identity)]
        attrs += [ident.attributes] * images_per_identity
        traits += [phrases] * images_per_identity
    return np.stack(images), attrs, traits


def make_dataset(n_identities: int, images_per_identity: int, seed: int, workers: int = 1):
    """SynthFaces images (as a [-1, 1] tensor) with each image's attributes and trait phrases.
    Identical for any number of workers (each identity renders deterministically)."""
    import numpy as np

    from pipeline.data.synthfaces import to_tensor

    step = 50
    tasks = [(seed, a, min(a + step, n_identities), images_per_identity) for a in range(0, n_identities, step)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_identities, tasks))
    else:
        parts = [_render_identities(t) for t in tasks]
    images = np.concatenate([p[0] for p in parts])
    attrs = [a for p in parts for a in p[1]]
    traits = [t for p in parts for t in p[2]]
    return to_tensor(images), attrs, traits


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _progress(step: int, steps: int, t0: float, minutes: float) -> float:
    """Fraction of a stage done: by steps, or by wall-clock when the time budget runs out first.

    On a fast or idle machine the step count decides (bit-reproducible); on a slow/shared one the
    time budget ends the stage with the learning-rate schedule still fully annealed.
    """
    by_steps = step / max(1, steps)
    by_time = (time.time() - t0) / (60 * minutes) if minutes > 0 else 0.0
    return max(by_steps, by_time)


def lr_at(progress: float, base: float, warmup: float = 0.04) -> float:
    if progress < warmup:
        return base * (0.05 + 0.95 * progress / warmup)
    t = (progress - warmup) / (1 - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def annealed_steps(opt, base_lr: float, steps: int, minutes: float):
    """Yield (step, progress) until the stage's step count or time budget is used up, setting
    every param group's learning rate for that step first (warmup, then cosine)."""
    t0 = time.time()
    step = 0
    while (progress := _progress(step, steps, t0, minutes)) < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, base_lr)
        yield step, progress
        step += 1


def _log_every(steps: int) -> int:
    return max(25, steps // 40)


def train_vae(vae, images, args, gen):
    """images live on the training device; `gen` (CPU) draws batch indices and crops."""
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    n = images.shape[0]
    device = images.device
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    t0 = time.time()
    step = -1
    for step, progress in annealed_steps(opt, args.vae_lr, args.vae_steps, args.vae_minutes):
        idx = torch.randint(0, n, (args.vae_batch,), generator=gen)
        x = images[idx.to(device)]
        full = progress >= 1.0 - args.vae_full_fraction
        if not full:  # random crops: the VAE is convolutional, crops are 4x cheaper
            c = args.vae_crop
            oy, ox = torch.randint(0, 64 - c + 1, (2,), generator=gen).tolist()
            x = x[:, :, oy : oy + c, ox : ox + c]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=noise_gen)
        rec = vae.decode(z).sample
        rec_loss = (rec - x).abs().mean()
        kl = post.kl().mean() / (z[0].numel())
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % _log_every(args.vae_steps) == 0:
            log(f"vae step {step} ({progress:.0%}) {'full' if full else 'crop'} l1 {rec_loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    args.vae_steps_done = step + 1
    vae.eval()
    return time.time() - t0


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, attrs, traits, args, gen):
    """latents live on the training device; `gen` (CPU) draws batch indices and timesteps."""
    import torch

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-4)
    unet.train()
    text_encoder.train()
    rng = random.Random(args.seed)
    n = latents.shape[0]
    device = latents.device
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    t0 = time.time()
    ema = None
    step = -1
    for step, progress in annealed_steps(opt, args.unet_lr, args.unet_steps, args.unet_minutes):
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        z0 = latents[idx.to(device)]
        noise = torch.randn(z0.shape, generator=noise_gen, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen).to(device)
        zt = scheduler.add_noise(z0, noise, t)
        caps = [caption(attrs[i], rng, traits[i] if args.captions == "traits" else ()) for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        cond = text_encoder(ids)[0]
        pred = unet(zt, t, cond).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % _log_every(args.unet_steps) == 0:  # the only host sync of the loop
            ema = loss.item() if ema is None else 0.8 * ema + 0.2 * loss.item()
            log(f"unet step {step} ({progress:.0%}) loss {ema:.4f} ({time.time() - t0:.0f}s)")
    args.unet_steps_done = step + 1
    args.unet_final_loss = ema
    unet.eval()
    text_encoder.eval()
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="w2w_core/assets/tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--identities", type=int, default=800, help="pretraining identities (SynthFaces seed 1000)")
    p.add_argument("--images", type=int, default=6, help="images per pretraining identity")
    p.add_argument("--captions", choices=["attributes", "traits"], default="traits",
                   help="name the attributes only, or also hair, eye colour and skin tone")
    p.add_argument("--vae-from", default="", help="reuse the VAE of an earlier output folder (skips stage 1)")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-minutes", type=float, default=6.0, help="VAE stage time budget (0 = steps only)")
    p.add_argument("--vae-full-fraction", type=float, default=0.15, help="last fraction of the VAE stage on full 64x64 images")
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4, help="KL weight (per latent element)")
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--unet-minutes", type=float, default=16.0, help="UNet stage time budget (0 = steps only)")
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1.5e-3)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is far faster on a shared, oversubscribed CPU")
    p.add_argument("--data-workers", type=int, default=1, help="processes rendering the SynthFaces images")
    args = p.parse_args(argv)
    args._t_start = time.time()

    import torch

    from pipeline.data.synthfaces import SEED_PRETRAIN
    from w2w_core.model import resolve_device, save_components, tiny_components

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log(f"pretrain_tiny on {device}: {' '.join(sys.argv[1:]) or '(defaults)'}")
    comps = tiny_components(args.seed)
    if args.vae_from:
        from diffusers import AutoencoderKL

        comps["vae"] = AutoencoderKL.from_pretrained(str(Path(args.vae_from) / "vae"))
    for name in ("unet", "vae", "text_encoder"):
        comps[name].to(device)
    images, attrs, traits = make_dataset(args.identities, args.images, SEED_PRETRAIN, args.data_workers)
    images = images.to(device)
    log(f"data: {images.shape[0]} SynthFaces images of {args.identities} identities (seed {SEED_PRETRAIN})")
    if args.vae_from:
        vae_s, args.vae_steps_done = 0.0, 0
    else:
        vae_s = train_vae(comps["vae"], images, args, gen)
    with torch.no_grad():
        comps["vae"].eval()
        lat = torch.cat([comps["vae"].encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        rec = comps["vae"].decode(lat[:256]).sample
        vae_l1 = (rec - images[:256]).abs().mean().item()
    scaling = float(1.0 / lat.std()) if not args.vae_from else float(comps["vae"].config.scaling_factor)
    comps["vae"].register_to_config(scaling_factor=scaling)
    latents = lat * scaling
    log(f"vae done in {vae_s:.0f}s; full-image L1 {vae_l1:.4f}; latent scaling_factor {scaling:.4f}")
    unet_s = train_unet(comps["unet"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"], latents, attrs,
                        traits, args, gen)
    total = time.time() - args._t_start
    for name in ("unet", "vae", "text_encoder"):
        comps[name].to("cpu")
    out = save_components(comps, args.out)
    meta = dict(
        command="python -m jobs.pretrain_tiny " + " ".join(sys.argv[1:]),
        seed=args.seed,
        pretrain_identity_seed=SEED_PRETRAIN,
        identities=args.identities,
        images_per_identity=args.images,
        captions=args.captions,
        vae_from=args.vae_from,
        vae_steps=args.vae_steps_done,
        vae_batch=args.vae_batch,
        unet_steps=args.unet_steps_done,
        unet_batch=args.unet_batch,
        unet_lr=args.unet_lr,
        unet_final_loss=args.unet_final_loss,
        vae_seconds=round(vae_s, 1),
        unet_seconds=round(unet_s, 1),
        total_seconds=round(total, 1),
        vae_full_image_l1=round(vae_l1, 4),
        latent_scaling_factor=scaling,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        threads=args.threads,
        torch=torch.__version__,
    )
    (Path(out) / "pretrain_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"saved to {out} in {total:.0f}s total: {json.dumps(meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
