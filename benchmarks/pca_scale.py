"""PCA at scale: synthetic low-rank-plus-noise store (N x D fp32, written chunk by chunk) -> K components.

Reports, per method (gram, randomized), wall time and peak RSS (each method runs in its own
process, so its peak is its own), and accuracy against in-memory `torch.linalg.svd` on a
sub-problem that fits in RAM (the first --accuracy-rows rows).

    python benchmarks/pca_scale.py                      # full size: 65,000 x 99,648 (26 GB on disk)
    python benchmarks/pca_scale.py --rows 4000          # medium
    python benchmarks/pca_scale.py --rows 64 --dims 500 --components 4 --rank 8   # seconds

The Gram route needs an N x N float64 matrix and numpy's eigh of it (~5 N^2 x 8 B, 157 GiB at
full size): it is skipped, with the reason printed, when that exceeds --max-gram-gb.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def spectrum(rank: int) -> np.ndarray:
    return 10.0 / np.sqrt(np.arange(1, rank + 1))


def generate(path: Path, rows: int, dims: int, rank: int, chunk_rows: int, noise: float, seed: int) -> None:
    """Write `weights` (rows, dims) fp32 chunk by chunk: latent @ basis * scale + offset + noise."""
    import zarr

    rng = np.random.default_rng(seed)
    basis = (rng.standard_normal((rank, dims), dtype=np.float32) / np.sqrt(dims)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, dims).astype(np.float32)
    offset = rng.standard_normal(dims, dtype=np.float32)
    s = spectrum(rank).astype(np.float32) * np.sqrt(dims).astype(np.float32) / 10
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array("weights", shape=(rows, dims), chunks=(chunk_rows, dims), dtype="float32")
    t0 = time.time()
    for i, start in enumerate(range(0, rows, chunk_rows)):
        stop = min(rows, start + chunk_rows)
        r = np.random.default_rng([seed, i])
        lat = r.standard_normal((stop - start, rank), dtype=np.float32) * s
        block = (lat @ basis + noise * r.standard_normal((stop - start, dims), dtype=np.float32)) * scale + offset
        arr[start:stop] = block
        if i % 50 == 0:
            print(f"generate: {stop}/{rows} rows ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)


def worker(args) -> None:
    """One method in this process: print a JSON line with timings, peak RSS; save components."""
    import dask
    import dask.array as da

    from pipeline.subspace.pca import pca_of_array

    dask.config.set(scheduler="threads", num_workers=args.threads)
    x = da.from_zarr(str(args.work / "store.zarr"), component="weights")
    n = x.shape[0] if args.subset is None else args.subset
    t0 = time.time()
    res = pca_of_array(
        x, np.arange(n), args.components, method=args.worker, block_rows=args.block_rows,
        power_iterations=args.power_iterations, seed=0, memory_budget_bytes=int(args.memory_gb * 2**30),
        progress=lambda m: print(f"  [{args.worker}] {m}", file=sys.stderr, flush=True),
    )
    wall = time.time() - t0
    tag = f"{args.worker}{args.tag}_{n}"
    np.save(args.work / f"{tag}_components.npy", res.components.astype(np.float32))
    np.save(args.work / f"{tag}_s.npy", res.singular_values)
    print(json.dumps({"method": args.worker, "rows": int(n), "wall_s": wall, "peak_rss_gb": peak_rss_gb(),
                      "timings": res.timings}))


def reference(args) -> None:
    """In-memory torch.linalg.svd of the standardised first `subset` rows; compare with saved results."""
    import torch
    import zarr

    torch.set_num_threads(args.threads)
    n = args.subset
    cache = args.work / f"reference_{n}.npz"
    x = torch.from_numpy(np.asarray(zarr.open_group(str(args.work / "store.zarr"), mode="r")["weights"][:n]))
    t0 = time.time()
    mean = x.double().mean(0)
    std = x.double().std(0)
    std[std < 1e-12] = 1
    z = ((x.double() - mean) / std).float()
    del x
    c = np.load(cache) if cache.exists() else None
    if c is not None and c["vt"].shape[0] >= args.components:  # computed before on this store
        s, vt = torch.from_numpy(c["s"]), torch.from_numpy(c["vt"])
    else:
        _, s, vt = torch.linalg.svd(z, full_matrices=False)
        np.savez(cache, s=s[: args.components].numpy(), vt=vt[: args.components].numpy())
    wall = time.time() - t0
    k = args.components
    vt = vt[:k].double().numpy()
    s = s[:k].double().numpy()
    out = {"method": "torch.linalg.svd (in memory)", "rows": n, "wall_s": wall, "peak_rss_gb": peak_rss_gb(), "accuracy": {}}
    for method in args.methods:
        f = args.work / f"{method}{args.tag}_{n}_components.npy"
        if not f.exists():
            continue
        comps = np.load(f).astype(np.float64)
        sv = np.load(args.work / f"{method}{args.tag}_{n}_s.npy")
        cos = np.clip(np.linalg.svd(comps @ vt.T, compute_uv=False), 0, 1)
        # the planted signal subspace: past the planted rank the spectrum is noise with no gap, so
        # individual trailing PCs (and the whole K-subspace) are not unique; the first r are
        r = min(args.rank, k)
        cos_signal = np.clip(np.linalg.svd(comps[:r] @ vt[:r].T, compute_uv=False), 0, 1)
        percomp = np.clip(np.abs(np.sum(comps * vt, axis=1)), 0, 1)
        captured = float((z.double() @ torch.from_numpy(comps).T).square().sum() / np.sum(s**2))
        out["accuracy"][method] = {
            "max_principal_angle_deg": float(np.degrees(np.arccos(cos.min()))),
            f"max_principal_angle_deg_first_{r}": float(np.degrees(np.arccos(cos_signal.min()))),
            f"max_rel_err_singular_values_first_{r}": float(np.max(np.abs(sv[:r] - s[:r]) / s[:r])),
            "min_per_component_abs_cos": float(percomp.min()),
            "first_component_below_0.99_cos": int(np.argmax(percomp < 0.99)) if (percomp < 0.99).any() else None,
            "max_rel_err_singular_values": float(np.max(np.abs(sv - s) / s)),
            "captured_variance_vs_optimal": captured,
        }
    print(json.dumps(out))


def child(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65_000)
    p.add_argument("--dims", type=int, default=99_648)
    p.add_argument("--rank", type=int, default=256, help="rank of the planted signal")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--components", type=int, default=100)
    p.add_argument("--chunk-rows", type=int, default=64, help="store rows per chunk (= shard)")
    p.add_argument("--block-rows", type=int, default=256)
    p.add_argument("--power-iterations", type=int, default=2)
    p.add_argument("--memory-gb", type=float, default=2.0, help="gram panel memory")
    p.add_argument("--max-gram-gb", type=float, default=6.0, help="skip gram if its N x N matrix exceeds this")
    p.add_argument("--accuracy-rows", type=int, default=4000, help="rows of the in-memory SVD sub-problem")
    p.add_argument("--methods", default="gram,randomized")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the generated store")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--subset", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.worker == "reference":
        return reference(args)
    if args.worker:
        return worker(args)

    from pipeline.subspace.pca import gram_memory_bytes

    work = args.work or Path(tempfile.mkdtemp(prefix="pca_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--work", str(work), "--components", str(args.components), "--rank", str(args.rank),
              "--block-rows", str(args.block_rows),
              "--power-iterations", str(args.power_iterations), "--memory-gb", str(args.memory_gb),
              "--threads", str(args.threads), "--methods", ",".join(args.methods)]
    results = {"rows": args.rows, "dims": args.dims, "rank": args.rank, "components": args.components,
               "gb_on_disk_fp32": args.rows * args.dims * 4 / 1e9, "runs": []}
    try:
        t0 = time.time()
        generate(work / "store.zarr", args.rows, args.dims, args.rank, args.chunk_rows, args.noise, seed=0)
        results["generate_s"] = time.time() - t0
        m = min(args.accuracy_rows, args.rows)
        sizes = [args.rows] + ([m] if m < args.rows else [])
        for n in sizes:
            for method in args.methods:
                gram_gib = gram_memory_bytes(n) / 2**30
                if method == "gram" and gram_gib > args.max_gram_gb:
                    results["runs"].append({"method": "gram", "rows": n, "skipped":
                                            f"Gram route peak ~5 N^2 x 8 B = {gram_gib:.1f} GiB > --max-gram-gb {args.max_gram_gb}"})
                    continue
                print(f"running {method} on {n} x {args.dims} ...", file=sys.stderr, flush=True)
                results["runs"].append(child(["--worker", method, "--subset", str(n), *common]))
        print(f"running torch.linalg.svd on {m} x {args.dims} ...", file=sys.stderr, flush=True)
        results["reference"] = child(["--worker", "reference", "--subset", str(m), *common])
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return results


if __name__ == "__main__":
    main()
