"""Inverting several images in one batch vs one at a time (the report's inversion of its held-out identities).

Inverts image 0 of the report's first `--identities` held-out SynthFaces identities into a finished space
two ways, side by side in one process: one image at a time (`WeightSpace.invert`, how the report inverted
until `invert_batch`) and all of them in one batch (`WeightSpace.invert_batch`: one MultiLoraSlot, one
coefficient vector per image). Same steps, lr and seed as the report; checks that both give the same
coefficients (max |diff|, relative to the largest coefficient).

    python benchmarks/invert_batching.py runs/demo --json docs/bench/invert_batching_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="a finished space (build output folder), e.g. runs/demo; only read")
    parser.add_argument("--identities", type=int, default=8, help="held-out identities inverted (the report's 8)")
    parser.add_argument("--steps", type=int, default=200, help="inversion steps (the report's 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the CI machine has 2 cores)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from pipeline.eval.report import heldout_images
    from pipeline.eval.settings import ReportSettings
    from w2w_core.space import WeightSpace

    torch.set_num_threads(args.threads)
    settings = ReportSettings()
    space = WeightSpace.load(args.out)
    base = space.base_model()
    images = torch.stack([heldout_images(settings, h)[0] for h in range(args.identities)])
    fit = dict(steps=args.steps, lr=settings.invert_lr, lr_schedule=settings.invert_lr_schedule, seed=settings.seed,
               base=base)

    started = time.perf_counter()
    alone = [space.invert(image, **fit) for image in images]
    seconds_alone = time.perf_counter() - started
    started = time.perf_counter()
    together = space.invert_batch(images, **fit)
    seconds_batch = time.perf_counter() - started

    largest = max(float(r.coefficients.abs().max()) for r in alone)
    diff = max(float((a.coefficients - b.coefficients).abs().max()) for a, b in zip(alone, together))
    result = {
        "benchmark": "invert_batching",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": args.threads},
        "command": "python benchmarks/invert_batching.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "space": str(args.out), "components": space.k, "identities": args.identities, "steps": args.steps,
        "seconds_one_at_a_time": round(seconds_alone, 2), "seconds_batch": round(seconds_batch, 2),
        "speedup": round(seconds_alone / seconds_batch, 2),
        "max_abs_coefficient_diff": diff, "largest_coefficient": largest,
    }
    print(f"{args.identities} images x {args.steps} steps, {space.k} PCs: one at a time {seconds_alone:.1f} s, "
          f"one batch {seconds_batch:.1f} s ({result['speedup']:.2f}x); max |coefficient diff| {diff:.1e} "
          f"(largest coefficient {largest:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
