"""`w2w serve OUT`: the interactive explorer (sample, edit, invert, nearest, download) in the browser."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f"{parser.description or 'start the interactive explorer'}. The page explores the space at OUT: Sample (seeds -> new identities), Edit (one slider per "
        "attribute direction in calibrated sigmas, with the identity similarity and attribute classifier scores "
        "where the space has evaluators: the tiny world), Invert (upload an image -> a model of that identity, "
        "which becomes the current model), Nearest (closest training identities) and Download (the current "
        "model as a diffusers and kohya LoRA and as PC coefficients). Each browser tab has its own current "
        "model; renders and inversions run one at a time. Needs the `ui` extra: pip install '.[ui]' (Gradio). "
        "Timings on a 2-core CPU: docs/SERVE.md."
    )
    parser.add_argument("out", help="build output folder with a subspace (`w2w pca`) and, for sliders, directions")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                             "explorer, without login, to every machine that reaches this one)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    parser.add_argument("--render-steps", type=int, default=25, help="DDIM denoising steps per rendered image (default 25)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for renders and inversions (default 1: the tiny model's renders gain "
                             "nothing from more, and 2 threads slow down many times when other processes share the "
                             "cores; docs/SERVE.md). 0 = torch's default (all cores), e.g. for SD1.5 on a big CPU")
    parser.add_argument("--no-evaluators", action="store_true",
                        help="do not load the tiny world's identity embedder and attribute classifier "
                             "(they are loaded only for spaces on the builtin tiny model anyway)")


def run(args) -> int:
    import importlib.util

    from jobs.cli import UserError
    from pipeline.serve import serve

    if importlib.util.find_spec("gradio") is None:
        raise UserError("the explorer needs Gradio: pip install '.[ui]' (or the dev extra)")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port (1..65535)")
    if args.threads < 0:
        raise UserError("--threads must be 0 (torch's default) or more")
    if args.render_steps < 1:
        raise UserError("--render-steps must be at least 1")
    serve(args.out, host=args.host, port=args.port, render_steps=args.render_steps, evaluators=not args.no_evaluators,
          threads=args.threads or None)
    return 0
