"""Rendering many models per pipeline call vs one model per call (the report's renders).

Renders the same `--models` models of a finished space at `--seeds` seeds two ways, side by side in
one process: one model per call through peft's adapter slot (`LoraSlot` + `generate`, how the
report rendered until the multi-LoRA path), and K models per call (`generate_models`, the
`MultiLoraSlot`), for each K in --per-call. Checks that both give the same images (max |diff|).

    python benchmarks/render_batching.py runs/demo --json docs/bench/render_batching_cpu.json
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
    parser.add_argument("--models", type=int, default=16, help="models rendered (the report's sample count)")
    parser.add_argument("--seeds", type=int, default=1, help="images per model (the edit renders use 1)")
    parser.add_argument("--per-call", default="4,8,16", help="models per call to time, comma-separated")
    parser.add_argument("--render-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the CI machine has 2 cores)")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from w2w_core.render import LoraSlot, generate, generate_models
    from w2w_core.space import WeightSpace

    torch.set_num_threads(args.threads)
    space = WeightSpace.load(args.out)
    base = space.base_model()
    vectors = space.sample(args.models, seed=0)
    seeds = list(range(args.seeds))
    prompts = ["sks person"] * len(seeds)

    def one_per_call():
        with LoraSlot(base, space.layout) as slot:
            out = []
            for v in vectors:
                slot.set(v)
                out.append(generate(base, prompts, seed=seeds, steps=args.render_steps, output_type="pt"))
        return torch.stack(out)

    def per_call(k: int):
        return generate_models(base, space.layout, vectors, prompts, seeds, steps=args.render_steps,
                               images_per_call=k * len(seeds))

    def timed(fn):
        started = time.perf_counter()
        images = fn()
        return images, time.perf_counter() - started

    generate_models(base, space.layout, vectors[:2], prompts, seeds, steps=2)  # warm-up
    reference, seconds_one = timed(one_per_call)
    images_total = len(vectors) * len(seeds)
    rows = [{"models_per_call": 1, "seconds": round(seconds_one, 2), "seconds_per_image": round(seconds_one / images_total, 4),
             "speedup": 1.0, "max_abs_diff": 0.0}]
    for k in [int(x) for x in args.per_call.split(",") if x]:
        images, seconds = timed(lambda: per_call(k))
        rows.append({"models_per_call": k, "seconds": round(seconds, 2), "seconds_per_image": round(seconds / images_total, 4),
                     "speedup": round(seconds_one / seconds, 2), "max_abs_diff": float((images - reference).abs().max())})
    result = {
        "benchmark": "render_batching",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": args.threads},
        "command": "python benchmarks/render_batching.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "space": str(args.out), "models": len(vectors), "seeds": len(seeds), "render_steps": args.render_steps,
        "rows": rows,
    }
    for row in rows:
        print(f"{row['models_per_call']:>3} models per call: {row['seconds']:6.1f} s, {row['seconds_per_image']:.3f} s per image, "
              f"{row['speedup']:.2f}x, max |diff| {row['max_abs_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
