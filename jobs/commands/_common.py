"""Argument helpers shared by sub-commands."""
from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (conf/tiny.yaml, conf/sd15.yaml, or your own)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotlist overrides, e.g. train.steps=50 build.out=runs/x",
    )


def config_from_args(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


def add_render_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help='prompt to render (repeatable; default "sks person")')
    parser.add_argument("--out", dest="grid", default=default_out, help=f"PNG grid to write (default {default_out})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0): grids are reproducible")
    parser.add_argument("--render-steps", type=int, default=25, help="DDIM denoising steps per rendered image (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0,
                        help="classifier-free guidance scale (default 4.0; 1.0 = off)")


def prompts_of(args) -> list[str]:
    return args.prompt or ["sks person"]


def save_png(image, path: str) -> str:
    """Write a PNG atomically (temp file, then rename) and return its path."""
    import os
    from pathlib import Path

    path_obj = Path(path)
    path_obj.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_obj.with_name(path_obj.name + ".partial.png")
    image.save(tmp)
    os.replace(tmp, path_obj)
    return str(path_obj)
