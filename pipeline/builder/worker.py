"""The one place the builder calls a trainer: `train_shard` turns identity ids into a block of rows.

`trainer: synthetic` (deterministic per-identity vectors, instant) and the real trainers
(`batched`, `reference` from pipeline.train) share everything here except the one call that
produces vectors: loading images, quarantining unreadable identities and non-finite results,
assembling the (rows, numel) block with NaN rows for quarantined identities.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SYNTHETIC_SCALE = 0.01


def identity_seed(base_seed: int, identity_id: str) -> int:
    """A per-identity seed that does not depend on shard order or worker (resume is exact)."""
    digest = hashlib.sha256(f"{base_seed}:{identity_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def synthetic_vector(identity_id: str, numel: int, seed: int = 0) -> np.ndarray:
    """The synthetic trainer's output: N(0, 0.01^2) from a generator seeded by the identity id."""
    digest = hashlib.sha256(f"synthetic:{seed}:{identity_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.standard_normal(numel, dtype=np.float32) * np.float32(SYNTHETIC_SCALE)


def synthetic_layout(name: str):
    from w2w_core.layout import LoraLayout
    from w2w_core.model import SD15_UNET, TINY_UNET

    unet = {"tiny": TINY_UNET, "sd15": SD15_UNET}[name]
    return LoraLayout.from_unet_config(unet)


def worker_threads(cfg) -> int:
    """Torch intra-op threads of one worker: its CPU slots (`build.cpus_per_worker`, at least 1)."""
    return max(1, int(float(cfg.build.cpus_per_worker or 1)))


def pin_torch_threads(cfg) -> int:
    """Fix torch's thread count before any training in this process.

    Float reductions (matmul/conv) on CPU are split across threads, so the same shard trained
    with 1 thread and with 2 threads differs in the last bits (measured: class latents and the
    trained block both differ), while the same thread count in two processes gives identical
    bytes. Ray's default (OMP_NUM_THREADS from the actor's CPUs, or torch's own default for the
    cores it sees) is not something to rely on: a resume, a restarted actor and a plain loop
    must all train with the same count. Returns the count.
    """
    import torch

    n = worker_threads(cfg)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def virtual_ids(n: int) -> list[str]:
    return [f"v{i:06d}" for i in range(n)]


@dataclass
class ShardResult:
    block: np.ndarray
    losses: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)


