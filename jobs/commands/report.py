"""`w2w report OUT`: measure sampling, editing and inversion with the tiny-world evaluators -> report.md + PNGs."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.commands._common import INVERSION_LR_SCHEDULES
    from pipeline.eval.settings import ReportSettings

    d = ReportSettings()  # the defaults live there, once
    parser.add_argument("out", help="build output folder with a subspace and directions")
    parser.add_argument("--sample-models", type=int, default=d.sample_models,
                        help=f"sampled models to evaluate (default {d.sample_models}: with 8, one sample moves the novel "
                             "fraction by 0.125, more than the target's 0.10 margin)")
    parser.add_argument("--edit-models", type=int, default=d.edit_models,
                        help=f"training models to edit per attribute (default {d.edit_models})")
    parser.add_argument("--invert-identities", type=int, default=d.invert_identities,
                        help=f"held-out identities to invert (default {d.invert_identities})")
    parser.add_argument("--invert-steps", type=int, default=d.invert_steps,
                        help=f"inversion steps, also the LoRA baseline's (default {d.invert_steps})")
    parser.add_argument("--fidelity-models", type=int, default=d.fidelity_models,
                        help=f"training models whose renders are compared with their identity's images (default {d.fidelity_models})")
    parser.add_argument("--invert-lr", type=float, default=d.invert_lr,
                        help=f"Adam lr of the inversion over PC coefficients (default {d.invert_lr:g}; see ReportSettings.invert_lr)")
    parser.add_argument("--invert-lr-schedule", choices=INVERSION_LR_SCHEDULES, default=d.invert_lr_schedule,
                        help=f"how the inversion's lr moves over its steps (default {d.invert_lr_schedule}: decays to 0 "
                             "by the last step; constant is the published recipe)")
    parser.add_argument("--lora-baseline-lr-scale", type=float, default=d.lora_baseline_lr_scale,
                        help=f"the single-image LoRA baseline trains with the build's recipe at this multiple of its lr "
                             f"(default {d.lora_baseline_lr_scale:g}; see ReportSettings.lora_baseline_lr_scale)")
    parser.add_argument("--edit-strength", type=float, default=d.edit_strength,
                        help=f"edit strength in calibrated standard deviations of each direction (default {d.edit_strength:g})")
    sweep = ",".join(f"{s:g}" for s in d.edit_sweep)
    parser.add_argument("--edit-sweep", default=sweep,
                        help="further strengths measured for male, beard, eyeglasses and young, comma-separated "
                             f"('' = none; default {sweep})")
    parser.add_argument("--render-steps", type=int, default=d.render_steps,
                        help=f"DDIM steps per rendered image (default {d.render_steps})")
    parser.add_argument("--attribute", action="append", default=None, help="attributes to evaluate (default: all)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT/report/ (default: refuse)")


def run(args) -> int:
    from pathlib import Path

    from jobs.commands._common import refuse_existing
    from pipeline.eval.report import write_report
    from pipeline.eval.settings import ReportSettings

    edit_sweep = _strengths(args.edit_sweep)  # bad input fails before anything is touched
    refuse_existing(Path(args.out) / "report" / "report.md", args.force, after=" (or move the old report/ away first)")

    settings = ReportSettings(
        sample_models=args.sample_models,
        edit_models=args.edit_models,
        invert_identities=args.invert_identities,
        invert_steps=args.invert_steps,
        invert_lr=args.invert_lr,
        invert_lr_schedule=args.invert_lr_schedule,
        lora_baseline_lr_scale=args.lora_baseline_lr_scale,
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
