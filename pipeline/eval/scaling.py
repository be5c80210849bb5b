"""How quality grows with the number of models (issue 16): nested subsets of one space's models.

One finished store (`w2w build`), a fixed seeded permutation of its valid rows, and for each N the
first N rows of it: PCA (`pipeline.subspace.pca.compute_subspace`, what `w2w pca` runs) and
directions (`pipeline.subspace.directions.compute_directions`, what `w2w directions` runs) are
fitted on those N models only, into a scratch copy of the build folder (symlinks to the store,
its own `subspace/`), and the quality report's measurements (`pipeline.eval.report`) run on it:
sampling novelty and validity, edit success and ID similarity, inversion of the report's held-out
identities (the same for every N) next to the single-image LoRA baseline, held-out balanced
accuracy of the directions, explained variance of the first PCs.

Two measurements do not depend on N and run once: identity fidelity of the training models (the
models are the same trained LoRAs whatever the subset; measured on the first `fidelity_models`
of the permutation, which every subset with N >= fidelity_models contains) and the single-image
LoRA baseline of inversion (trained on the base model, not in the space).

`benchmarks/quality_scaling.py` is the command line; docs/QUALITY_SCALING.md the result.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.eval.report import EDIT_TARGET_ATTRIBUTES, TARGETS, check_settings
from pipeline.eval.settings import ReportSettings

# What run_scaling can measure per N (its `measure`); fidelity runs once, whatever N.
MEASUREMENTS = ("fidelity", "sampling", "editing", "inversion")

# Entries of a build folder that belong to one subspace/report, not to the store: not linked into a subset's folder.
PER_SPACE = ("subspace", "report", "grids")


def nested_rows(valid_rows: np.ndarray, seed: int) -> np.ndarray:
    """The fixed order of the nested subsets: subset N is the first N of this permutation of the valid rows."""
    return np.random.default_rng(seed).permutation(np.asarray(valid_rows, dtype=np.int64))


def subset_folder(out: Path, work: Path, n: int) -> Path:
    """`work/n<N>`: a build folder whose store entries link to `out`'s (nothing is copied or written there)."""
    folder = work / f"n{n}"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for entry in out.iterdir():
        if entry.name not in PER_SPACE:
            (folder / entry.name).symlink_to(entry.resolve())
    return folder


def summarize(record: dict, fidelity: dict, direction_attributes: list[str], evr_k: int) -> dict:
    """The curves' numbers for one N (flat): what the plot and the table show."""
    # a measurement skipped (run_scaling's `measure`) reads as None in every number it gives
    inv, smp, ws = record.get("inversion") or {}, record.get("sampling") or {}, record["weight_space"]
    edits = record.get("editing") or {}
    edit_attrs = [a for a in EDIT_TARGET_ATTRIBUTES if a in edits and "skipped" not in edits[a]]
    acc = ws["heldout_attribute_accuracy"]
    accs = [acc[a]["balanced_accuracy"] for a in direction_attributes if a in acc]
    evr = ws["explained_variance_ratio"]
    return {
        "n": record["n"],
        "k": record["k"],
        "fidelity": fidelity.get("fidelity"),
        "fidelity_floor": fidelity.get("floor"),
        "fidelity_ceiling": fidelity.get("ceiling"),
        "inversion_w2w": inv.get("w2w"),
        "inversion_lora": inv.get("lora"),
        "inversion_vs_lora": inv["w2w"] / inv["lora"] if inv.get("lora") else None,
        "edit_success": float(np.mean([edits[a]["w2w_success"] for a in edit_attrs])) if edit_attrs else None,
        "edit_id_similarity": float(np.mean([edits[a]["w2w_id_similarity"] for a in edit_attrs])) if edit_attrs else None,
        "edit_attributes": edit_attrs,
        "direction_accuracy": float(np.nanmean(accs)) if accs and not np.all(np.isnan(accs)) else None,
        "direction_attributes": [a for a in direction_attributes if a in acc],
        "direction_accuracy_per_attribute": {a: acc[a]["balanced_accuracy"] for a in direction_attributes if a in acc},
        "novel_fraction": smp.get("novel_fraction"),
        "validity_samples": smp.get("attribute_confidence_samples"),
        "validity_real": smp.get("attribute_confidence_real_images"),
        "evr_k": min(evr_k, len(evr)),
        "evr_first_k": float(np.sum(evr[:evr_k])),
    }


