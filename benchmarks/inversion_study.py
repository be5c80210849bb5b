"""Which inversion settings, against which single-image LoRA? Paired per held-out identity on a built space.

Every variant fits the same held-out identities (SynthFaces seed 5000, image 0; the report's) for the same
number of steps and is scored as the report scores it: ID similarity of 3 renders to the identity's other 5
images. The w2w variants differ in Adam's lr and its schedule; the single-image LoRA baselines train with the
build's recipe at a multiple of its lr. The first w2w variant is the reference of the paired differences.

    python benchmarks/inversion_study.py runs/demo --identities 16 \\
        --w2w constant:1,cosine:1,cosine:4 --lora-lr-scales 1,2 --out docs/inversion_study.jsonl
    python benchmarks/inversion_study.py runs/demo --identities 16 --offset 16 ...   # 16 other identities

One JSON line per variant on stdout (and appended to --out), then a table of the paired differences.
(docs/TINY_WORLD.md, "A decaying learning rate for the inversion".)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _w2w_variants(text: str) -> list[tuple[str, float]]:
    """"constant:1,cosine:4" -> [("constant", 1.0), ("cosine", 4.0)]."""
    from w2w_core.invert import LR_SCHEDULES

    variants = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        schedule, _, lr = item.partition(":")
        if schedule not in LR_SCHEDULES or not lr:
            raise SystemExit(f"--w2w item {item!r}: expected SCHEDULE:LR with SCHEDULE one of {', '.join(LR_SCHEDULES)}")
        variants.append((schedule, float(lr)))
    return variants


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="a built space (build output folder with a subspace)")
    ap.add_argument("--identities", type=int, default=16, help="held-out identities (default 16)")
    ap.add_argument("--offset", type=int, default=0, help="first held-out identity (default 0, the report's)")
    ap.add_argument("--steps", type=int, default=None, help="steps of every fit (default: the report's)")
    ap.add_argument("--w2w", default="constant:1,cosine:4", help="w2w inversions, SCHEDULE:LR comma-separated")
    ap.add_argument("--lora-lr-scales", default="1,2",
                    help="single-image LoRA baselines, multiples of the build's lr, comma-separated ('' = none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", dest="jsonl", default=None, help="append the JSON lines here")
    args = ap.parse_args(argv)

    import dataclasses

    import numpy as np
    import torch

    from pipeline.builder.store import WeightStore
    from pipeline.eval.evaluators import load_evaluators
    from pipeline.eval.report import (INSTANCE_PROMPT, Renderer, heldout_images, heldout_target, id_similarity,
                                      single_image_loras)
    from pipeline.eval.settings import ReportSettings
    from w2w_core.space import WeightSpace

    torch.set_num_threads(args.threads)
    w2w_variants = _w2w_variants(args.w2w)
    lora_scales = [float(s) for s in args.lora_lr_scales.split(",") if s.strip()]
    defaults = ReportSettings()
    settings = dataclasses.replace(defaults, invert_steps=args.steps or defaults.invert_steps)
    identities = range(args.offset, args.offset + args.identities)

    space = WeightSpace.load(args.out)
    store = WeightStore.open(str(args.out), mode="r")
    base = space.base_model()
    evaluators = load_evaluators()
    render = Renderer(base, space.layout, settings.render_steps)
    images = [heldout_images(settings, h) for h in identities]
    targets = [heldout_target(evaluators, im) for im in images]  # once: every variant is scored against them

    def scores(vectors) -> list[float]:
        renders = render.many(vectors, [INSTANCE_PROMPT] * 3, [0, 1, 2])
        return [id_similarity(evaluators, renders[i], targets[i]) for i in range(len(vectors))]

    rows = []

    def emit(row: dict) -> None:
        row.update(space=str(args.out), models=len(space.identities), identities=[args.offset, args.identities],
                   steps=settings.invert_steps, mean=float(np.mean(row["per_identity"])))
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")

    for schedule, lr in w2w_variants:
        started = time.perf_counter()
        fits = space.invert_batch(torch.stack([im[0] for im in images]), steps=settings.invert_steps, lr=lr,
                                  lr_schedule=schedule, seed=settings.seed, base=base)
        emit({"method": "w2w", "lr_schedule": schedule, "lr": lr, "per_identity": scores([f.vector for f in fits]),
              "coefficient_norm": float(torch.stack([f.coefficients for f in fits]).norm(dim=1).mean()),
              "seconds": time.perf_counter() - started})
    for scale in lora_scales:
        started = time.perf_counter()
        fits = single_image_loras(base, space.layout, store, dataclasses.replace(settings, lora_baseline_lr_scale=scale),
                                  identities)
        emit({"method": "lora", "lr_scale": scale, "per_identity": scores([fit.vector for fit, _ in fits]),
              "seconds": time.perf_counter() - started})

    reference = np.array(rows[0]["per_identity"])
    print(f"\n| fit | ID similarity | paired vs {_name(rows[0])} | identities up |\n|---|---:|---:|---:|")
    for row in rows:
        d = np.array(row["per_identity"]) - reference
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"| {_name(row)} | {row['mean']:.3f} | {d.mean():+.3f} ± {se:.3f} | {(d > 0).sum()} / {len(d)} |")
    return rows


def _name(row: dict) -> str:
    if row["method"] == "w2w":
        return f"w2w {row['lr_schedule']} lr {row['lr']:g}"
    return f"LoRA {row['lr_scale']:g}x the build's lr"


if __name__ == "__main__":
    main()
