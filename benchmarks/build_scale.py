"""Scale simulation of the builder: the full 64,974-identity plan with `trainer: synthetic`.

SD1.5 layout (D = 99,648) computed without loading a model (build.synthetic_layout=sd15),
virtual identities (build.synthetic_identities=N, no images). Measures planning time, per-shard
Ray overhead, Zarr write throughput, `status` and `resume` latency, and a resume after the
run is interrupted halfway (SIGINT to the `w2w build` driver once half the markers exist).

    python benchmarks/build_scale.py --identities 64974 --out /big/disk/scale   # full size (~26 GB x2)
    python benchmarks/build_scale.py --identities 8000 --out runs/scale8k        # what was run here

Check `df -h` first: the store needs N x 99,648 x 4 bytes (twice with --interrupt).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def overrides(args, out):
    return [f"build.out={out}", "build.trainer=synthetic", "build.synthetic_layout=sd15",
            f"build.synthetic_identities={args.identities}", f"build.rows_per_shard={args.rows_per_shard}",
            f"build.workers={args.workers}", "model.path=unused"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=64974)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--no-interrupt", action="store_true", help="skip the interrupted-run + resume phase")
    ap.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    ap.add_argument("--json", default="", help="also write the numbers to this file")
    args = ap.parse_args(argv)

    from pipeline.builder.builder import plan_build, resume_config, run_build
    from pipeline.builder.status import build_status
    from pipeline.builder.store import WeightStore
    from pipeline.config import load_config

    out = Path(args.out).resolve()
    for p in (out, out.with_name(out.name + "-interrupted")):
        shutil.rmtree(p, ignore_errors=True)
    cfg = load_config(REPO / "conf/tiny.yaml", overrides(args, out))
    res: dict = {"identities": args.identities, "rows_per_shard": args.rows_per_shard, "workers": args.workers}

    t = time.perf_counter()
    plan = plan_build(cfg)
    res["plan_seconds"] = time.perf_counter() - t
    res["shards"] = plan.n_shards

    t = time.perf_counter()
    summary = run_build(cfg, progress_bar=False)
    res["build_seconds"] = time.perf_counter() - t
    assert summary.ok, summary.failed
    store = WeightStore.open(str(out), mode="r")
    markers = list(store.markers().values())
    gen = statistics.mean(m.seconds for m in markers)
    write = statistics.mean(m.write_seconds for m in markers)
    shard_bytes = args.rows_per_shard * store.numel * 4
    res["numel"] = store.numel
    res["store_gb"] = sum(f.stat().st_size for f in (out / "weights.zarr").rglob("*") if f.is_file()) / 1e9
    res["mean_generate_s_per_shard"] = gen
    res["mean_zarr_write_s_per_shard"] = write
    res["zarr_write_mb_per_s_per_worker"] = shard_bytes / write / 1e6
    # wall per shard per worker minus what the worker did = Ray dispatch + marker + progress files
    first = min(m.finished_at - m.seconds - m.write_seconds for m in markers)
    last = max(m.finished_at for m in markers)
    res["steady_state_seconds"] = last - first
    res["startup_seconds"] = res["build_seconds"] - res["steady_state_seconds"]
    res["ray_overhead_s_per_shard"] = (last - first) * args.workers / len(markers) - gen - write
    res["identities_per_hour"] = args.identities / res["build_seconds"] * 3600

    t = time.perf_counter()
    build_status(str(out))
    res["status_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    run_build(resume_config(str(out)), progress_bar=False, log=lambda *a: None)
    res["resume_noop_verify_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    run_build(resume_config(str(out)), progress_bar=False, verify=False, log=lambda *a: None)
    res["resume_noop_noverify_seconds"] = time.perf_counter() - t

    if not args.no_interrupt:
        half = out.with_name(out.name + "-interrupted")
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "build", str(REPO / "conf/tiny.yaml"),
                                 *overrides(args, half), "--no-progress"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                # A shell's background job inherits SIGINT ignored, and Python then never
                                # raises KeyboardInterrupt: restore the default so the interrupt lands.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        target = plan.n_shards // 2
        while proc.poll() is None:
            d = half / "shards"
            if d.exists() and len(list(d.glob("*.json"))) >= target:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.2)
        proc.wait(timeout=300)
        done_at_kill = len(list((half / "shards").glob("*.json")))
        t = time.perf_counter()
        s2 = run_build(resume_config(str(half)), progress_bar=False)
        res["interrupted_done_shards"] = done_at_kill
        res["resume_after_interrupt_seconds"] = time.perf_counter() - t
        a, b = WeightStore.open(str(out), mode="r"), WeightStore.open(str(half), mode="r")
        ma, mb = a.markers(), b.markers()
        res["resume_equal_checksums"] = s2.ok and all(ma[s].checksum == mb[s].checksum for s in ma) and ma.keys() == mb.keys()
        if not args.keep:
            shutil.rmtree(half, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
