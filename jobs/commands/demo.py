"""`w2w demo`: the whole main job on the embedded tiny world, stage by stage.

synth -> build (local Ray cluster) -> pca -> directions -> sample / edit / invert grids -> report.
Every stage is resumable or skipped when its output is already there, so re-running
`make demo` after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="conf/tiny.yaml", help="config file (default conf/tiny.yaml)")
    parser.add_argument("--identities", type=int, default=192,
                        help="identities in the demo dataset (default 192: where every attribute direction but smiling's "
                             "generalises; docs/RESULTS.md, \"How quality grows with the number of models\")")
    parser.add_argument("--images", type=int, default=10, help="images per identity (default 10)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=40")


def _stage(name: str, argv: list[str]) -> None:
    from jobs.cli import main

    started = time.perf_counter()
    print(f"\n=== demo: {name}: w2w {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"demo: stage '{name}' failed with exit code {code}; fix the error above and re-run (finished stages are reused)")
    print(f"=== demo: {name} done in {time.perf_counter() - started:.1f}s", flush=True)


def run(args) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.build.out)
    source = Path(cfg.data.source)
    overrides = list(args.overrides)
    started = time.perf_counter()

    if (source / "attributes.parquet").is_file():
        print(f"=== demo: synth: reusing the identity source at {source}")
    else:
        _stage("synth", ["synth", str(source), "--identities", str(args.identities), "--images", str(args.images)])
    _stage("build", ["build", args.config, *overrides])
    subspace = out / "subspace"
    if (subspace / "pca.json").is_file():
        print(f"=== demo: pca: reusing {subspace}")
    else:
        _stage("pca", ["pca", str(out)])
    if (subspace / "directions.json").is_file():
        print(f"=== demo: directions: reusing {subspace / 'directions.json'}")
    else:
        _stage("directions", ["directions", str(out)])
    grids = out / "grids"
    # the demo re-renders its own grids on every run (--force: it owns OUT/grids)
    _stage("sample", ["sample", str(out), "--n", "6", "--out", str(grids / "sample.png"), "--force"])
    _stage("edit", ["edit", str(out), "--out", str(grids / "edit.png"), "--force"])
    report = out / "report" / "report.md"
    if report.is_file() and report.stat().st_mtime > (subspace / "directions.json").stat().st_mtime:
        print(f"=== demo: report: reusing {report} (delete it to measure again)")
    else:
        _stage("report", ["report", str(out), "--force"])  # stale: the demo re-measures its own report
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min. Report: {out / 'report' / 'report.md'}", file=sys.stderr)
    print(f"report: {out / 'report' / 'report.md'}")
    return 0
