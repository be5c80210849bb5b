"""Argument helpers shared by sub-commands."""
from __future__ import annotations

import argparse

# w2w_core.invert.LR_SCHEDULES, spelled out so that `--help` does not import torch (a test keeps them equal).
INVERSION_LR_SCHEDULES = ("constant", "cosine")


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


def add_lora_format_argument(parser: argparse.ArgumentParser) -> None:
    """--format of saved LoRAs: diffusers' own, or kohya's, which the other tools read (see WeightSpace.save_lora)."""
    parser.add_argument("--format", dest="lora_format", choices=("diffusers", "kohya"), default="diffusers",
                        help="format of saved LoRAs: diffusers (DIR/pytorch_lora_weights.safetensors, for "
                             "load_lora_weights) or kohya (DIR/<DIR name>.safetensors with lora_unet_* keys and "
                             "alpha per module: A1111, ComfyUI, kohya scripts; diffusers loads it too). Default diffusers")


def add_force_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true",
                        help=f"replace {what} when it already exists (default: refuse, never overwrite silently)")


def refuse_existing(path, force: bool, elsewhere: str = "", after: str = "") -> None:
    """Results are never replaced silently: an existing file (or non-empty folder) at `path` is
    refused with one line naming how to write elsewhere (`elsewhere`, e.g. "pass --out NEW.png")
    and --force (replace it). `path` may be an fsspec URL (pca and directions write next to a
    store that may live on s3://)."""
    import fsspec

    from jobs.cli import UserError

    if force:
        return
    fs, local = fsspec.core.url_to_fs(str(path))
    if fs.exists(local) and (not fs.isdir(local) or fs.ls(local)):
        how = f"{elsewhere} to write elsewhere, or " if elsewhere else ""
        raise UserError(f"{path} already exists (an earlier result, not replaced silently); "
                        f"{how}pass --force to replace it{after}")


def unique_dir(path) -> "Path":
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist yet (default result names
    derived from an input, e.g. the image stem, must not collide: /a/0.jpg and /b/0.png)."""
    from pathlib import Path

    path = Path(path)
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate
