"""How many identities per batch should the demo's CPU workers train? (conf/tiny.yaml, `train.identities_per_batch`)

Times the batched trainer on conf/tiny.yaml's recipe (its LoRA targets, rank, frozen lora_A, the committed
base) for each K, in --processes processes side by side at 1 thread each, as the demo's 2 Ray workers
train (`build.workers: 2`, `cpus_per_worker: 1`), so the memory traffic of both is in the number. Each
process trains K SynthFaces identities for --steps steps after a 2-step warm-up and reports milliseconds
per identity-step. Ratios between K are what count: this machine's absolute speed drifts between runs.

    python benchmarks/tiny_batch_size.py --ks 16,32,48 --json docs/bench/tiny_batch_size_cpu.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time


def _time_ks(ks: list[int], steps: int, config: str, queue) -> None:
    import dataclasses

    import torch

    from pipeline.config import load_config
    from pipeline.data.synthfaces import render_identity, to_tensor
    from pipeline.train import IdentityInput, train_identities
    from w2w_core.layout import LoraLayout
    from w2w_core.model import load_base_model

    torch.set_num_threads(1)
    cfg = load_config(config, [])
    base = load_base_model(cfg.model)
    layout = LoraLayout.from_unet(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    for k in ks:
        inputs = [IdentityInput(f"i{i}", to_tensor(render_identity(0, i, 10)), seed=i) for i in range(k)]
        train_identities(base, layout, dataclasses.replace(cfg.train, steps=2, identities_per_batch=k), inputs)
        started = time.perf_counter()
        train_identities(base, layout, dataclasses.replace(cfg.train, steps=steps, identities_per_batch=k), inputs)
        queue.put((k, 1000 * (time.perf_counter() - started) / steps / k))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="16,32,48", help="identities per batch to time")
    p.add_argument("--steps", type=int, default=40, help="timed training steps per K")
    p.add_argument("--processes", type=int, default=2, help="trainers side by side (the demo runs 2 workers)")
    p.add_argument("--config", default="conf/tiny.yaml")
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_time_ks, args=(ks, args.steps, args.config, queue)) for _ in range(args.processes)]
    for proc in procs:
        proc.start()
    readings = [queue.get() for _ in range(len(ks) * args.processes)]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a timing process failed with exit code {proc.exitcode}")
    rows = []
    for k in ks:
        ms = sorted(m for kk, m in readings if kk == k)
        rows.append({"identities_per_batch": k, "ms_per_identity_step": ms})
    first = sum(rows[0]["ms_per_identity_step"]) / args.processes
    for row in rows:
        row["speedup_vs_first"] = first / (sum(row["ms_per_identity_step"]) / args.processes)
        print(f"K={row['identities_per_batch']:3d}: {', '.join(f'{m:.2f}' for m in row['ms_per_identity_step'])} "
              f"ms per identity-step, {row['speedup_vs_first']:.3f}x K={ks[0]}", flush=True)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.processor() or platform.machine(),
              "cpus": mp.cpu_count(), "processes": args.processes, "steps": args.steps, "config": args.config, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
