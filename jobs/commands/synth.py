"""`w2w synth OUT`: write a SynthFaces identity source (folder per identity + attributes.parquet)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (created; existing identity folders are overwritten)")
    parser.add_argument("--identities", type=int, default=64, help="number of identities (default 64)")
    parser.add_argument("--images", type=int, default=10, help="images per identity (default 10)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="identity seed: ids are s{seed}_{index}; seed 0 = demo identities (1000 pretrain, 2000/3000 evaluators)",
    )
    parser.add_argument("--start-index", type=int, default=0, help="first identity index (default 0)")


def run(args) -> int:
    import sys
    import time

    from jobs.cli import UserError
    from pipeline.data.synthfaces import write_identity_source

    if args.identities < 1 or args.images < 1:
        raise UserError("--identities and --images must be at least 1")
    t0 = time.time()
    step = max(1, args.identities // 20)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            rate = done * args.images / max(time.time() - t0, 1e-6)
            print(f"synth: {done}/{total} identities ({rate:.0f} images/s)", file=sys.stderr, flush=True)

    out = write_identity_source(
        args.out, args.identities, args.images, seed=args.seed, start_index=args.start_index, progress=progress
    )
    print(f"wrote {args.identities} identities x {args.images} images to {out} (+ attributes.parquet) "
          f"in {time.time() - t0:.1f}s")
    return 0
