"""`w2w invert OUT image.png`: optimise PC coefficients on one image -> a LoRA of that identity."""
from __future__ import annotations

import argparse

from jobs.commands._common import (INVERSION_LR_SCHEDULES, add_force_argument, add_lora_format_argument,
                                   add_render_arguments, prompts_of, refuse_existing, save_png, unique_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="build output folder with a subspace (`w2w pca`)")
    parser.add_argument("image", help="the input image (PNG/JPEG), resized to the base model's resolution")
    parser.add_argument("--preset", choices=("in", "out"), default="in",
                        help="in: in-distribution faces (10,000 PCs, lr 0.1, 400 steps); "
                             "out: paintings, cartoons (1,000 PCs, lr 1.0, 800 steps). PCs are capped by the space's K")
    parser.add_argument("--components", "-k", type=int, default=None, help="PCs to optimise (overrides the preset)")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps (overrides the preset)")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (overrides the preset)")
    parser.add_argument("--lr-schedule", choices=INVERSION_LR_SCHEDULES, default=None,
                        help="how the lr moves over the steps: constant (the presets, as published) or cosine "
                             "(decays to 0 by the last step; with a larger --lr it inverts the tiny world better, "
                             "as `w2w report` does: docs/TINY_WORLD.md)")
    parser.add_argument("--mask", default=None, help="optional mask image (white = counts in the loss), e.g. a face mask")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet call: on a GPU at SD1.5 shape 1.6x faster steps (57 -> 32 s for "
                             "400 steps on an H200) after a one-off compilation of about 3 minutes; "
                             "worth it for long or repeated inversions, not for one (docs/BENCHMARKS.md)")
    parser.add_argument("--save-lora", default=None, metavar="DIR",
                        help="where to write the LoRA (default: <out>/inversions/<image name>/, or <image name>-2/, "
                             "-3/, ... when taken: an earlier inversion is never replaced)")
    add_render_arguments(parser, default_out="invert.png")
    add_lora_format_argument(parser)
    add_force_argument(parser, "an existing --save-lora folder or --out grid")


def run(args) -> int:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from jobs.cli import UserError
    from w2w_core.render import LoraSlot, generate, grid, load_image, tensor_to_pil
    from w2w_core.space import WeightSpace

    space = WeightSpace.load(args.out)
    if args.components is not None and not 1 <= args.components <= space.k:
        raise UserError(f"--components {args.components} is out of range: this space has K={space.k} components (use 1..{space.k})")
    base = space.base_model()
    image = load_image(args.image, base.resolution)
    mask = None
    if args.mask:
        mask = (load_image(args.mask, base.resolution).mean(0) + 1) / 2
    every = max(1, (args.steps or 400) // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0:
            print(f"invert: step {step} loss {loss:.4f}", flush=True)

    # before the optimisation: never replace an earlier result silently (issue 17)
    refuse_existing(args.grid, args.force, "pass --out NEW.png")
    if args.save_lora:
        refuse_existing(args.save_lora, args.force, "pass another --save-lora DIR")
    lora_dir = Path(args.save_lora) if args.save_lora else unique_dir(Path(args.out) / "inversions" / Path(args.image).stem)
    result = space.invert(image, base=base, preset=args.preset, n_components=args.components, steps=args.steps,
                          lr=args.lr, lr_schedule=args.lr_schedule, mask=mask, seed=args.seed, progress=progress,
                          compile=args.compile or None)
    space.save_lora(result.vector, lora_dir, format=args.lora_format)
    space.layout.save(result.vector, lora_dir / "w2w_model.safetensors", metadata={"source_image": str(args.image)})
    save_file({"coefficients": result.coefficients.contiguous()}, str(lora_dir / "coefficients.safetensors"))
    (lora_dir / "inversion.json").write_text(json.dumps(
        {"image": str(args.image), "components": result.components, "steps": len(result.losses),
         "final_loss": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 2)}, indent=1))
    prompts = prompts_of(args)
    with LoraSlot(base, space.layout) as slot:
        slot.set(result.vector)
        renders = generate(base, prompts, seed=args.seed, steps=args.render_steps, guidance_scale=args.guidance)
    path = save_png(grid([[tensor_to_pil(image)] + renders], col_labels=["input", *prompts]), args.grid)
    print(f"inverted {args.image} with {result.components} PCs in {result.seconds:.1f}s; LoRA: {lora_dir}; grid: {path}")
    return 0
