"""Out-of-core PCA of the weight store with Dask (REFERENCE.md section 3 and 5).

The matrix is never loaded whole: every step streams row blocks of
`dask.array.from_zarr(store.weights_url, component="weights")`.

Steps
  1. per-dimension mean and std (ddof=1) of the valid rows (one pass; std == 0 -> 1);
  2. Z = (X - mean) / std, lazily, in blocks of `block_rows` rows;
  3. top-K components by
     randomized: `dask.array.linalg.svd_compressed` (power iterations, seeded), then one
                 more pass for the coefficients Z @ components^T;
     gram:       G = Z Z^T (N x N, float64) accumulated panel by panel (a panel of rows held
                 in memory against every later row block; symmetric, so ~half the pairs),
                 eigh(G) = U diag(S^2) U^T, then components = S^-1 U^T Z in a second pass.
                 Exact; memory O(N^2 + panel), so it is the method when N << D;
  4. sign convention: the largest-|entry| of each component is positive (both methods agree).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

METHODS = ("gram", "randomized")


class SubspaceError(ValueError):
    """The PCA request cannot be satisfied (message says why and what is possible)."""


@dataclass
class PCAResult:
    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64, zeros replaced by 1
    components: np.ndarray  # (K, D), rows orthonormal
    singular_values: np.ndarray  # (K,)
    coefficients: np.ndarray  # (N, K) = Z @ components^T
    explained_variance_ratio: np.ndarray  # (K,)
    rows: np.ndarray  # (N,) int64 store rows
    method: str
    timings: dict = field(default_factory=dict)
    zero_std_dims: int = 0


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def default_progress(msg: str) -> None:
    print(f"pca: {msg}", file=sys.stderr, flush=True)


# dask computations that run longer than this show a progress bar on stderr (when progress is on)
PROGRESS_BAR_AFTER_S = 5.0


def dask_progress_bar(progress):
    """dask's ProgressBar on stderr for the long passes (minutes at scale), or nothing when quiet."""
    import contextlib

    from dask.diagnostics import ProgressBar

    if progress is None:
        return contextlib.nullcontext()
    return ProgressBar(minimum=PROGRESS_BAR_AFTER_S, dt=1.0, out=sys.stderr)


