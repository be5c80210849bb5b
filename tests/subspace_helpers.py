"""Helpers that write small weight stores through the store contract (tests only)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.builder.store import ShardMarker, WeightStore
from w2w_core.layout import LoraLayout
from w2w_core.model import TINY_UNET

_LAYOUT = None


def tiny_layout() -> LoraLayout:
    global _LAYOUT
    if _LAYOUT is None:
        _LAYOUT = LoraLayout.from_unet_config(TINY_UNET)
    return _LAYOUT


def planted_data(n: int, d: int, rank: int = 6, noise: float = 0.05, seed: int = 0, n_attrs: int = 3):
    """Low-rank + noise rows with per-dimension scales and offsets, plus binary attributes
    that are linear in the latent factors (so directions are recoverable)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, rank)) * np.linspace(3, 1, rank)
    basis = rng.normal(size=(rank, d))
    x = latent @ basis + noise * rng.normal(size=(n, d))
    x = x * rng.uniform(0.5, 2.0, size=d) + rng.normal(size=d)
    labels = {}
    names = ["male", "beard", "young"][:n_attrs]
    for i, name in enumerate(names):
        labels[name] = (latent[:, i] + 0.3 * rng.normal(size=n) > 0).astype(np.int8)
    return x.astype(np.float32), labels, latent


def write_space(out, n: int, k: int, seed: int = 3, scale: float = 1.0, quarantine: dict | None = None,
                disentangle: dict | None = None, config: dict | None = None) -> np.ndarray:
    """A planted store at `out` (rows scaled by `scale`) with its subspace (K=k, gram) and attribute
    directions; a space `WeightSpace.load(out)` opens, on the builtin tiny model. Returns the rows."""
    from pipeline.subspace.directions import compute_directions
    from pipeline.subspace.pca import compute_subspace

    x, labels, _ = planted_data(n, tiny_layout().numel, rank=8, noise=0.1, seed=seed)
    x = x * np.float32(scale)
    write_store(out, x, labels, rows_per_shard=16, quarantine=quarantine, config=config)
    compute_subspace(str(out), k, method="gram", progress=None)
    compute_directions(str(out), disentangle=disentangle or {}, progress=lambda m: None)
    return x


def write_store(out, x: np.ndarray, labels: dict, rows_per_shard: int = 8, layout: LoraLayout | None = None,
                finished: set | None = None, quarantine: dict | None = None, config: dict | None = None):
    """Write x as a store; shards not in `finished` get no marker; quarantine: identity -> reason."""
    layout = layout or tiny_layout()
    n = x.shape[0]
    assert x.shape[1] == layout.numel
    ids = [f"id{i:04d}" for i in range(n)]
    cols = {
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "identity": pa.array(ids),
        "source": pa.array(["test"] * n),
        "shard": pa.array((np.arange(n) // rows_per_shard).astype(np.int64)),
        **{a: pa.array(v.astype(np.int8), pa.int8()) for a, v in labels.items()},
    }
    meta = {"config": config or {"model": {"path": "builtin:tiny"}}}
    store = WeightStore.create(str(out), layout, pa.table(cols), rows_per_shard, list(labels), meta)
    quarantine = quarantine or {}
    for s in range(store.n_shards):
        if finished is not None and s not in finished:
            continue
        a, b = store.shard_rows(s)
        q = {i: r for i, r in quarantine.items() if ids.index(i) in range(a, b)}
        store.write_shard(s, x[a:b], ShardMarker(0, 0, 0, "", ids[a:b], quarantined=q))
    return store
