"""Shared pieces of both identity trainers: cached inputs, per-identity randomness, the loss.

Everything an identity's training draws at random (LoRA A init, image order, class-image
choice, timesteps, noise) comes from ONE torch.Generator seeded from (train.seed, identity
seed) and is drawn in the same order by the reference (peft) trainer and the batched
multi-LoRA trainer, so the two are exactly comparable.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from w2w_core.layout import LoraLayout

CLASS_LATENTS_KEY = "class_latents"
Progress = Callable[[int, int], None]  # (identities finished, identities total)


# ---------------------------------------------------------------------- inputs and results
@dataclass
class IdentityInput:
    identity_id: str
    images: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    seed: int


@dataclass
class TrainResult:
    identity_id: str
    vector: torch.Tensor | None  # float32, (layout.numel,); None when quarantined
    status: str  # "ok" | "quarantined"
    reason: str = ""
    final_loss: float = float("nan")
    loss_mean_last10: float = float("nan")
    steps: int = 0
    losses: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def quarantined(cls, identity_id: str, reason: str, losses: Sequence[float] = (), steps: int = 0) -> "TrainResult":
        return cls(identity_id, None, "quarantined", reason, *_loss_stats(losses), steps=steps, losses=list(losses))

    @classmethod
    def ok(cls, identity_id: str, vector: torch.Tensor, losses: Sequence[float]) -> "TrainResult":
        return cls(identity_id, vector, "ok", "", *_loss_stats(losses), steps=len(losses), losses=list(losses))


def _loss_stats(losses: Sequence[float]) -> tuple[float, float]:
    if not losses:
        return float("nan"), float("nan")
    tail = list(losses)[-10:]
    return float(losses[-1]), float(sum(tail) / len(tail))


@dataclass
class PreparedIdentity:
    """An identity with its VAE latents cached (encoded once, reused by every step)."""

    identity_id: str
    latents: torch.Tensor  # (n, C, h, w) scaled latents, on the base device
    seed: int


@dataclass
class TrainContext:
    """What every identity shares: prompt embeddings and prior-preservation class latents."""

    instance_embeds: torch.Tensor  # (1, seq, dim)
    class_embeds: torch.Tensor  # (1, seq, dim)
    class_latents: torch.Tensor | None  # (N, C, h, w) or None (no prior preservation)


# ---------------------------------------------------------------------- caching
def prepare_identity(base, inp: IdentityInput, chunk: int = 16) -> PreparedIdentity:
    """Encode an identity's images to latents ONCE (posterior mean, deterministic)."""
    images = inp.images
    parts = [base.encode_images(images[i : i + chunk]) for i in range(0, images.shape[0], chunk)]
    return PreparedIdentity(inp.identity_id, torch.cat(parts).float(), int(inp.seed))


def make_context(base, train_cfg, class_latents: torch.Tensor | None) -> TrainContext:
    """Encode the instance and class prompts ONCE."""
    embeds = base.encode_prompts([train_cfg.instance_prompt, train_cfg.class_prompt])
    use_prior = train_cfg.prior_loss_weight > 0 and class_latents is not None and class_latents.shape[0] > 0
    return TrainContext(
        instance_embeds=embeds[0:1],
        class_embeds=embeds[1:2],
        class_latents=class_latents.to(base.device).float() if use_prior else None,
    )


@torch.no_grad()
def generate_class_latents(base, train_cfg, num: int | None = None, seed: int | None = None, chunk: int = 8) -> torch.Tensor:
    """Prior-preservation images of `class_prompt`, generated ONCE by the base model (as latents).

    DDIM with `class_image_steps` steps, seeded by (train.seed) unless `seed` is given.
    Returns (num, C, h, w) float32 latents in the UNet's (scaled) latent space, on CPU.
    """
    num = int(train_cfg.num_class_images if num is None else num)
    seed = int(train_cfg.seed if seed is None else seed)
    if num <= 0:
        return torch.zeros(0)
    pipe = base.pipeline()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        lat = pipe(
            prompt=[train_cfg.class_prompt] * n,
            num_inference_steps=int(train_cfg.class_image_steps),
            height=base.resolution,
            width=base.resolution,
            generator=gen,
            output_type="latent",
        ).images
        out.append(lat.float().cpu())
    return torch.cat(out)