# ---------------------------------------------------------------------- dask pieces
def select_rows(x, rows: np.ndarray, block_rows: int):
    """Valid rows of the lazy matrix, re-blocked to `block_rows` rows per block."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise SubspaceError("the store has no valid rows (no finished shard, or every identity quarantined)")
    contiguous = rows[-1] - rows[0] + 1 == rows.size and np.all(np.diff(rows) == 1)
    sel = x[int(rows[0]) : int(rows[-1]) + 1] if contiguous else x[rows]
    return sel.rechunk((block_rows, x.shape[1]))


def column_stats(x, progress=None):
    """mean, std (ddof=1, float64) per column of the lazy (N, D) matrix, in one pass."""
    import dask

    n = int(x.shape[0])
    # shifted sums (shift = mean of the first block) avoid cancellation in sum(x^2) - n mean^2
    shift = np.asarray(x[: min(n, x.chunks[0][0])].astype(np.float64).mean(axis=0).compute())
    xs = x.astype(np.float64) - shift
    s1, s2 = dask.compute(xs.sum(axis=0), (xs * xs).sum(axis=0))
    mean_shifted = s1 / n
    var = np.maximum(s2 - n * mean_shifted**2, 0.0) / max(n - 1, 1)
    mean = shift + mean_shifted
    std = np.sqrt(var)
    return mean, std


def guard_std(std: np.ndarray) -> tuple[np.ndarray, int]:
    bad = ~np.isfinite(std) | (std < 1e-12)
    out = std.copy()
    out[bad] = 1.0
    return out, int(bad.sum())


def standardize(x, mean: np.ndarray, std: np.ndarray, dtype=np.float64):
    return ((x.astype(dtype) - mean.astype(dtype)) / std.astype(dtype)).astype(dtype)


def iter_blocks(z, lookahead: int = 2, progress=None, what: str = "pass"):
    """Yield (start, stop, block ndarray) over the row blocks of z, `lookahead` computed together
    (a tqdm bar on stderr names the pass when progress is on)."""
    import dask
    from tqdm import tqdm

    starts = np.concatenate([[0], np.cumsum(z.chunks[0])])
    nb = len(z.chunks[0])
    with tqdm(total=int(starts[-1]), desc=f"pca: {what}", unit="rows", file=sys.stderr,
              disable=progress is None, delay=PROGRESS_BAR_AFTER_S) as bar:
        for i in range(0, nb, lookahead):
            idx = list(range(i, min(nb, i + lookahead)))
            blocks = dask.compute(*[z.blocks[j] for j in idx])
            for j, b in zip(idx, blocks):
                yield int(starts[j]), int(starts[j + 1]), np.asarray(b)
                bar.update(int(starts[j + 1] - starts[j]))


def fix_signs(components: np.ndarray, coefficients: np.ndarray | None = None):
    """Flip each component so its largest-|entry| is positive (coefficients follow)."""
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1.0
    components = components * signs[:, None]
    if coefficients is not None:
        coefficients = coefficients * signs[None, :]
    return components, coefficients


def check_k(k: int, n: int, d: int) -> None:
    max_k = min(n - 1, d)
    if k < 1 or k > max_k:
        raise SubspaceError(
            f"cannot compute K={k} components: the rank available is at most min(N-1, D) = "
            f"min({n - 1}, {d}) = {max_k} for N={n} valid models; choose --components <= {max_k}"
        )


def gram_memory_bytes(n: int) -> int:
    """Peak of the Gram route: G (N^2 float64) while numpy's eigh (LAPACK syevd) holds a copy
    of G, the eigenvectors and ~2 N^2 of workspace: measured 5.2 N^2 x 8 B at N = 3,000."""
    return 5 * n * n * 8


def check_gram_memory(n: int, available: int | None = None) -> None:
    """Refuse the Gram route before streaming anything when its N x N matrices cannot fit
    (`available` defaults to psutil's available memory: MemAvailable on Linux)."""
    import psutil

    available = psutil.virtual_memory().available if available is None else available
    need = gram_memory_bytes(n)
    if need > available:
        raise SubspaceError(
            f"the exact Gram route needs about {need / 2**30:.1f} GiB for N={n} models (the N x N float64 "
            f"matrix, eigh's copy and workspace) but {available / 2**30:.1f} GiB of memory is available; "
            "use --method randomized (subspace.method=randomized: streams fixed-size blocks, memory "
            "independent of N^2) or run on a machine with more memory"
        )


def gram_pca(z, k: int, memory_budget_bytes: int = 2 << 30, progress=None):
    """Exact PCA via the Gram matrix; z is the lazy standardised (N, D) matrix."""
    n, d = (int(s) for s in z.shape)
    starts = np.concatenate([[0], np.cumsum(z.chunks[0])]).astype(int)
    nb = len(z.chunks[0])
    itemsize = 8
    panel_rows = max(int(z.chunks[0][0]), int(memory_budget_bytes // (d * itemsize)))
    # panels = runs of consecutive blocks
    panels, cur, cur_rows = [], [], 0
    for j in range(nb):
        size = starts[j + 1] - starts[j]
        if cur and cur_rows + size > panel_rows:
            panels.append(cur)
            cur, cur_rows = [], 0
        cur.append(j)
        cur_rows += size
    panels.append(cur)
    _say(progress, f"gram: N={n} D={d}, {len(panels)} panel(s) of <= {panel_rows} rows, G is {n}x{n} float64 "
         f"({n * n * 8 / 2**20:.0f} MiB)")
    import dask

    g = np.zeros((n, n), dtype=np.float64)
    t0 = time.time()
    for p, panel in enumerate(panels):
        p0, p1 = starts[panel[0]], starts[panel[-1] + 1]
        zp = np.concatenate([np.asarray(b, dtype=np.float64) for b in dask.compute(*[z.blocks[j] for j in panel])])
        g[p0:p1, p0:p1] = zp @ zp.T
        later = list(range(panel[-1] + 1, nb))
        for i in range(0, len(later), 2):
            idx = later[i : i + 2]
            for j, b in zip(idx, dask.compute(*[z.blocks[j] for j in idx])):
                s0, s1 = starts[j], starts[j + 1]
                blk = zp @ np.asarray(b, dtype=np.float64).T
                g[p0:p1, s0:s1] = blk
                g[s0:s1, p0:p1] = blk.T
        del zp
        _say(progress, f"gram: panel {p + 1}/{len(panels)} done ({time.time() - t0:.1f}s)")
    evals, evecs = np.linalg.eigh(g)
    del g
    order = np.argsort(evals)[::-1][:k]
    evals = np.clip(evals[order], 0.0, None)
    u = evecs[:, order]
    s = np.sqrt(evals)
    if s.size and s[-1] <= s[0] * 1e-10:
        raise SubspaceError(f"K={k} exceeds the numerical rank of the data ({int((s > s[0] * 1e-10).sum())})")
    # second pass: components = S^-1 U^T Z
    vt = np.zeros((k, d), dtype=np.float64)
    for s0, s1, b in iter_blocks(z, progress=progress, what="components pass"):
        vt += u[s0:s1].T @ np.asarray(b, dtype=np.float64)
    vt /= s[:, None]
    _say(progress, f"gram: components recovered ({time.time() - t0:.1f}s)")
    return vt, s, u * s[None, :]


def randomized_pca(z, k: int, power_iterations: int = 2, seed: int = 0, oversamples: int = 10, progress=None):
    """Randomized SVD (dask svd_compressed), then an exact projection pass for the coefficients.

    `pca_of_array` passes a float32 `z` (the stored subspace is float32 anyway): each pass of
    svd_compressed materialises a D x (K + oversamples) partial product per row block, 0.8 GB at
    K = 1,000 in float64, and with dask's default reduction (4 partials concatenated at a time)
    that pushed the peak RSS past 6 GB. float32 needs QR re-orthonormalisation between power
    iterations (iterator="QR"): plain power iterations amplify by (s_1/s_K)^(2q+1), beyond
    float32's precision for slowly decaying spectra. Coefficients are accumulated in float64.
    """
    import dask
    import dask.array as da

    t0 = time.time()
    # split_every=2: the tree reduction concatenates split_every partials (default 4) before summing them
    with dask.config.set(split_every=2), dask_progress_bar(progress):
        _, s, v = da.linalg.svd_compressed(
            z, k=k, iterator="QR", n_power_iter=power_iterations,
            n_oversamples=oversamples, seed=seed, compute=True,
        )
    s, vt = (np.asarray(a) for a in da.compute(s, v))
    _say(progress, f"randomized: svd_compressed done ({time.time() - t0:.1f}s)")
    vt = vt.astype(np.float64)
    coeffs = np.zeros((int(z.shape[0]), k), dtype=np.float64)
    for s0, s1, b in iter_blocks(z, progress=progress, what="coefficients pass"):
        coeffs[s0:s1] = np.asarray(b, dtype=np.float64) @ vt.T
    _say(progress, f"randomized: coefficients done ({time.time() - t0:.1f}s)")
    return vt, s.astype(np.float64), coeffs


def pca_of_array(
    x,
    rows: np.ndarray,
    k: int,
    method: str = "gram",
    block_rows: int = 256,
    power_iterations: int = 2,
    seed: int = 0,
    memory_budget_bytes: int = 2 << 30,
    progress=None,
) -> PCAResult:
    """PCA of the rows `rows` of the lazy (n_rows, D) dask array `x`."""
    if method not in METHODS:
        raise SubspaceError(f"unknown PCA method {method!r}; choose one of: {', '.join(METHODS)}")
    rows = np.asarray(rows, dtype=np.int64)
    n, d = int(rows.size), int(x.shape[1])
    check_k(k, n, d)
    if method == "gram":
        check_gram_memory(n)
    timings = {}
    t0 = time.time()
    xs = select_rows(x, rows, block_rows)
    _say(progress, f"statistics: streaming {n} rows x {d} dims in blocks of {block_rows}")
    with dask_progress_bar(progress):
        mean, std_raw = column_stats(xs, progress)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std_raw))):
        bad = int((~np.isfinite(mean)).sum())
        raise SubspaceError(
            f"{bad} of {d} dimensions have non-finite values among the valid rows: a finished shard holds "
            "NaN/inf weights that are not quarantined; quarantine those identities or rebuild the shard"
        )
    std, n_zero = guard_std(std_raw)
    timings["stats_s"] = time.time() - t0
    _say(progress, f"statistics done in {timings['stats_s']:.1f}s ({n_zero} constant dims, std set to 1)")
    # the randomized sketch runs in float32 (see randomized_pca); Gram accumulates in float64
    z = standardize(xs, mean, std, dtype=np.float32 if method == "randomized" else np.float64)
    t1 = time.time()
    if method == "gram":
        vt, s, coeffs = gram_pca(z, k, memory_budget_bytes=memory_budget_bytes, progress=progress)
    else:
        vt, s, coeffs = randomized_pca(z, k, power_iterations=power_iterations, seed=seed, progress=progress)
    timings["decomposition_s"] = time.time() - t1
    vt, coeffs = fix_signs(vt, coeffs)
    # total sum of squares of Z: each non-constant standardised column has (N-1) * var/std^2
    total_ss = float((n - 1) * np.sum(std_raw**2 / std**2))
    evr = s**2 / total_ss if total_ss > 0 else np.zeros_like(s)
    timings["total_s"] = time.time() - t0
    return PCAResult(
        mean=mean,
        std=std,
        components=vt,
        singular_values=s,
        coefficients=coeffs,
        explained_variance_ratio=evr,
        rows=rows,
        method=method,
        timings=timings,
        zero_std_dims=n_zero,
    )


