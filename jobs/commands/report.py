"""`w2w report OUT`: measure sampling, editing and inversion with the tiny-world evaluators -> report.md + PNGs."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="build output folder with a subspace and directions")
    parser.add_argument("--sample-models", type=int, default=16,
                        help="sampled models to evaluate (default 16: with 8, one sample moves the novel fraction by "
                             "0.125, more than the target's 0.10 margin)")
    parser.add_argument("--edit-models", type=int, default=8, help="training models to edit per attribute (default 8)")
    parser.add_argument("--invert-identities", type=int, default=4, help="held-out identities to invert (default 4)")
    parser.add_argument("--invert-steps", type=int, default=200, help="inversion steps, also the LoRA baseline's (default 200)")
    parser.add_argument("--fidelity-models", type=int, default=16,
                        help="training models whose renders are compared with their identity's images (default 16)")
    parser.add_argument("--invert-lr", type=float, default=1.0,
                        help="Adam lr of the inversion over PC coefficients (default 1.0; see ReportSettings.invert_lr)")
    parser.add_argument("--edit-strength", type=float, default=2.0,
                        help="edit strength in calibrated standard deviations of each direction (default 2)")
    parser.add_argument("--edit-sweep", default="4,6",
                        help="further strengths measured for male, beard, eyeglasses and young, comma-separated "
                             "('' = none; default 4,6)")
    parser.add_argument("--render-steps", type=int, default=25, help="DDIM steps per rendered image (default 25)")
    parser.add_argument("--attribute", action="append", default=None, help="attributes to evaluate (default: all)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT/report/ (default: refuse)")


def run(args) -> int:
    from pathlib import Path

    from jobs.commands._common import refuse_existing
    from pipeline.eval.report import ReportSettings, write_report

    edit_sweep = _strengths(args.edit_sweep)  # bad input fails before anything is touched
    refuse_existing(Path(args.out) / "report" / "report.md", args.force, after=" (or move the old report/ away first)")

    settings = ReportSettings(
        sample_models=args.sample_models,
        edit_models=args.edit_models,
        invert_identities=args.invert_identities,
        invert_steps=args.invert_steps,
        invert_lr=args.invert_lr,
        render_steps=args.render_steps,
        edit_strength=args.edit_strength,
        edit_sweep=edit_sweep,
        fidelity_models=args.fidelity_models,
        attributes=args.attribute or [],
    )
    path = write_report(args.out, settings, log=lambda m: print(m, flush=True))
    print(f"report: {path}")
    return 0


def _strengths(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"--edit-sweep {text!r} is not a comma-separated list of numbers (e.g. 4,6)") from None