def direction_attributes(store, rows: np.ndarray, names: list[str]) -> list[str]:
    """Attributes the report's target applies to (>= TARGETS['direction_min_positives'] positives and negatives),
    counted over `rows` (the largest subset): one fixed set for every N."""
    manifest = store.manifest()
    index = {int(r): i for i, r in enumerate(manifest.column("row").to_pylist())}
    take = [index[int(r)] for r in rows]
    out = []
    for a in names:
        y = np.asarray(manifest.column(a).to_pylist())[take]
        if min(int(y.sum()), int(len(y) - y.sum())) >= TARGETS["direction_min_positives"]:
            out.append(a)
    return out


def run_scaling(
    out: str | os.PathLike,
    ns: list[int],
    work: str | os.PathLike,
    settings: ReportSettings | None = None,
    seed: int = 0,
    components: int | None = None,
    edit_components: int | None = None,
    evr_k: int = 10,
    log: Callable[[str], None] = print,
    on_update: Callable[[dict], None] | None = None,
    measure: tuple[str, ...] = MEASUREMENTS,
) -> dict:
    """Measure quality for each N in `ns` (ascending) on nested subsets of the store at `out`.

    `components`: PCs per subset (default: the build config's subspace.components), capped at N - 1.
    `edit_components`: leading PCs the directions and samples use (default: the build config's
    subspace.edit_components, else all), capped at each subset's K; set it for a store built before it existed.
    `on_update(doc)` runs after every N with the results so far (write them: a long run keeps what finished).
    `measure`: which of MEASUREMENTS run per N (fewer: cheaper Ns, e.g. inversion alone on a GPU lease);
    the directions' held-out accuracy and the explained variance are always measured.
    """
    unknown = sorted(set(measure) - set(MEASUREMENTS))
    if unknown:
        raise ValueError(f"unknown measurement(s) {unknown}; choose from {', '.join(MEASUREMENTS)}")
    from pipeline.builder.store import WeightStore
    from pipeline.config import SubspaceConfig
    from pipeline.eval.evaluators import load_evaluators
    from pipeline.eval.report import (Renderer, heldout_attribute_accuracy, measure_editing, measure_fidelity,
                                      measure_inversion, measure_sampling, model_vectors, single_image_loras)
    from pipeline.subspace.directions import compute_directions
    from pipeline.subspace.pca import compute_subspace
    from w2w_core.space import WeightSpace

    settings = check_settings(settings or ReportSettings())
    out, work = Path(out), Path(work)
    ns = sorted(set(int(n) for n in ns))
    store = WeightStore.open(str(out), mode="r")
    order = nested_rows(store.valid_rows(), seed)
    if ns[0] < 3 or ns[-1] > order.size:
        raise ValueError(f"N must be between 3 and the store's {order.size} valid models; got {ns}")
    cfg = (store.attrs.get("config") or {})
    sub = SubspaceConfig(**{k: v for k, v in (cfg.get("subspace") or {}).items() if k in SubspaceConfig.__dataclass_fields__})
    k_max = components if components is not None else sub.components
    evaluators = load_evaluators()
    dir_attrs = direction_attributes(store, order[: ns[-1]], [a for a in store.attribute_names if a in evaluators.attribute_names])
    doc = {"out": str(out), "ns": ns, "seed": seed, "models_valid": int(order.size), "components": k_max,
           "edit_components": edit_components or sub.edit_components or None,
           "pca_method": sub.method, "evr_k": evr_k, "settings": settings.__dict__.copy(),
           "direction_attributes": dir_attrs, "order_first": order[: min(order.size, 32)].tolist(),
           "fidelity": None, "lora_baseline_seconds": None, "results": [], "summary": []}

    base = None
    lora_fits = None
    for n in ns:
        t0 = time.perf_counter()
        folder = subset_folder(out, work, n)
        k = max(1, min(k_max, n - 1, store.numel))
        log(f"scaling: N={n}: PCA (K={k}, {sub.method}) and directions on the first {n} models of the permutation")
        compute_subspace(str(folder), k, method=sub.method, block_rows=sub.block_rows, power_iterations=sub.power_iterations,
                         seed=sub.seed, progress=None, rows=order[:n])
        compute_directions(str(folder), progress=lambda m: None,
                           components=min(edit_components, k) if edit_components else None)
        space = WeightSpace.load(folder)
        seconds = {"subspace": time.perf_counter() - t0}
        if base is None:
            base = space.base_model()
        if lora_fits is None and "inversion" in measure:
            t1 = time.perf_counter()
            log(f"scaling: single-image LoRA baseline for {settings.invert_identities} held-out identities (once)")
            lora_fits = single_image_loras(base, space.layout, store, settings, range(settings.invert_identities))
            doc["lora_baseline_seconds"] = time.perf_counter() - t1
        attributes = settings.attributes or [a for a in sorted(space.directions) if a in evaluators.attribute_names]
        true_vector = model_vectors(store, space)
        report_dir = folder / "report"
        report_dir.mkdir()
        render = Renderer(base, space.layout, settings.render_steps)
        if doc["fidelity"] is None and "fidelity" in measure:
            t1 = time.perf_counter()
            log(f"scaling: N={n}: fidelity of the first {min(settings.fidelity_models, n)} models (once: it does not depend on N)")
            doc["fidelity"] = measure_fidelity(store, space, evaluators, render, true_vector, settings, report_dir)
            doc["fidelity"]["seconds"] = time.perf_counter() - t1
        record: dict = {"n": n, "k": space.k, "attributes": attributes}
        for name, run in (("sampling", lambda: measure_sampling(space, evaluators, render, true_vector, settings, report_dir)),
                          ("editing", lambda: measure_editing(space, evaluators, render, true_vector, attributes, settings, report_dir))):
            if name not in measure:
                continue
            t1 = time.perf_counter()
            log(f"scaling: N={n}: {name}")
            record[name] = run()
            seconds[name] = time.perf_counter() - t1
        if "inversion" in measure:
            t1 = time.perf_counter()
            log(f"scaling: N={n}: inversion")
            record["inversion"] = measure_inversion(space, store, base, evaluators, settings, report_dir, lora_fits=lora_fits)
            seconds["inversion"] = time.perf_counter() - t1
        evr = space.explained_variance_ratio
        record["weight_space"] = {
            "explained_variance_ratio": [float(v) for v in (evr if evr is not None else [])],
            "heldout_attribute_accuracy": heldout_attribute_accuracy(space, attributes),
        }
        seconds["total"] = time.perf_counter() - t0
        record["seconds"] = seconds
        doc["results"].append(record)
        doc["summary"].append(summarize(record, doc["fidelity"] or {}, dir_attrs, evr_k))
        log(f"scaling: N={n} done in {seconds['total']:.0f}s: " + ", ".join(
            f"{key} {v:.3f}" for key, v in doc["summary"][-1].items() if isinstance(v, float)))
        if on_update is not None:
            on_update(doc)
    return doc