# ---------------------------------------------------------------------- store level
def store_checksum(store) -> str:
    """Hash of every finished shard's marker checksum and quarantine list: changes when the data does."""
    h = hashlib.sha256()
    for shard, marker in sorted(store.markers().items()):
        h.update(f"{shard}:{marker.checksum}:{json.dumps(marker.quarantined, sort_keys=True)};".encode())
    return h.hexdigest()


def compute_subspace(
    out: str,
    components: int,
    method: str = "gram",
    block_rows: int = 256,
    power_iterations: int = 2,
    seed: int = 0,
    memory_budget_bytes: int = 2 << 30,
    progress=default_progress,
    rows: np.ndarray | None = None,
) -> PCAResult:
    """Run the PCA of the store at `out` and write `<out>/subspace/{pca.safetensors,pca.json,explained_variance.png}`.

    `rows`: store rows to fit on, a subset of its valid rows in the order the subspace lists its models
    (benchmarks/quality_scaling.py fits nested subsets); default every valid row."""
    import dask.array as da

    from pipeline.builder.store import WeightStore

    store = WeightStore.open(out, mode="r")
    valid = store.valid_rows()
    if rows is None:
        rows = valid
    else:
        rows = np.asarray(rows, dtype=np.int64)
        outside = np.setdiff1d(rows, valid)
        if outside.size or np.unique(rows).size != rows.size:
            raise SubspaceError(f"rows must be distinct valid rows of the store; {outside.size} are not valid "
                                f"(e.g. {outside[:5].tolist()}), {rows.size - np.unique(rows).size} repeated")
    _say(progress, f"store {out}: {store.n_rows} rows, {valid.size} valid, fitting on {rows.size}, D={store.numel}")
    x = da.from_zarr(store.weights_url, component="weights")
    result = pca_of_array(
        x,
        rows,
        components,
        method=method,
        block_rows=block_rows,
        power_iterations=power_iterations,
        seed=seed,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
    )
    meta = {
        "format": "w2w-subspace/1",
        "layout": store.layout.to_json(),
        "components": int(components),
        "method": method,
        "n_models": int(rows.size),
        "numel": int(store.numel),
        "block_rows": int(block_rows),
        "power_iterations": int(power_iterations),
        "seed": int(seed),
        "std_ddof": 1,
        "zero_std_dims": result.zero_std_dims,
        "source_store": str(out),
        "source_checksum": store_checksum(store),
        "attributes": store.attribute_names,
        "config": store.attrs.get("config"),
        "timings": result.timings,
        "created_at": time.time(),
    }
    write_outputs(out, result, meta)
    _say(progress, f"wrote {out}/subspace (K={components}, {method}, {result.timings['total_s']:.1f}s)")
    return result


