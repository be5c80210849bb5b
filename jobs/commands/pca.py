"""`w2w pca OUT`: stream the weight store with Dask -> OUT/subspace/pca.safetensors (+ pca.json, plot)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="build output folder (holds weights.zarr, manifest.parquet, shards/)")
    parser.add_argument("--components", "-k", type=int, default=None,
                        help="number of principal components K (default: the build config's subspace.components, "
                             "capped at min(N-1, D))")
    parser.add_argument("--method", choices=("gram", "randomized"), default=None,
                        help="gram: exact, memory O(N^2), best when models << dims; randomized: dask "
                             "svd_compressed, best for K <= ~1000 (default: config subspace.method)")
    parser.add_argument("--block-rows", type=int, default=None, help="rows per streamed block (default: config)")
    parser.add_argument("--power-iterations", type=int, default=None, help="randomized: power iterations")
    parser.add_argument("--seed", type=int, default=None, help="randomized: seed")
    parser.add_argument("--memory-gb", type=float, default=2.0, help="gram: memory for the in-RAM row panel (GB)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT/subspace/pca.* (default: refuse; directions fitted on the old "
                             "PCA must then be refitted with `w2w directions OUT --force`)")


def run(args) -> int:
    import time

    from jobs.cli import UserError
    from pipeline.builder.store import WeightStore
    from pipeline.config import SubspaceConfig
    from pipeline.subspace.pca import SubspaceError, compute_subspace

    from jobs.commands._common import refuse_existing
    from pipeline.subspace.io import subspace_url

    store = WeightStore.open(args.out, mode="r")
    refuse_existing(subspace_url(args.out) + "/pca.json", args.force,
                    after=f" (then refit the directions: `w2w directions {args.out} --force`)")
    cfg = SubspaceConfig(**{k: v for k, v in ((store.attrs.get("config") or {}).get("subspace") or {}).items()
                            if k in SubspaceConfig.__dataclass_fields__})
    n, d = int(store.valid_rows().size), store.numel
    k = args.components if args.components is not None else min(cfg.components, max(1, min(n - 1, d)))
    t0 = time.time()
    try:
        result = compute_subspace(
            args.out,
            k,
            method=args.method or cfg.method,
            block_rows=args.block_rows or cfg.block_rows,
            power_iterations=cfg.power_iterations if args.power_iterations is None else args.power_iterations,
            seed=cfg.seed if args.seed is None else args.seed,
            memory_budget_bytes=int(args.memory_gb * 2**30),
        )
    except SubspaceError as err:
        raise UserError(str(err)) from None
    evr = result.explained_variance_ratio
    print(f"wrote {args.out}/subspace: K={k} components of {result.rows.size} models x {d} dims "
          f"({result.method}, {time.time() - t0:.1f}s); first PCs explain "
          f"{', '.join(f'{v:.3f}' for v in evr[:5])} (cumulative {evr.sum():.3f})")
    return 0
