"""The `w2w` command line: one sub-command per stage, each in jobs/commands/<name>.py.

A sub-command module provides `add_arguments(parser)` and `run(args) -> int`; it imports
heavy libraries inside `run`, so `w2w --help` stays instant. A sub-command without a
module is listed and exits non-zero with "not implemented yet".
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback

# name -> one-line help, in the order a user meets them.
COMMANDS: dict[str, str] = {
    "synth": "write a SynthFaces identity source: a folder per identity + attributes.parquet",
    "build": "train one LoRA per identity on a Ray cluster into weights.zarr (+ manifest, shard markers)",
    "status": "show a build's shards done/running/failed/pending, throughput and ETA (--json)",
    "resume": "finish only the shards of a build that have no valid completion marker",
    "pca": "stream the weight store with Dask: mean, std and the top-K principal components",
    "directions": "fit attribute directions (beard, young, ...) in PC space, optionally disentangled",
    "sample": "sample new identity models from the subspace and render them",
    "edit": "edit an identity model along attribute directions and render the sweep",
    "invert": "invert one image into the subspace: a new LoRA for that identity",
    "report": "write the quality report (sampling, editing, inversion) with the tiny-world evaluators",
    "serve": "start the interactive explorer: a web page to sample, edit, invert and download models",
    "demo": "run the whole pipeline on the embedded tiny world and print where the report is",
}

# Commands that load diffusers models (their loading bars are silenced).
LOADS_MODELS = {"build", "resume", "sample", "edit", "invert", "report", "serve", "demo"}


class UserError(Exception):
    """An error in the user's input; printed without a traceback."""


def _command_module(name: str):
    if importlib.util.find_spec(f"jobs.commands.{name}") is None:
        return None
    return importlib.import_module(f"jobs.commands.{name}")


def _not_implemented(name: str):
    def run(args) -> int:
        print(f"w2w {name}: not implemented yet", file=sys.stderr)
        return 3

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2w",
        description=(
            "weights2weights at scale. Build a dataset of per-identity LoRA models on Ray, "
            "turn it into a linear weight subspace with Dask, then sample, edit and invert models. "
            "Configs: conf/tiny.yaml (embedded default, CPU) and conf/sd15.yaml (published recipe)."
        ),
        epilog="Run `w2w COMMAND --help` for a command's options.",
    )
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = _command_module(name)
        if module is None:
            command.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            command.set_defaults(run=_not_implemented(name))
        else:
            module.add_arguments(command)
            command.set_defaults(run=module.run)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress lines: no per-file loading bars or deprecation chatter."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _quiet_loading_bars() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in LOADS_MODELS:
            _quiet_loading_bars()
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI turns known input errors into one clear line
        if args.traceback or not _is_user_error(err):
            traceback.print_exc()
        print(f"w2w {args.command}: error: {err}", file=sys.stderr)
        return 2


def _is_user_error(err: Exception) -> bool:
    from pipeline.builder.store import StoreError
    from pipeline.config import ConfigError
    from pipeline.data.source import IdentityDataError
    from w2w_core.layout import LayoutMismatchError
    from w2w_core.render import ImageError

    known = (UserError, ConfigError, StoreError, IdentityDataError, LayoutMismatchError, ImageError,
             FileNotFoundError, FileExistsError)
    return isinstance(err, known)


if __name__ == "__main__":
    sys.exit(main())