def save_class_latents(latents: torch.Tensor, path: str | Path, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({CLASS_LATENTS_KEY: latents.contiguous().float().cpu()}, str(tmp),
              metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def load_class_latents(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class latents not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(CLASS_LATENTS_KEY)


# ---------------------------------------------------------------------- optimisation
def make_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg):
    """train.lr_scheduler as diffusers' training scripts build it; one `.step()` per training step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(train_cfg.lr_scheduler, optimizer, num_warmup_steps=int(train_cfg.lr_warmup_steps),
                         num_training_steps=int(train_cfg.steps))


# ---------------------------------------------------------------------- per-identity randomness
def identity_generator(train_seed: int, identity_seed: int) -> torch.Generator:
    """A CPU generator that depends only on (train.seed, identity seed)."""
    digest = hashlib.sha256(f"w2w-train:{int(train_seed)}:{int(identity_seed)}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def init_lora_A(layout: LoraLayout, gen: torch.Generator, train_cfg=None) -> dict[str, torch.Tensor]:
    """lora_A for each adapted module (layout order): normal, std 1/rank (peft's gaussian init). B = 0.

    The shape is the layout's: (rank, in) for a linear, (rank, in, kh, kw) for a convolution.

    With `train.shared_init` (the default) every identity starts from the same A, drawn from a
    generator seeded by train.seed alone: the rows of the store then differ by what training
    learned, not by each model's random initialisation, which would otherwise dominate the PCA.
    Otherwise A comes from the identity's own generator `gen`.
    """
    if train_cfg is not None and getattr(train_cfg, "shared_init", False):
        gen = identity_generator(train_cfg.seed, -1)
    out = {}
    shapes = layout.shapes
    for module in layout.modules:
        out[module] = torch.randn(shapes[f"{module}.lora_A.weight"], generator=gen) / layout.rank
    return out


class IdentitySampler:
    """Draws one identity's training samples for each step from its own generator.

    Per step, in this order: instance indices (epoch-wise permutations of the identity's
    images), class indices (uniform), timesteps, noise. Returns CPU tensors.
    """

    def __init__(self, gen: torch.Generator, num_images: int, num_class: int, batch_size: int, num_timesteps: int):
        self.gen = gen
        self.n = int(num_images)
        self.n_class = int(num_class)
        self.bs = int(batch_size)
        self.T = int(num_timesteps)
        self._order: list[int] = []

    @property
    def samples_per_step(self) -> int:
        return self.bs * (2 if self.n_class > 0 else 1)

    def _next_instances(self) -> list[int]:
        out = []
        while len(out) < self.bs:
            if not self._order:
                self._order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self._order.pop(0))
        return out

    def draw(self, latent_shape: Sequence[int]):
        inst = torch.tensor(self._next_instances(), dtype=torch.long)
        cls = torch.randint(0, self.n_class, (self.bs,), generator=self.gen) if self.n_class > 0 else None
        m = self.samples_per_step
        timesteps = torch.randint(0, self.T, (m,), generator=self.gen)
        noise = torch.randn((m, *latent_shape), generator=self.gen)
        return inst, cls, timesteps, noise


def step_inputs(prepared: PreparedIdentity, ctx: TrainContext, sampler: IdentitySampler, device):
    """One identity's (clean latents, noise, timesteps, text embeddings) for one step: m samples,
    instance samples first, then class samples."""
    lat = prepared.latents
    inst, cls, timesteps, noise = sampler.draw(lat.shape[1:])
    clean = [lat[inst.to(lat.device)]]
    embeds = [ctx.instance_embeds.expand(len(inst), -1, -1)]
    if cls is not None:
        clean.append(ctx.class_latents[cls.to(ctx.class_latents.device)])
        embeds.append(ctx.class_embeds.expand(len(cls), -1, -1))
    return torch.cat(clean).to(device), noise.to(device), timesteps.to(device), torch.cat(embeds).to(device)


# ---------------------------------------------------------------------- the loss
def noisy_inputs(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """DDPM forward process + the training target (epsilon, or v for v-prediction models)."""
    noisy = scheduler.add_noise(clean, noise, timesteps)
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return noisy, target


def identity_losses(pred: torch.Tensor, target: torch.Tensor, num_identities: int, batch_size: int,
                    prior_loss_weight: float, with_prior: bool) -> torch.Tensor:
    """Per-identity DreamBooth loss, shape (K,): mse(instance) + prior_loss_weight * mse(class).

    `pred`/`target` are identity-major: K groups of m samples, the first `batch_size` of each
    group instance samples, the rest class samples.
    """
    K = int(num_identities)
    pred = pred.float().reshape(K, -1, *pred.shape[1:])
    target = target.float().reshape(K, -1, *target.shape[1:])
    dims = tuple(range(1, pred.ndim))
    sq = (pred - target).pow(2)
    loss = sq[:, :batch_size].mean(dim=dims)
    if with_prior:
        loss = loss + prior_loss_weight * sq[:, batch_size:].mean(dim=dims)
    return loss


def is_finite(x: float) -> bool:
    return math.isfinite(x)
