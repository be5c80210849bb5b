"""`w2w directions OUT`: fit a direction in PC space for every binary attribute of the manifest."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="build output folder with subspace/ (run `w2w pca OUT` first)")
    parser.add_argument("--method", choices=("lstsq", "logistic"), default="lstsq",
                        help="lstsq: least squares of the centred labels on the PC coefficients (published); "
                             "logistic: L2 logistic regression")
    parser.add_argument("--disentangle", nargs="*", default=[], metavar="TARGET:OTHER[,OTHER]",
                        help="project OTHER directions out of TARGET, e.g. beard:male")
    parser.add_argument("--debias-against", nargs="*", default=[], metavar="ATTR",
                        help="make every other direction orthogonal to these (default: none)")
    parser.add_argument("--components", "-k", type=int, default=None,
                        help="fit on the first K PCs only (default: the build config's subspace.edit_components, "
                             "else all); sampling uses the same K, inversion every PC")
    parser.add_argument("--force", action="store_true",
                        help="replace existing OUT/subspace/directions.* (default: refuse)")


def run(args) -> int:
    from jobs.cli import UserError
    from jobs.commands._common import refuse_existing
    from pipeline.subspace.directions import compute_directions
    from pipeline.subspace.io import subspace_url

    refuse_existing(subspace_url(args.out) + "/directions.json", args.force)
    from w2w_core.directions import parse_disentangle

    try:
        dirs, strengths, meta = compute_directions(
            args.out, args.method, parse_disentangle(args.disentangle), list(args.debias_against),
            components=args.components,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"wrote {args.out}/subspace/directions.safetensors: {len(dirs)} directions ({args.method})")
    return 0
