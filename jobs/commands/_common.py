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