class TrainerContext:
    """What one worker holds for its whole life: config, layout, base model (loaded once), source."""

    def __init__(self, cfg, numel: int, layout=None, base=None):
        self.cfg = cfg
        self.numel = int(numel)
        self.layout = layout
        self.base = base
        self.class_latents = None
        self._source = None

    @classmethod
    def create(cls, cfg) -> "TrainerContext":
        """Load what the configured trainer needs; the synthetic trainer with a named layout loads nothing."""
        b = cfg.build
        if b.trainer == "synthetic" and b.synthetic_layout:
            layout = synthetic_layout(b.synthetic_layout)
            return cls(cfg, layout.numel, layout=layout)
        from w2w_core.layout import LoraLayout
        from w2w_core.model import load_base_model

        pin_torch_threads(cfg)
        base = load_base_model(cfg.model)
        layout = LoraLayout.from_unet(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        return cls(cfg, layout.numel, layout=layout, base=base)

    @property
    def fingerprint(self) -> str:
        if self.base is not None:
            return str(self.base.fingerprint)
        return f"synthetic:{self.cfg.build.synthetic_layout}"

    @property
    def source(self):
        if self._source is None and not self.cfg.build.synthetic_identities:
            from pipeline.data.source import IdentitySource

            self._source = IdentitySource.from_config(self.cfg.data)
        return self._source

    # ------------------------------------------------------------------ class latents
    def ensure_class_latents(self, path: str) -> None:
        """Generate prior-preservation latents once per build (at `path`, local or fsspec URL), or load them."""
        if not self.needs_class_latents:
            return
        import tempfile

        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        from pipeline import train

        fs, remote = fsspec.core.url_to_fs(path)
        local_fs = isinstance(fs, LocalFileSystem)
        if fs.exists(remote):
            if local_fs:
                self.class_latents = train.load_class_latents(remote)
            else:  # safetensors reads local files: copy it down first
                with tempfile.TemporaryDirectory(prefix="w2wcl") as d:
                    fs.get(remote, f"{d}/cl.safetensors")
                    self.class_latents = train.load_class_latents(f"{d}/cl.safetensors")
            return
        latents = train.generate_class_latents(self.base, self.cfg.train)
        if local_fs:
            tmp = remote + ".partial"
            train.save_class_latents(latents, tmp)
            fs.mv(tmp, remote)
        else:
            with tempfile.TemporaryDirectory(prefix="w2wcl") as d:
                train.save_class_latents(latents, f"{d}/cl.safetensors")
                fs.put(f"{d}/cl.safetensors", remote + ".partial")
            fs.mv(remote + ".partial", remote)
        self.class_latents = latents

    @property
    def needs_class_latents(self) -> bool:
        return self.cfg.build.trainer != "synthetic" and self.cfg.train.prior_loss_weight > 0


def train_shard(
    ctx: TrainerContext,
    identity_ids: list[str],
    progress: Callable[[dict], None] | None = None,
) -> ShardResult:
    """Train (or synthesise) one shard's identities -> block (len(ids), numel), NaN rows quarantined."""
    cfg = ctx.cfg
    block = np.full((len(identity_ids), ctx.numel), np.nan, dtype=np.float32)
    result = ShardResult(block=block)
    # 1. inputs: images per identity; unreadable data quarantines that identity only.
    images: dict[str, object] = {}
    if not cfg.build.synthetic_identities:
        from pipeline.data.source import IdentityDataError

        for ident in identity_ids:
            try:
                images[ident] = ctx.source.load_images(ident, cfg.data.images_per_identity, cfg.model.resolution)
            except IdentityDataError as err:
                result.quarantined[ident] = f"unreadable data: {err}"
    todo = [i for i in identity_ids if i not in result.quarantined]
    # 2. vectors
    vectors: dict[str, np.ndarray] = {}
    if cfg.build.synthetic_delay_s:  # fault-test knob (execution only): a shard slow enough to kill
        time.sleep(cfg.build.synthetic_delay_s)
    if cfg.build.trainer == "synthetic":
        for ident in todo:
            vectors[ident] = synthetic_vector(ident, ctx.numel, cfg.train.seed)
            result.losses[ident] = 0.0
    else:
        from pipeline.train import IdentityInput, train_identities

        inputs = [IdentityInput(i, images[i], identity_seed(cfg.train.seed, i)) for i in todo]
        trained = train_identities(
            ctx.base,
            ctx.layout,
            cfg.train,
            inputs,
            trainer=cfg.build.trainer,
            class_latents=ctx.class_latents,
            progress=(lambda *a, **k: progress({"progress": list(a)})) if progress else None,
        )
        for r in trained:
            if r.status != "ok" or r.vector is None:
                result.quarantined[r.identity_id] = r.reason or "trainer quarantined it"
                continue
            vec = r.vector.detach().cpu().numpy() if hasattr(r.vector, "detach") else np.asarray(r.vector)
            vectors[r.identity_id] = vec.astype(np.float32).reshape(-1)
            result.losses[r.identity_id] = float(r.final_loss)
    # 3. block, quarantining non-finite results
    for row, ident in enumerate(identity_ids):
        vec = vectors.get(ident)
        if vec is None:
            result.quarantined.setdefault(ident, "no result from trainer")
            continue
        if not np.isfinite(vec).all():
            result.quarantined[ident] = "non-finite weights (NaN/inf) after training"
            result.losses.pop(ident, None)
            continue
        block[row] = vec
    return result
