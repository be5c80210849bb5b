"""`w2w edit OUT`: move an identity model along attribute directions and render the sweep.

Rows: one per attribute (strengths -2σ..+2σ by default) and one per composed edit.
"""
from __future__ import annotations

import argparse

from jobs.commands._common import (add_force_argument, add_lora_format_argument, add_render_arguments, prompts_of,
                                   refuse_existing, save_png)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="build output folder with a subspace and directions (`w2w pca`, `w2w directions`)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--identity", help="edit this training identity (default: the first one)")
    which.add_argument("--lora", help="edit a model saved as safetensors (e.g. by `w2w invert`)")
    which.add_argument("--sample-seed", type=int, help="edit a model sampled from the space with this seed")
    parser.add_argument("--attribute", action="append", default=None, metavar="NAME",
                        help="attribute to sweep (repeatable; default: every attribute with a direction)")
    parser.add_argument("--strengths", default="-2,-1,0,1,2",
                        help="comma-separated strengths in units of each direction's calibrated sigma; "
                             "write --strengths=-2,0,2 when the first is negative (default -2,-1,0,1,2)")
    parser.add_argument("--compose", action="append", default=None, metavar="A=S,B=S",
                        help='a composed edit rendered as its own row, e.g. "beard=1,young=-1" (repeatable)')
    parser.add_argument("--edit-start", type=float, default=0.0, metavar="F",
                        help="timestep-gated edits: render the first fraction F of the denoising steps with the "
                             "unedited model, the rest with the edited one (0 = edit every step, the default)")
    parser.add_argument("--save-loras", default=None, metavar="DIR",
                        help="also write every edited model of the grid as a LoRA folder DIR/<row>_<strength>/ (see --format)")
    add_lora_format_argument(parser)
    add_render_arguments(parser, default_out="edit.png")
    add_force_argument(parser, "an existing --out grid or --save-loras folder")


def parse_edit(text: str) -> dict[str, float]:
    from jobs.cli import UserError

    edits = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            edits[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--compose {text!r}: expected NAME=STRENGTH pairs separated by commas") from None
        if not sep:
            raise UserError(f"--compose {text!r}: expected NAME=STRENGTH pairs separated by commas")
    return edits


def pick_model(space, args):
    """The vector to edit: a training identity's reconstruction, a LoRA file, or a sample."""
    from jobs.cli import UserError

    if args.lora:
        return space.layout.load(args.lora), args.lora
    if args.sample_seed is not None:
        return space.sample(1, seed=args.sample_seed)[0], f"sample seed {args.sample_seed}"
    identity = args.identity or space.identities[0]
    if identity not in space.identities:
        raise UserError(f"identity {identity!r} is not in this space (e.g. {', '.join(space.identities[:5])})")
    index = space.identities.index(identity)
    return space.reconstruct(space.coefficients[index]), identity


def run(args) -> int:
    from jobs.cli import UserError
    from w2w_core.render import edit_switch_step, generate_models, grid, tensor_to_pil
    from w2w_core.space import WeightSpace

    space = WeightSpace.load(args.out)
    attributes = args.attribute or sorted(space.directions)
    if not attributes:
        raise UserError(f"no attribute directions in {args.out}; run `w2w directions {args.out}` first")
    for name in attributes:
        if name not in space.directions:
            raise UserError(f"unknown attribute {name!r}; valid attributes: {', '.join(sorted(space.directions))}")
    try:
        strengths = [float(s) for s in args.strengths.split(",")]
    except ValueError:
        raise UserError(f"--strengths {args.strengths!r}: expected comma-separated numbers, e.g. -2,-1,0,1,2") from None
    composed = [parse_edit(text) for text in args.compose or []]
    for edits in composed:
        for name in edits:
            if name not in space.directions:
                raise UserError(f"unknown attribute {name!r} in --compose; valid attributes: {', '.join(sorted(space.directions))}")
    try:
        edit_switch_step(args.edit_start, args.render_steps)
    except ValueError as err:
        raise UserError(f"--edit-start: {err}") from None
    vec, label = pick_model(space, args)
    refuse_existing(args.grid, args.force, "pass --out NEW.png")  # before rendering: never overwrite silently
    if args.save_loras:
        refuse_existing(args.save_loras, args.force, "pass another --save-loras DIR")
    base = space.base_model()
    prompt = prompts_of(args)[0]
    rows, row_labels = [], []

    def render_row(vectors: list, names: list[str]) -> list:
        """One grid row, its models rendered in one call (each timestep-gated from the unedited model)."""
        if args.save_loras:
            for v, name in zip(vectors, names):
                space.save_lora(v, f"{args.save_loras}/{name}", format=args.lora_format)
        images = generate_models(base, space.layout, [vec] * len(vectors), [prompt], [args.seed],
                                 steps=args.render_steps, guidance_scale=args.guidance, edited=vectors,
                                 edit_start=args.edit_start)
        return [tensor_to_pil(x[0]) for x in images]

    for name in attributes:
        rows.append(render_row([space.edit(vec, {name: s}) for s in strengths], [f"{name}_{s:+g}" for s in strengths]))
        row_labels.append(name)
        print(f"edit: {name} swept over {strengths}", flush=True)
    for edits in composed:
        rows.append(render_row([space.edit(vec, {k: s * v for k, v in edits.items()}) for s in strengths],
                               [f"{'+'.join(edits)}_{s:+g}" for s in strengths]))
        row_labels.append("+".join(edits))
    col_labels = [f"{s:+g} sd" for s in strengths]
    path = save_png(grid(rows, row_labels=row_labels, col_labels=col_labels), args.grid)
    print(f"wrote {path} (model: {label}; composed rows scale every listed strength by the column)")
    return 0
