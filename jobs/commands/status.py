"""`w2w status OUT [--json]`: shards done/running/failed/pending, identities, throughput, ETA."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("out", help="the build's output directory (build.out) or fsspec URL")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    import json

    from pipeline.builder.status import build_status, format_status

    st = build_status(args.out)
    print(json.dumps(st, indent=1, sort_keys=True, default=str) if args.json else format_status(st))
    return 0
