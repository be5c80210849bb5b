"""Fault tests of the Ray builder: real Ray cluster (token auth), real Zarr, synthetic trainer
(the real batched trainer: tests/test_build_real.py).

The synthetic trainer's `build.synthetic_delay_s` makes shards slow enough to kill a worker
mid-build. Every store is compared byte for byte (chunk files + marker checksums) with an
uninterrupted reference build of the same config.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config

from _raycluster import RayCluster, assert_same_store_bytes, build_killing_a_worker, s3_server, w2w

pytestmark = pytest.mark.slow

N_IDS, R = 12, 2  # 6 shards
S3_BUCKET = "w2w-test"


@pytest.fixture(scope="module")
def s3():
    """A local S3 API (moto server; see _raycluster.s3_server) for build.out=s3://... ; this process
    and the Ray cluster (so every actor) get its endpoint and credentials."""
    proc, env = s3_server(S3_BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    c = RayCluster(tmp_path_factory.mktemp("ray"), extra_env=s3)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from pipeline.data.synthfaces import write_identity_source

    root = tmp_path_factory.mktemp("src") / "identities"
    write_identity_source(root, N_IDS, 2, seed=0)
    return root


def overrides(cluster, source, out, **extra):
    base = {
        "data.source": str(source), "data.images_per_identity": 2, "build.out": str(out),
        "build.trainer": "synthetic", "build.synthetic_layout": "tiny", "build.rows_per_shard": R,
        "build.workers": 2, "build.ray_address": cluster.address,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def build(cluster, source, out, *flags, **extra):
    return w2w("build", "conf/tiny.yaml", *overrides(cluster, source, out, **extra), "--no-progress", *flags,
               env=cluster.env, cwd=REPO)


REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def reference(cluster, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    res = build(cluster, source, out)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def assert_same_store(out, ref) -> None:
    from pipeline.builder.store import WeightStore
    from pipeline.builder.worker import synthetic_vector

    assert_same_store_bytes(out, ref)
    store = WeightStore.open(str(out), mode="r")
    # zero missing and zero duplicate rows: every row holds exactly its own identity's vector
    ids = store.manifest().column("identity").to_pylist()
    x = np.asarray(store.array[:])
    assert sorted(store.manifest().column("row").to_pylist()) == list(range(len(ids)))
    for row, ident in enumerate(ids):
        np.testing.assert_array_equal(x[row], synthetic_vector(ident, store.numel, 0))


def test_reference_build_and_config_refusal(cluster, source, reference):
    st = w2w("status", str(reference), "--json", env=cluster.env, cwd=REPO)
    data = json.loads(st.stdout)
    assert data["shards"]["done"] == data["shards"]["total"] == N_IDS // R
    assert data["identities"]["valid"] == N_IDS
    again = build(cluster, source, reference)
    assert again.returncode == 0 and "already complete" in again.stdout
    changed = build(cluster, source, reference, **{"train.steps": 7})
    assert changed.returncode == 2
    steps = load_config("conf/tiny.yaml").train.steps
    assert "different configuration" in changed.stderr
    assert f"build_key.train.steps: store has {steps}, requested 7" in changed.stderr
    res = w2w("resume", str(reference), env=cluster.env, cwd=REPO)
    assert res.returncode == 0 and "nothing to do" in res.stdout


def test_sigkill_worker_then_resume(cluster, source, reference, tmp_path):
    out = tmp_path / "store"
    args = ["conf/tiny.yaml", *overrides(cluster, source, out, **{"build.synthetic_delay_s": 1.5, "build.max_restarts": 0,
                                                                  "build.max_task_retries": 0}), "--no-progress"]
    code, stdout, stderr = build_killing_a_worker(args, out, cluster.env, REPO, timeout=120)
    assert code == 1, stdout + stderr
    assert "failed" in stdout and "w2w resume" in stdout
    st = json.loads(w2w("status", str(out), "--json", env=cluster.env, cwd=REPO).stdout)
    assert st["shards"]["done"] < st["shards"]["total"]
    assert st["shards"]["failed"] + st["shards"]["pending"] + st["shards"]["stale"] >= 1
    res = w2w("resume", str(out), "build.synthetic_delay_s=0", env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_store(out, reference)


def test_sigkill_worker_ray_restarts_it(cluster, source, reference, tmp_path):
    out = tmp_path / "store"
    args = ["conf/tiny.yaml", *overrides(cluster, source, out, **{"build.synthetic_delay_s": 1.0, "build.max_restarts": 2,
                                                                  "build.max_task_retries": 2}), "--no-progress"]
    code, stdout, stderr = build_killing_a_worker(args, out, cluster.env, REPO, timeout=150)
    assert code == 0, stdout + stderr
    assert_same_store(out, reference)


def test_partial_chunk_and_bad_marker_are_redone(cluster, reference, tmp_path):
    from pipeline.builder.store import WeightStore

    out = tmp_path / "store"
    shutil.copytree(reference, out)
    store = WeightStore.open(str(out))
    # shard 1: chunk half written, no marker (a writer died between chunk and marker)
    store.clear_marker(1)
    store.array[2:3] = np.zeros((1, store.numel), np.float32)
    # shard 2: marker present but the chunk no longer matches its checksum
    store.array[4:6] = np.ones((2, store.numel), np.float32)
    res = w2w("resume", str(out), env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 to do" in res.stdout
    assert_same_store(out, reference)


def test_corrupt_identity_is_quarantined(cluster, source, tmp_path):
    from pipeline.builder.store import WeightStore

    src = tmp_path / "identities"
    shutil.copytree(source, src)
    bad = sorted(p.name for p in src.iterdir() if p.is_dir())[3]
    first = sorted((src / bad).iterdir())[0]
    first.write_bytes(b"this is not a png")
    out = tmp_path / "store"
    res = build(cluster, src, out)
    assert res.returncode == 0, res.stdout + res.stderr
    store = WeightStore.open(str(out), mode="r")
    q = store.quarantined()
    assert list(q) == [bad] and first.name in q[bad]
    assert np.isnan(np.asarray(store.array[3])).all()
    assert 3 not in store.valid_rows().tolist() and len(store.valid_rows()) == N_IDS - 1
    st = json.loads(w2w("status", str(out), "--json", env=cluster.env, cwd=REPO).stdout)
    assert st["identities"]["quarantined"] == 1 and st["state"] == "complete"


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_url_build_status_resume(cluster, source, reference, tmp_path, scheme):
    """build.out as an fsspec URL (file:///abs/path, or s3:// on the local S3 API): build, status,
    resume, pca and WeightSpace.load all take the URL, and the store equals the local-disk build
    byte for byte."""
    import dask.array as da

    from pipeline.builder.store import WeightStore
    from pipeline.subspace.pca import pca_of_array
    from w2w_core import WeightSpace

    url = (tmp_path / "store").as_uri() if scheme == "file" else f"s3://{S3_BUCKET}/{tmp_path.name}/store"
    res = build(cluster, source, url)
    assert res.returncode == 0, res.stdout + res.stderr
    store = WeightStore.open(url)
    assert store.attrs["config"]["build"]["out"] == url  # kept as given, not turned into a local path
    # shard 4: the writer died between chunk and marker
    store.clear_marker(4)
    store.array[8:9] = np.zeros((1, store.numel), np.float32)
    st = json.loads(w2w("status", url, "--json", env=cluster.env, cwd=REPO).stdout)
    assert st["out"] == url and st["shards"]["done"] == N_IDS // R - 1 and st["state"] != "complete"
    res = w2w("resume", url, env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 to do" in res.stdout
    assert json.loads(w2w("status", url, "--json", env=cluster.env, cwd=REPO).stdout)["state"] == "complete"
    assert_same_store(url, reference)
    # the subspace stage and the researcher's API take the same URL
    res = w2w("pca", url, "--components", "3", env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    space = WeightSpace.load(url)
    ref = pca_of_array(da.from_zarr(WeightStore.open(str(reference)).weights_url, component="weights"),
                       np.arange(N_IDS), 3, method="gram")
    np.testing.assert_allclose(space.components.numpy(), ref.components, atol=1e-5)
    assert space.identities == WeightStore.open(str(reference)).manifest().column("identity").to_pylist()
