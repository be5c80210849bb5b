"""`w2w sample OUT`: draw new identity models from the subspace and render them (rows: models, columns: prompts)."""
from __future__ import annotations

import argparse

from jobs.commands._common import (add_force_argument, add_lora_format_argument, add_render_arguments, prompts_of,
                                   refuse_existing, save_png)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="build output folder with a subspace (run `w2w pca` first)")
    parser.add_argument("--n", type=int, default=4, help="number of models to sample (default 4)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the PC coefficients (default 0)")
    parser.add_argument("--save-loras", default=None, metavar="DIR",
                        help="also write each sampled model as a LoRA folder DIR/sample_<i>/ (see --format)")
    add_lora_format_argument(parser)
    add_render_arguments(parser, default_out="sample.png")
    add_force_argument(parser, "an existing --out grid or --save-loras model folders")


def run(args) -> int:
    from jobs.cli import UserError
    from w2w_core.render import generate_models, grid, tensor_to_pil
    from w2w_core.space import WeightSpace

    if args.n < 1:
        raise UserError("--n must be at least 1")
    space = WeightSpace.load(args.out)
    vectors = space.sample(args.n, seed=args.sample_seed)
    refuse_existing(args.grid, args.force, "pass --out NEW.png")  # before rendering: never overwrite silently
    for i in range(args.n if args.save_loras else 0):
        refuse_existing(f"{args.save_loras}/sample_{i}", args.force, "pass another --save-loras DIR")
    base = space.base_model()
    prompts = prompts_of(args)
    images = generate_models(base, space.layout, vectors, prompts, [args.seed] * len(prompts), steps=args.render_steps,
                             guidance_scale=args.guidance,
                             progress=lambda done, total: print(f"sample: rendered model {done}/{total}", flush=True))
    rows = [[tensor_to_pil(x) for x in model] for model in images]
    for i, vec in enumerate(vectors if args.save_loras else []):
        space.save_lora(vec, f"{args.save_loras}/sample_{i}", format=args.lora_format)
    path = save_png(grid(rows, row_labels=[f"sample {i}" for i in range(args.n)], col_labels=prompts), args.grid)
    print(f"wrote {path}")
    return 0
