"""Fit attribute directions for every binary attribute of the manifest; write subspace/directions.*.

Math lives in w2w_core.directions (pure numpy); this module reads the PCA outputs and the
manifest, applies the disentangling spec and writes the files atomically.

Disentangling: `disentangle` maps target -> attributes projected out of it (beard -> [male]).
`debias_against` is a default set applied to every other direction (e.g. ["male"]: every
direction except male itself is made orthogonal to male). Both default to empty.
"""
from __future__ import annotations

import sys
import time
from typing import Mapping, Sequence

import numpy as np

from w2w_core import directions as D


def fit_all(
    coefficients: np.ndarray,
    labels: Mapping[str, np.ndarray],
    method: str = "lstsq",
    disentangle: Mapping[str, Sequence[str]] | None = None,
    debias_against: Sequence[str] = (),
):
    """-> (unit directions after debiasing, raw fitted directions, strengths, info per attribute)."""
    raw, info = {}, {}
    for name, y in labels.items():
        y = np.asarray(y, dtype=np.float64)
        if np.unique(y).size < 2:
            info[name] = {"skipped": "constant labels"}
            continue
        raw[name] = D.fit_direction(coefficients, y, method)
    spec: dict[str, list[str]] = {}
    for name in raw:
        if name not in debias_against:
            spec[name] = [a for a in debias_against if a in raw]
    for target, others in (disentangle or {}).items():
        spec.setdefault(target, [])
        spec[target] = list(dict.fromkeys([*spec[target], *others]))
    dirs = D.debias(raw, spec)
    strengths = {}
    for name, d in dirs.items():
        strengths[name] = D.calibrated_strength(coefficients, d)
        proj = coefficients @ d
        y = np.asarray(labels[name], dtype=np.float64)
        thr = 0.5 * (proj[y > 0.5].mean() + proj[y <= 0.5].mean())
        info[name] = {
            "n_positive": int((y > 0.5).sum()),
            "n_negative": int((y <= 0.5).sum()),
            "strength": strengths[name],
            "train_accuracy": float(((proj > thr) == (y > 0.5)).mean()),
            "debiased_against": [o for o in spec.get(name, []) if o != name],
            "cosine_with_raw": float(d @ raw[name]),
        }
    return dirs, raw, strengths, info


def compute_directions(
    out: str,
    method: str = "lstsq",
    disentangle: Mapping[str, Sequence[str]] | None = None,
    debias_against: Sequence[str] = (),
    progress=lambda m: print(f"directions: {m}", file=sys.stderr, flush=True),
    components: int | None = None,
):
    """Fit every attribute's direction on the first `components` PC coefficients (default: the build
    config's `subspace.edit_components`, else all K) and write subspace/directions.*; the direction is
    zero on the PCs beyond, which only inversion uses."""
    import torch

    from pipeline.subspace.io import subspace_url, write_json_atomic, write_safetensors_atomic
    from w2w_core.space import WeightSpace

    t0 = time.time()
    space = WeightSpace.load(out)
    if not space.labels:
        raise ValueError(f"{out}/manifest.parquet has no attribute columns for the subspace's models")
    k_all = space.k
    if components is None:  # the config's value (0 = all) is capped at what this space has; an explicit one is checked
        configured = int((space.config.get("subspace") or {}).get("edit_components") or 0)
        components = min(configured or k_all, k_all)
    if not 1 <= components <= k_all:
        raise ValueError(f"--components {components} is out of range: this space has K={k_all} components (use 1..{k_all})")
    coeffs = space.coefficients.double().numpy()[:, :components]
    labels = {k: v.numpy() for k, v in space.labels.items()}
    for name in list(disentangle or {}) + [o for v in (disentangle or {}).values() for o in v] + list(debias_against):
        if name not in labels:
            raise ValueError(f"unknown attribute {name!r}; valid attributes: {', '.join(labels)}")
    progress(f"fitting {len(labels)} attributes ({method}) on {coeffs.shape[0]} models x {coeffs.shape[1]} PCs")
    dirs, raw, strengths, info = fit_all(coeffs, labels, method, disentangle, debias_against)
    tensors = {}
    for name, d in dirs.items():
        d = np.concatenate([d, np.zeros(k_all - components)])  # in the space's K coordinates
        dirs[name] = d
        tensors[f"direction.{name}"] = torch.from_numpy(d.astype(np.float32))
        tensors[f"strength.{name}"] = torch.tensor(strengths[name], dtype=torch.float32)
    base = subspace_url(out)
    write_safetensors_atomic(base + "/directions.safetensors", tensors, {"format": "w2w-directions/1"})
    meta = {
        "format": "w2w-directions/1",
        "method": method,
        "disentangle": {k: list(v) for k, v in (disentangle or {}).items()},
        "debias_against": list(debias_against),
        "attributes": info,
        "k": int(k_all),
        "edit_components": int(components),
        "pca_checksum": space.meta.get("source_checksum"),
        "seconds": time.time() - t0,
    }
    write_json_atomic(base + "/directions.json", meta)
    for name, i in info.items():
        if "skipped" in i:
            progress(f"{name}: skipped ({i['skipped']})")
        else:
            progress(f"{name}: strength {i['strength']:.3f}, train accuracy {i['train_accuracy']:.2f}"
                     + (f", debiased against {i['debiased_against']}" if i["debiased_against"] else ""))
    return dirs, strengths, meta