def write_outputs(out: str, result: PCAResult, meta: dict) -> None:
    import torch

    from pipeline.subspace.io import subspace_url, write_figure_atomic, write_json_atomic, write_safetensors_atomic

    base = subspace_url(out)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    tensors = {
        "mean": f32(result.mean),
        "std": f32(result.std),
        "components": f32(result.components),
        "singular_values": f32(result.singular_values),
        "coefficients": f32(result.coefficients),
        "explained_variance_ratio": f32(result.explained_variance_ratio),
        "rows": torch.from_numpy(np.ascontiguousarray(result.rows, dtype=np.int64)),
    }
    write_safetensors_atomic(base + "/pca.safetensors", tensors, {"format": meta["format"]})
    write_figure_atomic(base + "/explained_variance.png", explained_variance_figure(result.explained_variance_ratio, meta))
    write_json_atomic(base + "/pca.json", meta)  # last: its presence means the others are complete


def explained_variance_figure(evr: np.ndarray, meta: dict):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ks = np.arange(1, evr.size + 1)
    ax.bar(ks, evr, color="tab:blue", alpha=0.6, label="per component")
    ax2 = ax.twinx()
    ax2.plot(ks, np.cumsum(evr), color="tab:red", label="cumulative")
    ax2.set_ylim(0, 1.02)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax2.set_ylabel("cumulative")
    ax.set_title(f"{meta.get('method')} PCA, N={meta.get('n_models')}, D={meta.get('numel')}")
    fig.tight_layout()
    return fig
