"""Build throughput: identities/hour with 1 vs 2 workers, and the Ray/Zarr layer's overhead
versus calling the same trainer (`pipeline.builder.worker.train_shard`) in a plain loop.

    python benchmarks/build_throughput.py --identities 32 train.steps=10            # real batched trainer
    python benchmarks/build_throughput.py --identities 32 build.trainer=synthetic build.synthetic_layout=tiny

Extra KEY=VALUE arguments are config overrides on conf/tiny.yaml (fewer steps: train.steps=N).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from pipeline.builder.builder import plan_build, run_build
    from pipeline.builder.worker import TrainerContext, train_shard
    from pipeline.config import load_config
    from pipeline.data.synthfaces import write_identity_source

    tmp = Path(tempfile.mkdtemp(prefix="w2wtp"))
    src = write_identity_source(tmp / "identities", args.identities, 10, seed=0)
    base = [f"data.source={src}", f"data.limit={args.identities}", *args.overrides]
    cfg = load_config(REPO / "conf/tiny.yaml", base + [f"build.out={tmp / 'loop'}"])
    import os

    res = {"identities": args.identities, "overrides": args.overrides, "trainer": cfg.build.trainer,
           "loadavg_start": os.getloadavg(), "nproc": os.cpu_count(),
           "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    # plain loop: the same trainer call per shard, no Ray, no Zarr
    plan = plan_build(cfg)
    t = time.perf_counter()
    ctx = TrainerContext.create(cfg)
    if ctx.needs_class_latents:
        ctx.ensure_class_latents(str(tmp / "class_latents.safetensors"))
    setup = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(plan.n_shards):
        train_shard(ctx, plan.shard_ids(s))
    loop = time.perf_counter() - t
    res["loop_mean_shard_train_seconds"] = loop / plan.n_shards
    res["loop_setup_seconds"] = setup
    res["loop_train_seconds"] = loop
    res["loop_identities_per_hour"] = args.identities / loop * 3600
    res["loop_torch_threads"] = __import__("torch").get_num_threads()
    for w in [int(x) for x in args.workers.split(",")]:
        out = tmp / f"ray{w}"
        c = load_config(REPO / "conf/tiny.yaml", base + [f"build.out={out}", f"build.workers={w}"])
        t = time.perf_counter()
        run_build(c, progress_bar=False, log=lambda *a: None)
        wall = time.perf_counter() - t
        from pipeline.builder.store import WeightStore

        ms = list(WeightStore.open(str(out)).markers().values())
        first = min(m.finished_at - m.seconds - m.write_seconds for m in ms)
        steady = max(m.finished_at for m in ms) - first
        res[f"ray{w}_wall_seconds"] = wall
        res[f"ray{w}_mean_shard_train_seconds"] = sum(m.seconds for m in ms) / len(ms)
        res[f"ray{w}_mean_shard_write_seconds"] = sum(m.write_seconds for m in ms) / len(ms)
        res[f"ray{w}_steady_seconds"] = steady
        res[f"ray{w}_identities_per_hour_steady"] = args.identities / steady * 3600
        res[f"ray{w}_identities_per_hour_wall"] = args.identities / wall * 3600
        if w == 1:
            res["overhead_vs_loop_steady"] = steady / loop - 1
    res["loadavg_end"] = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
