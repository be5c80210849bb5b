"""Out-of-core PCA (both methods) against in-memory SVD; valid rows; errors; directions math."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.subspace.pca import SubspaceError, compute_subspace
from subspace_helpers import planted_data, tiny_layout, write_store
from w2w_core import directions as D

N = 48
K = 6


def svd_reference(x):
    x = x.astype(np.float64)
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    return z, s, vt


@pytest.fixture(scope="module")
def data():
    return planted_data(N, tiny_layout().numel, rank=8, noise=0.2, seed=1)


@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_pca_matches_in_memory_svd(tmp_path, data, method):
    x, labels, _ = data
    write_store(tmp_path, x, labels, rows_per_shard=8)
    compute_subspace(str(tmp_path), K, method=method, block_rows=10, power_iterations=4, progress=None)
    t = load_file(str(tmp_path / "subspace" / "pca.safetensors"))
    meta = json.loads((tmp_path / "subspace" / "pca.json").read_text())
    assert (tmp_path / "subspace" / "explained_variance.png").stat().st_size > 1000
    z, s, vt = svd_reference(x)
    comps = t["components"].double().numpy()
    assert comps.shape == (K, x.shape[1])
    np.testing.assert_allclose(comps @ comps.T, np.eye(K), atol=1e-5)
    # principal angles between the subspaces ~ 0
    cos = np.linalg.svd(comps @ vt[:K].T, compute_uv=False)
    assert cos.min() > 1 - 1e-5
    np.testing.assert_allclose(t["singular_values"].double().numpy(), s[:K], rtol=1e-4)
    # per-component agreement including the sign convention (largest |entry| positive)
    ref = vt[:K] * np.sign(vt[:K][np.arange(K), np.abs(vt[:K]).argmax(1)])[:, None]
    np.testing.assert_allclose(comps, ref, atol=1e-4)
    np.testing.assert_allclose(t["coefficients"].double().numpy(), z @ comps.T, atol=1e-3)
    np.testing.assert_allclose(t["mean"].double().numpy(), x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["std"].double().numpy(), x.astype(np.float64).std(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(t["explained_variance_ratio"].double().numpy(), s[:K] ** 2 / (s**2).sum(), rtol=1e-4)
    assert meta["method"] == method and meta["n_models"] == N and meta["components"] == K
    assert len(meta["source_checksum"]) == 64 and "layout" in meta


def test_quarantined_and_unfinished_rows_are_ignored(tmp_path, data):
    x, labels, _ = data
    x = x.copy()
    x[5] = 1e6  # a quarantined outlier that would dominate PC 1
    finished = set(range(N // 8)) - {2}  # shard 2 (rows 16..23) unfinished: NaN in the array
    store = write_store(tmp_path, x, labels, rows_per_shard=8, finished=finished, quarantine={"id0005": "diverged"})
    rows = store.valid_rows()
    assert 5 not in rows and not any(16 <= r < 24 for r in rows)
    res = compute_subspace(str(tmp_path), K, method="gram", block_rows=7, progress=None)
    np.testing.assert_array_equal(res.rows, rows)
    _, s, vt = svd_reference(x[rows])
    assert np.all(np.isfinite(res.components))
    assert np.linalg.svd(res.components @ vt[:K].T, compute_uv=False).min() > 1 - 1e-5


def test_bad_k_and_missing_store(tmp_path, data):
    x, labels, _ = data
    write_store(tmp_path, x, labels)
    with pytest.raises(SubspaceError, match=r"K=48.*min\(N-1, D\).*47"):
        compute_subspace(str(tmp_path), N, progress=None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        compute_subspace(str(tmp_path / "nowhere"), 2, progress=None)


def test_gram_refused_before_streaming_when_its_matrices_cannot_fit():
    import dask.array as da

    from pipeline.subspace.pca import check_gram_memory, pca_of_array

    # a lazy 1,000,000-model array: the Gram route would need 5 x 8 TB; nothing may be computed
    x = da.full((1_000_000, 4), np.nan, chunks=(1000, 4))
    with pytest.raises(SubspaceError, match=r"needs about .* GiB for N=1000000.*--method randomized"):
        pca_of_array(x, np.arange(1_000_000), 2, method="gram")
    with pytest.raises(SubspaceError, match="0.0 GiB of memory is available"):
        check_gram_memory(100, available=4096)
    check_gram_memory(100, available=5 * 100 * 100 * 8)  # exactly enough: accepted


@pytest.mark.parametrize("method,pass_name", [("gram", "components pass"), ("randomized", "coefficients pass")])
def test_long_passes_show_progress_on_stderr(tmp_path, data, capfd, monkeypatch, method, pass_name):
    """At scale each pass takes minutes: with progress on, dask's bar and the block passes' tqdm
    bar go to stderr (shown after PROGRESS_BAR_AFTER_S, set to 0 here); quiet runs print nothing."""
    import pipeline.subspace.pca as pca

    x, labels, _ = data
    write_store(tmp_path, x, labels)
    monkeypatch.setattr(pca, "PROGRESS_BAR_AFTER_S", 0.0)
    messages = []
    compute_subspace(str(tmp_path), 3, method=method, block_rows=8, progress=messages.append)
    err = capfd.readouterr().err
    assert "Completed" in err  # dask.diagnostics.ProgressBar of the statistics pass (and the sketch)
    assert f"pca: {pass_name}" in err and f"{N}/{N}" in err
    assert any("statistics done" in m for m in messages)
    compute_subspace(str(tmp_path), 3, method=method, block_rows=8, progress=None)
    assert capfd.readouterr().err == ""


def test_zero_std_dimension_is_guarded(tmp_path, data):
    x, labels, _ = data
    x = x.copy()
    x[:, 7] = 3.0
    write_store(tmp_path, x, labels)
    res = compute_subspace(str(tmp_path), 3, method="randomized", progress=None)
    assert res.std[7] == 1.0 and res.zero_std_dims == 1
    assert np.all(np.isfinite(res.components)) and abs(res.components[:, 7]).max() < 1e-8


def test_cli_pca_and_directions(tmp_path, data, capsys):
    from jobs.cli import main

    x, labels, _ = data
    write_store(tmp_path, x, labels)

    def run(*a):
        rc = main(list(a))
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = run("pca", str(tmp_path), "--components", "99")
    assert rc == 2 and "K=99" in err and "47" in err
    rc, out, err = run("pca", str(tmp_path), "-k", "5", "--method", "randomized")
    assert rc == 0, err
    assert "statistics" in err and "K=5" in out
    rc, out, err = run("directions", str(tmp_path), "--disentangle", "beard:male")
    assert rc == 0, err
    meta = json.loads((tmp_path / "subspace" / "directions.json").read_text())
    assert meta["attributes"]["beard"]["debiased_against"] == ["male"]
    rc, out, err = run("directions", str(tmp_path), "--disentangle", "beard:hat", "--force")
    assert rc == 2 and "hat" in err and "male" in err


def test_directions_and_sampling_in_the_leading_pcs_inversion_in_all(tmp_path, data, capsys):
    """subspace.edit_components / `w2w directions --components`: directions are fitted on the leading PCs
    only (zero beyond, so an edit never moves the PCs only inversion uses), sampling draws in the same PCs,
    and a space of more PCs gives the same directions as a space of just those."""
    from jobs.cli import main
    from w2w_core.space import WeightSpace

    x, labels, _ = data
    small, large = tmp_path / "small", tmp_path / "large"
    for out, k in ((small, 4), (large, 12)):
        write_store(out, x, labels)
        assert main(["pca", str(out), "-k", str(k)]) == 0
    assert main(["directions", str(small)]) == 0 and main(["directions", str(large), "--components", "4"]) == 0
    a, b = WeightSpace.load(small), WeightSpace.load(large)
    assert (a.k, a.edit_k, b.k, b.edit_k) == (4, 4, 12, 4)
    assert json.loads((large / "subspace" / "directions.json").read_text())["edit_components"] == 4
    for name in a.directions:
        assert (b.directions[name][4:] == 0).all()
        np.testing.assert_allclose(b.directions[name][:4], a.directions[name], atol=1e-5)
        assert b.strengths[name] == pytest.approx(a.strengths[name], rel=1e-4)
    sample = b.project(b.sample(3, seed=1))
    np.testing.assert_allclose(sample[:, 4:], b.coef_mean[4:].expand(3, -1), atol=1e-3)  # only the leading PCs drawn
    assert (sample[:, :4] - b.coef_mean[:4]).abs().min() > 0
    probe = b.sample(1, seed=2)[0]  # neighbours are found in the same leading PCs
    assert [n for n, _ in b.nearest(probe, 3)] == [n for n, _ in a.nearest(probe, 3)]
    capsys.readouterr()
    assert main(["directions", str(large), "--components", "13", "--force"]) == 2
    assert "--components 13 is out of range" in capsys.readouterr().err


# ---------------------------------------------------------------------- directions math
def test_direction_recovers_planted_direction():
    rng = np.random.default_rng(0)
    n, k = 2000, 10
    c = rng.normal(size=(n, k)) * np.linspace(3, 0.5, k)
    planted = rng.normal(size=k)
    planted /= np.linalg.norm(planted)
    # labels from a linear score: the Bayes direction is planted (in the whitened sense for lstsq,
    # so use isotropic coefficients for an exact check)
    c_iso = rng.normal(size=(n, k))
    y = (c_iso @ planted + 0.2 * rng.normal(size=n) > 0).astype(float)
    for method in ("lstsq", "logistic"):
        d = D.fit_direction(c_iso, y, method)
        assert d @ planted > 0.98, method
    assert abs(np.linalg.norm(D.fit_lstsq(c, (c @ planted > 0).astype(float))) - 1) < 1e-12


def test_debias_makes_directions_orthogonal_and_strength_is_spread():
    rng = np.random.default_rng(1)
    k = 8
    male = rng.normal(size=k)
    beard = male + 0.5 * rng.normal(size=k)  # correlated like the real attributes
    young = rng.normal(size=k)
    out = D.debias({"male": male, "beard": beard, "young": young}, D.parse_disentangle(["beard:male,young"]))
    assert abs(out["beard"] @ out["male"]) < 1e-12 and abs(out["beard"] @ out["young"]) < 1e-12
    assert abs(np.linalg.norm(out["beard"]) - 1) < 1e-12
    np.testing.assert_allclose(out["male"], male / np.linalg.norm(male))
    c = rng.normal(size=(500, k)) * 2.0
    assert abs(D.calibrated_strength(c, out["young"]) - 2.0) < 0.2
    with pytest.raises(ValueError, match="target:other"):
        D.parse_disentangle(["beard"])


def test_fit_all_default_debias_set():
    from pipeline.subspace.directions import fit_all

    rng = np.random.default_rng(2)
    c = rng.normal(size=(400, 6))
    labels = {"male": (c[:, 0] > 0), "beard": (c[:, 0] + c[:, 1] > 0), "young": (c[:, 2] > 0)}
    dirs, raw, strengths, info = fit_all(c, labels, debias_against=["male"])
    assert abs(dirs["beard"] @ dirs["male"]) < 1e-10 and abs(dirs["young"] @ dirs["male"]) < 1e-10
    assert raw["beard"] @ raw["male"] > 0.5
    assert info["male"]["debiased_against"] == [] and info["beard"]["debiased_against"] == ["male"]
    assert all(s > 0 for s in strengths.values())
    assert torch is not None


def test_non_finite_valid_rows_are_reported(tmp_path, data):
    x, labels, _ = data
    x = x.copy()
    x[3, 10] = np.nan  # finished shard, not quarantined
    write_store(tmp_path, x, labels)
    with pytest.raises(SubspaceError, match="non-finite"):
        compute_subspace(str(tmp_path), 3, progress=None)
