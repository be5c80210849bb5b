"""`w2w resume OUT [build.workers=N ...]`: finish only the shards without a valid marker."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("out", help="the build's output directory (build.out) or fsspec URL")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="execution-only overrides: build.workers, build.ray_address, build.max_restarts, ...")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--no-verify", action="store_true",
                        help="trust existing shard markers without re-checking chunk checksums")
    parser.add_argument("--takeover", action="store_true",
                        help="proceed although another driver holds the build lease (its heartbeat is fresh): "
                             "that driver and its workers are fenced and stop writing")


def run(args) -> int:
    from jobs.cli import UserError
    from jobs.commands.build import lease_refused, report
    from pipeline.builder.builder import resume_config, run_build
    from pipeline.builder.lease import LeaseError
    from pipeline.builder.store import StoreError

    try:
        cfg = resume_config(args.out, args.overrides)
        summary = run_build(cfg, progress_bar=not args.no_progress, verify=not args.no_verify, takeover=args.takeover)
    except LeaseError as err:
        return lease_refused(args.command, err)
    except StoreError as err:
        raise UserError(str(err)) from None
    if summary.done_now == 0 and not summary.failed and summary.done_before == summary.n_shards:
        return 0
    return report(summary)
