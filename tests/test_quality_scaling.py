"""benchmarks/quality_scaling.py's core (pipeline.eval.scaling) at two tiny N on a planted store: every
metric measured for each N, PCA fitted on the subset only, the store left untouched."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from subspace_helpers import planted_data, tiny_layout, write_store

METRICS = ("inversion_w2w", "inversion_lora", "inversion_vs_lora", "edit_success", "edit_id_similarity",
           "direction_accuracy", "novel_fraction", "validity_samples", "validity_real", "evr_first_k")


def test_nested_subsets_measured_and_fitted_on_the_subset(tmp_path):
    from pipeline.eval.settings import ReportSettings
    from pipeline.eval.scaling import nested_rows, run_scaling, write_outputs
    from pipeline.subspace.pca import guard_std

    out = tmp_path / "space"
    x, labels, _ = planted_data(40, tiny_layout().numel, rank=4, noise=0.2, seed=3)
    # balanced attributes, so the held-out accuracy of the directions has >= 20 of each class in the largest subset
    labels = {"male": (np.arange(40) % 2).astype(np.int8), "young": (np.arange(40) // 2 % 2).astype(np.int8)}
    write_store(out, x, labels, config={"model": {"path": "builtin:tiny"}, "train": {"prior_loss_weight": 0.0},
                                        "subspace": {"components": 8}})
    before = sorted(p.name for p in out.iterdir())
    settings = ReportSettings(sample_models=2, edit_models=2, invert_identities=1, invert_steps=2, render_steps=2,
                              fidelity_models=3, gated_edit_start=0.0)
    updates = []
    doc = run_scaling(out, [12, 40], tmp_path / "work", settings, seed=1, evr_k=3, log=lambda m: None,
                      on_update=lambda d: updates.append(len(d["summary"])), edit_components=5)
    assert updates == [1, 2]
    assert [r["n"] for r in doc["summary"]] == [12, 40] and [r["k"] for r in doc["summary"]] == [8, 8]
    assert doc["direction_attributes"] == ["male", "young"]
    for row in doc["summary"]:
        for key in METRICS:
            assert isinstance(row[key], float) and np.isfinite(row[key]), (row["n"], key, row[key])
    assert "skipped" in doc["fidelity"]  # the planted store has no identity images: said, not invented
    # The single-image LoRA baseline does not depend on the space: the same for every N.
    assert doc["summary"][0]["inversion_lora"] == doc["summary"][1]["inversion_lora"]

    # Explained variance comes from the subset's own PCA: first-K EVR of the standardised subset rows.
    order = nested_rows(np.arange(40), 1)
    evrs = []
    for row, record in zip(doc["summary"], doc["results"]):
        sub = x[order[: row["n"]]].astype(np.float64)
        std, _ = guard_std(sub.std(axis=0, ddof=1))
        z = (sub - sub.mean(axis=0)) / std
        s = np.linalg.svd(z, compute_uv=False)
        expected = (s[:3] ** 2).sum() / (s**2).sum()
        assert abs(row["evr_first_k"] - expected) < 1e-4, (row["n"], row["evr_first_k"], expected)
        evrs.append(row["evr_first_k"])
        pca = json.loads((tmp_path / "work" / f"n{row['n']}" / "subspace" / "pca.json").read_text())
        assert pca["n_models"] == row["n"]
        # directions (and samples) in the leading 5 PCs, as asked: a store built before subspace.edit_components
        directions = json.loads((tmp_path / "work" / f"n{row['n']}" / "subspace" / "directions.json").read_text())
        assert directions["edit_components"] == 5
        assert set(record["weight_space"]["heldout_attribute_accuracy"]) == {"male", "young"}
    assert abs(evrs[0] - evrs[1]) > 1e-3
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written into the build folder

    write_outputs(doc, tmp_path / "q.json", tmp_path / "q.png", tmp_path / "q.md")
    assert json.loads((tmp_path / "q.json").read_text())["summary"][1]["n"] == 40
    assert (tmp_path / "q.png").stat().st_size > 0
    rows = [line.split(" | ")[0] for line in (tmp_path / "q.md").read_text().splitlines() if line[:3] in ("| 1", "| 4")]
    assert rows == ["| 12", "| 40"]

    # Inversion alone (a GPU lease's cheap curve): sampling and editing are not run and read as None, not 0
    only = run_scaling(out, [40], tmp_path / "work_inv", settings, seed=1, evr_k=3, log=lambda m: None,
                       edit_components=5, measure=("inversion",))
    row, record = only["summary"][0], only["results"][0]
    assert "sampling" not in record and "editing" not in record and only["fidelity"] is None
    assert row["novel_fraction"] is None and row["edit_success"] is None and row["fidelity"] is None
    assert np.isfinite(row["inversion_w2w"]) and np.isfinite(row["direction_accuracy"])
    # the same subset, PCA, baseline and inversion as the full run's N = 40: the same numbers
    assert row["inversion_lora"] == doc["summary"][1]["inversion_lora"]
    assert abs(row["inversion_w2w"] - doc["summary"][1]["inversion_w2w"]) < 1e-6
    write_outputs(only, None, tmp_path / "inv.png", tmp_path / "inv.md")
    assert "| 40 | 8 |" in (tmp_path / "inv.md").read_text() and "n/a" in (tmp_path / "inv.md").read_text()


def test_local_build_needs_no_ray(tmp_path, monkeypatch):
    """quality_scaling --build: run_build(local=True) trains every shard in this process through ShardWorker,
    with `import ray` failing; a second run finds the build complete."""
    import sys

    from pipeline.builder.builder import run_build
    from pipeline.builder.store import WeightStore
    from pipeline.config import load_config
    from pipeline.data.synthfaces import write_identity_source

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    write_identity_source(tmp_path / "ids", 5, 2)
    conf = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
    cfg = load_config(conf, [f"data.source={tmp_path / 'ids'}", f"build.out={tmp_path / 'out'}", "train.steps=2",
                                         "build.rows_per_shard=2", "data.images_per_identity=2"])
    summary = run_build(cfg, progress_bar=False, log=lambda m: None, local=True)
    assert (summary.n_shards, summary.done_now, summary.failed, summary.workers) == (3, 3, {}, 1)
    store = WeightStore.open(str(tmp_path / "out"), mode="r")
    assert store.valid_rows().tolist() == [0, 1, 2, 3, 4]
    assert np.isfinite(np.asarray(store.array[:])).all()
    again = run_build(cfg, progress_bar=False, log=lambda m: None, local=True)
    assert (again.done_before, again.done_now) == (3, 0)


def test_cli_options_parse_and_refuse_bad_values(capsys):
    """benchmarks/quality_scaling.py's --measure and --edit-sweep: the subset and the strengths reach the run; a
    wrong name or number stops with a message that names the option."""
    import sys

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality_scaling

    args = quality_scaling.build_parser().parse_args(["out", "--ns", "8,4", "--measure", "inversion,editing",
                                                      "--edit-sweep", "3,4.5"])
    assert args.measure == ("inversion", "editing") and args.ns == [4, 8] and args.edit_sweep == (3.0, 4.5)
    assert quality_scaling.build_parser().parse_args(["out", "--ns", "8"]).edit_sweep == ()
    with pytest.raises(SystemExit):
        quality_scaling.build_parser().parse_args(["out", "--ns", "8", "--measure", "inversion,plotting"])
    assert "--measure takes a comma-separated subset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality_scaling.build_parser().parse_args(["out", "--ns", "8", "--edit-sweep", "3,x"])
    assert "--edit-sweep takes comma-separated numbers" in capsys.readouterr().err


def test_bad_inversion_settings_refused_before_any_work(tmp_path):
    """A report or curve with an unknown inversion schedule or a non-positive baseline lr would fail minutes in,
    at its inversion: both refuse it first, naming the setting, and write nothing."""
    import pytest

    from pipeline.eval.report import write_report
    from pipeline.eval.scaling import run_scaling
    from pipeline.eval.settings import ReportSettings

    for bad, match in [(dict(invert_lr_schedule="linear"), "invert_lr_schedule 'linear'.*constant, cosine"),
                       (dict(lora_baseline_lr_scale=0.0), "lora_baseline_lr_scale must be > 0")]:
        with pytest.raises(ValueError, match=match):
            write_report(tmp_path / "space", ReportSettings(**bad))
        with pytest.raises(ValueError, match=match):
            run_scaling(tmp_path / "space", [4], tmp_path / "work", ReportSettings(**bad), log=lambda m: None)
    assert not list(tmp_path.iterdir()), "a refused run left files behind"