# ---------------------------------------------------------------------- outputs
CURVES = (  # (panel title, [(summary key, label)])
    ("inversion: ID similarity", [("inversion_w2w", "w2w inversion"), ("inversion_lora", "single-image LoRA (no space)")]),
    ("editing (male, beard, eyeglasses, young)", [("edit_success", "success"), ("edit_id_similarity", "ID similarity")]),
    ("directions: held-out balanced accuracy", [("direction_accuracy", "mean over attributes")]),
    ("sampling", [("novel_fraction", "novel fraction"), ("validity_samples", "attribute confidence, samples"),
                  ("validity_real", "same, real images")]),
    ("explained variance", [("evr_first_k", "first K PCs (cumulative)")]),
    ("fidelity of the training models (not N-dependent)", [("fidelity", "fidelity"), ("fidelity_floor", "floor: base model"),
                                                            ("fidelity_ceiling", "ceiling: real images")]),
)


def write_plot(doc: dict, path: str | os.PathLike, others: list[tuple[str, dict]] = ()) -> None:
    """Each metric against N (log scale), one panel per measurement. `others`: (label, doc) of further runs
    (another permutation seed, another K), drawn in the same colours, dashed, dotted, dash-dotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def points(rows, key):
        return [r["n"] for r in rows if r.get(key) is not None], [r[key] for r in rows if r.get(key) is not None]

    rows = doc["summary"]
    ns = sorted({r["n"] for d in [doc, *(d for _, d in others)] for r in d["summary"]})
    fig = Figure(figsize=(13, 7))
    for p, (title, curves) in enumerate(CURVES):
        ax = fig.add_subplot(2, 3, p + 1)
        for key, label in curves:
            if key == "evr_first_k" and rows:
                label = f"first {rows[-1]['evr_k']} PCs (cumulative)"
            (line,) = ax.plot(*points(rows, key), marker="o", label=label)
            for o, (name, other) in enumerate(others):
                ax.plot(*points(other["summary"], key), marker="xs+"[o % 3], ls=("--", ":", "-.")[o % 3],
                        color=line.get_color(), alpha=0.7, label=f"{label}, {name}" if len(curves) == 1 else None)
        if key == "direction_accuracy":  # each attribute of the mean, thin
            for a in doc["direction_attributes"]:
                accs = [{"n": r["n"], a: r.get("direction_accuracy_per_attribute", {}).get(a)} for r in rows]
                ax.plot(*points(accs, a), lw=0.8, alpha=0.6, label=a)
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N (models in the space)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    dashed = "".join(f"; {style}: {name}" for style, (name, _) in zip(("dashed", "dotted", "dash-dotted") * 9, others))
    fig.suptitle(f"quality vs number of models: nested subsets of {doc['out']} ({doc['models_valid']} models, "
                 f"permutation seed {doc['seed']}, K = min({doc['components']}, N-1){dashed})", fontsize=11)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def table_markdown(doc: dict) -> str:
    """One row per N."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    k = doc["summary"][-1]["evr_k"] if doc["summary"] else doc["evr_k"]
    lines = [
        f"| N | K | inversion w2w | single-image LoRA | w2w / LoRA | edit success | edit ID sim | direction bal. acc. "
        f"| novel | confidence samples (real) | EV first {k} PCs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["summary"]:
        lines.append(f"| {r['n']} | {r['k']} | {fmt(r['inversion_w2w'])} | {fmt(r['inversion_lora'])} | {fmt(r['inversion_vs_lora'])} | "
                     f"{fmt(r['edit_success'])} | {fmt(r['edit_id_similarity'])} | {fmt(r['direction_accuracy'])} | "
                     f"{fmt(r['novel_fraction'])} | {fmt(r['validity_samples'])} ({fmt(r['validity_real'])}) | {fmt(r['evr_first_k'])} |")
    f = doc.get("fidelity") or {}
    if "fidelity" in f:
        lines += ["", f"Fidelity of the training models (measured once, independent of N): {f['fidelity']:.3f} "
                      f"(floor {f['floor']:.3f}, ceiling {f['ceiling']:.3f}, {f['identities']} models)."]
    elif f:
        lines += ["", f"Fidelity: {f.get('skipped', 'not measured')}"]
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, json_path=None, plot_path=None, table_path=None, others: list[tuple[str, dict]] = ()) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=1, default=float))
    if plot_path and doc["summary"]:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        write_plot(doc, plot_path, others)
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(table_markdown(doc))
