"""`w2w build CONFIG [KEY=VALUE ...]`: train one LoRA per identity on Ray into <build.out>."""
from __future__ import annotations

from jobs.commands._common import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--no-verify", action="store_true",
                        help="trust existing shard markers without re-checking chunk checksums (faster at scale)")
    parser.add_argument("--takeover", action="store_true",
                        help="proceed although another driver holds the build lease (its heartbeat is fresh): "
                             "that driver and its workers are fenced and stop writing")


def run(args) -> int:
    from pipeline.builder.builder import run_build
    from pipeline.builder.lease import LeaseError
    from pipeline.builder.store import StoreError
    from jobs.cli import UserError

    cfg = config_from_args(args)
    try:
        summary = run_build(cfg, progress_bar=not args.no_progress, verify=not args.no_verify, takeover=args.takeover)
    except LeaseError as err:
        return lease_refused(args.command, err)
    except StoreError as err:
        raise UserError(str(err)) from None
    return report(summary)


LEASE_EXIT = 3  # another driver holds the store (or took it over): distinct from config errors (2)


def lease_refused(command: str, err) -> int:
    """One line naming the other driver; exit 3 so schedulers can tell "busy" from "broken"."""
    import sys

    print(f"w2w {command}: {err}", file=sys.stderr)
    return LEASE_EXIT


def report(summary) -> int:
    done = summary.done_before + summary.done_now
    print(f"{summary.out}: {done}/{summary.n_shards} shards done ({summary.done_now} this run, "
          f"{summary.quarantined} identities quarantined) in {summary.seconds:.1f}s")
    if summary.failed:
        for s, why in sorted(summary.failed.items()):
            print(f"  shard {s} failed: {why}")
        print(f"{len(summary.failed)} shard(s) failed; fix the cause and run `w2w resume {summary.out}`")
        return 1
    return 0
