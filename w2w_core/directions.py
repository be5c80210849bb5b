"""Attribute directions in PC space (pure numpy/torch; no dask, no pipeline).

A direction for a binary attribute is fitted on the training models' PC coefficients:
  lstsq:    least squares of the centred labels on the centred coefficients (the published
            recipe: a linear classifier fitted by least squares), with a tiny ridge;
  logistic: L2-regularised logistic regression (Newton / IRLS), its weight vector.
Either way the stored direction is the unit vector w / |w| in PC coordinates.

Disentangling: `debias(directions, {"beard": ["male"]})` projects the span of the listed
directions (orthonormalised; the *fitted*, not already-debiased, directions) out of each
target and renormalises, so beard ⟂ male.

Calibrated strength: the std of the training models' projections onto the unit direction,
so an edit of strength 1.0 moves a model by one typical spread along the attribute.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

FIT_METHODS = ("lstsq", "logistic")


def _as_np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def fit_lstsq(coefficients, labels, ridge: float = 1e-8) -> np.ndarray:
    """Unit direction w/|w| with w = argmin |(C - mean C) w - (y - mean y)|^2 + ridge |w|^2 (scaled)."""
    c = _as_np(coefficients)
    y = _as_np(labels).reshape(-1)
    _check(c, y)
    cc = c - c.mean(axis=0)
    yc = y - y.mean()
    gram = cc.T @ cc
    lam = ridge * max(np.trace(gram) / gram.shape[0], 1e-30)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), cc.T @ yc)
    return _unit(w)


def fit_logistic(coefficients, labels, l2: float = 1e-3, iters: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Unit weight vector of an L2-regularised logistic regression (IRLS on standardised coefficients)."""
    c = _as_np(coefficients)
    y = _as_np(labels).reshape(-1)
    _check(c, y)
    mu, sd = c.mean(axis=0), c.std(axis=0)
    sd[sd == 0] = 1.0
    xs = np.hstack([(c - mu) / sd, np.ones((c.shape[0], 1))])
    w = np.zeros(xs.shape[1])
    reg = np.full(xs.shape[1], l2 * c.shape[0])
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ w, -50, 50)))
        grad = xs.T @ (p - y) + reg * w
        hess = (xs * (p * (1 - p))[:, None]).T @ xs + np.diag(reg) + 1e-9 * np.eye(xs.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < tol:
            break
    return _unit(w[:-1] / sd)  # back to the unstandardised PC coordinates


def fit_direction(coefficients, labels, method: str = "lstsq") -> np.ndarray:
    if method == "lstsq":
        return fit_lstsq(coefficients, labels)
    if method == "logistic":
        return fit_logistic(coefficients, labels)
    raise ValueError(f"unknown direction method {method!r}; choose one of: {', '.join(FIT_METHODS)}")


def debias(directions: Mapping[str, np.ndarray], against: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Project out of each target the span of the directions it is listed against; renormalise."""
    out = {k: _unit(_as_np(v)) for k, v in directions.items()}
    for target, others in against.items():
        others = [o for o in others if o != target]
        for name in [target, *others]:
            if name not in directions:
                raise ValueError(f"unknown attribute {name!r} in disentangle spec; valid: {', '.join(directions)}")
        if not others:
            continue
        basis = np.stack([_as_np(directions[o]) for o in others], axis=1)
        q, r = np.linalg.qr(basis)
        q = q[:, np.abs(np.diag(r)) > 1e-10]
        d = _as_np(directions[target])
        out[target] = _unit(d - q @ (q.T @ d))
    return out


def calibrated_strength(coefficients, unit_direction) -> float:
    """Std of the training models' projections onto the unit direction."""
    return float(np.std(_as_np(coefficients) @ _unit(_as_np(unit_direction)), ddof=1))


def parse_disentangle(specs: Sequence[str]) -> dict[str, list[str]]:
    """['beard:male', 'bangs:male,young'] -> {'beard': ['male'], 'bangs': ['male', 'young']}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        if ":" not in spec:
            raise ValueError(f"disentangle spec {spec!r} is not of the form target:other[,other...] (e.g. beard:male)")
        target, others = spec.split(":", 1)
        out.setdefault(target.strip(), []).extend(o.strip() for o in others.split(",") if o.strip())
    return out


def _unit(w: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(w)
    if not np.isfinite(n) or n == 0:
        raise ValueError("degenerate direction (zero norm): are the labels constant or the coefficients degenerate?")
    return w / n


def _check(c: np.ndarray, y: np.ndarray) -> None:
    if c.ndim != 2 or c.shape[0] != y.shape[0]:
        raise ValueError(f"coefficients {c.shape} and labels {y.shape} do not match")
    if np.unique(y).size < 2:
        raise ValueError("labels are constant: cannot fit a direction")
