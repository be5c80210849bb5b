"""How quality grows with the number of models (issue 16): PCA + directions on nested subsets of one space.

Reuses a finished build folder OUT (weights.zarr + manifest.parquet + the build's config): for each N,
the first N models of a fixed seeded permutation of its valid rows get their own PCA and directions
(the functions `w2w pca` / `w2w directions` run) in WORK/n<N>/subspace (WORK/n<N> links to OUT's store;
OUT is only read), then the report's measurements (pipeline/eval/report.py): sampling novelty and
validity, edit success and ID similarity, inversion of the report's held-out identities (the same for
every N) vs the single-image LoRA baseline, held-out balanced accuracy of the directions, explained
variance of the first PCs. Fidelity of the training models and the LoRA baseline do not depend on N:
measured once. Writes one JSON, one plot (each metric against N, log scale) and one Markdown table,
rewritten after every N (a stopped run keeps the Ns that finished).

    python benchmarks/quality_scaling.py runs/demo --ns 24,48,96,128 \\
        --json docs/bench/quality_scaling_cpu.json --plot docs/images/results/quality_scaling.png \\
        --table /tmp/quality_scaling.md --threads 1

With --build CONFIG the script first builds OUT itself, in this process and without Ray (run_build(local=True):
the ShardWorker code every Ray actor runs, shard after shard; an interrupted build resumes), e.g. on a GPU box:

    w2w synth runs/q2k/identities --identities 2000 --images 10
    python benchmarks/quality_scaling.py runs/q2k --build conf/tiny.yaml --set data.source=runs/q2k/identities \
        --set model.device=cuda --ns 128,500,2000 --json q2k.json --plot q2k.png --table q2k.md

Pipeline code is imported from the installed project (`pip install -e .`); nothing here edits sys.path.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone


def parse_ns(text: str) -> list[int]:
    try:
        ns = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ns takes comma-separated integers, e.g. 24,48,96; got {text!r}") from None
    if not ns:
        raise argparse.ArgumentTypeError("--ns is empty")
    return ns


def parse_strengths(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--edit-sweep takes comma-separated numbers, e.g. 3,4,5,6; got {text!r}") from None


def parse_measure(text: str) -> tuple[str, ...]:
    from pipeline.eval.scaling import MEASUREMENTS

    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in MEASUREMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--measure takes a comma-separated subset of {','.join(MEASUREMENTS)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("out", nargs="?", help="finished build folder (weights.zarr, manifest.parquet); only read")
    ap.add_argument("--ns", type=parse_ns, help="comma-separated subset sizes, e.g. 24,48,96,128")
    ap.add_argument("--from-json", metavar="JSON",
                    help="measure nothing: redraw --plot and --table (and rewrite --json) from an earlier run's JSON")
    ap.add_argument("--overlay", action="append", default=[], metavar="LABEL=JSON",
                    help="with --from-json: draw another run's curves dashed on the same plot (repeatable)")
    ap.add_argument("--json", help="write the results here (JSON)")
    ap.add_argument("--plot", help="write the plot here (PNG)")
    ap.add_argument("--table", help="write the Markdown table here")
    ap.add_argument("--build", metavar="CONFIG",
                    help="first build OUT from this config in this process, without Ray (build.out=OUT; resumes a partial build)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for --build (repeatable), e.g. --set train.steps=300")
    ap.add_argument("--work", help="scratch folder for the per-N subspaces and report grids (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the permutation that orders the nested subsets (default 0)")
    ap.add_argument("--components", type=int, default=None,
                    help="PCs per subset (default: the build config's subspace.components), capped at N-1")
    ap.add_argument("--edit-components", type=int, default=None,
                    help="leading PCs the directions and samples use (default: the build config's subspace.edit_components, "
                         "else all K); capped at each N's K")
    ap.add_argument("--evr-k", type=int, default=10, help="report the explained variance of the first K PCs (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    # the report's settings (pipeline.eval.settings.ReportSettings), at the smaller sizes the scaling runs used
    ap.add_argument("--sample-models", type=int, default=8)
    ap.add_argument("--edit-models", type=int, default=8)
    ap.add_argument("--invert-identities", type=int, default=4)
    ap.add_argument("--invert-steps", type=int, default=200)
    ap.add_argument("--fidelity-models", type=int, default=16)
    ap.add_argument("--render-steps", type=int, default=25)
    ap.add_argument("--edit-sweep", type=parse_strengths, default=(), metavar="LIST",
                    help="also edit male, beard, eyeglasses and young at these strengths in calibrated sd, e.g. 3,4,5,6 "
                         "(the report's sweep; default: none, the report's 2 sd only)")
    ap.add_argument("--gated-edit-start", type=float, default=0.0,
                    help="also measure timestep-gated edits from this fraction (default 0 = skip; the report uses 0.4)")
    ap.add_argument("--attribute", action="append", default=None, help="attributes to edit and score (default: all)")
    ap.add_argument("--measure", type=parse_measure, default=None, metavar="LIST",
                    help="comma-separated subset of fidelity,sampling,editing,inversion to run (default: all); the "
                         "directions' held-out accuracy and explained variance are always measured")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.from_json:
        return redraw(args)
    if not args.out or not args.ns:
        ap.error("OUT and --ns are required (unless --from-json)")
    import torch

    from pipeline.eval.settings import ReportSettings
    from pipeline.eval.scaling import MEASUREMENTS, run_scaling, write_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ReportSettings(sample_models=args.sample_models, edit_models=args.edit_models,
                              invert_identities=args.invert_identities, invert_steps=args.invert_steps,
                              fidelity_models=args.fidelity_models, render_steps=args.render_steps,
                              gated_edit_start=args.gated_edit_start, attributes=args.attribute or [],
                              edit_sweep=args.edit_sweep)
    started = time.time()
    meta = {"command": " ".join(["python", "benchmarks/quality_scaling.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": __import__("os").cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}

    def save(doc: dict) -> None:
        doc.update(meta, wall_seconds=time.time() - started)
        write_outputs(doc, args.json, args.plot, args.table)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.build:
        from pipeline.builder.builder import run_build
        from pipeline.config import load_config

        cfg = load_config(args.build, [*args.set, f"build.out={args.out}"])
        summary = run_build(cfg, progress_bar=False, log=log, local=True)
        if summary.failed:
            log(f"quality_scaling: build failed for {len(summary.failed)} shard(s): {summary.failed}; rerun to resume")
            return 1
        meta["build"] = {"config": args.build, "overrides": args.set, "seconds": summary.seconds,
                         "shards_built": summary.done_now, "shards_before": summary.done_before}
    with tempfile.TemporaryDirectory(prefix="quality_scaling_") as tmp:
        doc = run_scaling(args.out, args.ns, args.work or tmp, settings, seed=args.seed, components=args.components,
                          edit_components=args.edit_components,
                          evr_k=args.evr_k, log=log, on_update=save, measure=args.measure or MEASUREMENTS)
    save(doc)
    from pipeline.eval.scaling import table_markdown

    print(table_markdown(doc))
    print(f"quality_scaling: {len(doc['summary'])} Ns in {doc['wall_seconds']:.0f}s")
    return 0


def redraw(args) -> int:
    import json
    from pathlib import Path

    from pipeline.eval.scaling import summarize, table_markdown, write_outputs

    def load(path: str) -> dict:
        doc = json.loads(Path(path).read_text())
        doc["summary"] = [summarize(r, doc["fidelity"] or {}, doc["direction_attributes"], doc["evr_k"]) for r in doc["results"]]
        return doc

    doc = load(args.from_json)
    others = [(label, load(path)) for label, path in (item.rsplit("=", 1) for item in args.overlay)]
    write_outputs(doc, args.json, args.plot, args.table, others)
    print(table_markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
