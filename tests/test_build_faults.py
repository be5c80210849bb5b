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

from _raycluster import RayCluster, assert_same_store_bytes, build_killing_a_worker, s3_server, serving, w2w

pytestmark = pytest.mark.slow

N_IDS, R = 12, 2  # 6 shards
S3_BUCKET = "w2w-test"


@pytest.fixture(scope="module")
def s3():
    """A local S3 API (moto server; see _raycluster.s3_server) for build.out=s3://... ; this process
    and the Ray cluster (so every actor) get its endpoint and credentials."""
    proc, env = s3_server(S3_BUCKET)
    with serving(proc, env):
        yield env


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
    # the build lease lives on the URL too: the finished driver released it, no heartbeat is live
    assert st["driver"]["state"] == "released" and st["driver"]["generation"] == 1 and not st["driver"]["alive"]
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


# ------------------------------------------------------------------ drivers: liveness, the lease, disk full
def _popen_build(cluster, source, out, *flags, **extra):
    import subprocess

    from _raycluster import VENV_BIN

    return subprocess.Popen([f"{VENV_BIN}/w2w", "build", "conf/tiny.yaml", *overrides(cluster, source, out, **extra),
                             "--no-progress", *flags], env=cluster.env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _status(cluster, out) -> dict:
    return json.loads(w2w("status", str(out), "--json", env=cluster.env, cwd=REPO).stdout)


def _markers(out) -> dict:
    from pipeline.builder.store import WeightStore

    return WeightStore.open(str(out), mode="r").markers()


def test_sigkill_driver_status_says_interrupted_then_resume(cluster, source, reference, tmp_path):
    """kill -9 of the `w2w build` driver mid-build: `status` says running while its heartbeat is
    fresh, then `[interrupted: driver on HOST pid N last seen T ago]` with the resume hint (never
    running with an ETA); `w2w resume` (no --takeover: the lease is stale) completes the build
    byte-identical to the uninterrupted reference."""
    import os
    import signal
    import socket

    from _raycluster import wait_for

    out = tmp_path / "store"
    from pipeline.builder.status import build_status

    proc = _popen_build(cluster, source, out, **{"build.synthetic_delay_s": 3.0, "build.heartbeat_s": 1,
                                                 "build.max_restarts": 0, "build.max_task_retries": 0})
    try:
        wait_for(lambda: (out / "shards").is_dir() and any((out / "shards").glob("*.json")) or proc.poll() is not None,
                 timeout=150)
        assert proc.poll() is None, proc.communicate()
        st = build_status(str(out))  # in-process: quick enough to catch the build mid-way
        assert st["state"] == "running" and st["driver"]["pid"] == proc.pid and st["driver"]["alive"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = wait_for(lambda: (lambda s: s if s["state"] != "running" else None)(_status(cluster, out)), timeout=60, interval=1)
    assert st["state"] == "interrupted" and st["shards"]["running"] == 0 and not st["driver"]["alive"]
    assert st["shards"]["done"] < st["shards"]["total"]
    text = w2w("status", str(out), env=cluster.env, cwd=REPO).stdout
    assert f"[interrupted: driver on {socket.gethostname()} pid {proc.pid} last seen " in text
    assert f"(not running: `w2w resume {out}`)" in text
    res = w2w("resume", str(out), "build.synthetic_delay_s=0", env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gone (stale heartbeat)" in res.stdout
    assert_same_store(out, reference)
    assert _status(cluster, out)["state"] == "complete"


def test_two_drivers_racing_one_builds_one_refuses(cluster, source, reference, tmp_path):
    """Two `w2w build` on the same OUT at once: exactly one builds; the other exits 3 with one line
    naming the holder (host, pid, age). Every marker comes from the winner's lease generation: no
    shard was trained by both."""
    import socket

    out = tmp_path / "store"
    procs = [_popen_build(cluster, source, out, **{"build.synthetic_delay_s": 0.3, "build.workers": 1})
             for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], results
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    err = results[loser][1].strip().splitlines()
    assert len(err) == 1 and "is being built by driver on " in err[0], results[loser]
    assert f"{socket.gethostname()} pid {procs[winner].pid}" in err[0] and "last seen" in err[0]
    assert "--takeover" in err[0]
    generations = {m.generation for m in _markers(out).values()}
    assert len(generations) == 1 and generations != {0}
    assert_same_store(out, reference)


def test_takeover_fences_the_superseded_drivers_workers(cluster, source, reference, tmp_path):
    """Driver A hangs (SIGSTOP) while its worker trains a shard; `w2w resume --takeover` (B) claims
    the lease and finishes the build. A's worker then ends its shard after B's claim and writes
    neither chunk nor marker for it (fenced by the lease generation); resumed, A exits 3 saying it
    was taken over. The store equals the reference."""
    import os
    import signal
    import time

    from _raycluster import wait_for
    from pipeline.builder.lease import current_claim

    out = tmp_path / "store"
    delay = 12.0  # A's shard outlasts B's start-up, so A's worker tries to write after B's claim

    def inflight():
        for p in sorted((out / "progress").glob("0*.json")) if (out / "progress").exists() else []:
            try:
                rec = json.loads(p.read_text())
            except (json.JSONDecodeError, FileNotFoundError):
                continue
            if rec.get("state") == "running" and not (out / "shards" / p.name).exists():
                return rec
        return None

    a = _popen_build(cluster, source, out, **{"build.synthetic_delay_s": delay, "build.workers": 1,
                                              "build.heartbeat_s": 1, "build.max_restarts": 0,
                                              "build.max_task_retries": 0})
    try:
        rec = wait_for(lambda: inflight() or a.poll() is not None, timeout=150)
        assert a.poll() is None, a.communicate()
        os.kill(a.pid, signal.SIGSTOP)
        gen_a = rec["generation"]
        b = w2w("resume", str(out), "build.synthetic_delay_s=0", "build.workers=1", "--takeover",
                env=cluster.env, cwd=REPO, timeout=240)
        assert b.returncode == 0, b.stdout + b.stderr
        assert "taking over the build lease from driver on" in b.stdout and f"pid {a.pid}" in b.stdout
        claim_b = current_claim(str(out))
        assert claim_b.generation > gen_a
        ends = rec["started_at"] + delay
        assert ends > claim_b.started_at + 1, "B claimed after A's shard ended: the machine was too slow to test the fence"
        time.sleep(max(0.0, ends + 3 - time.time()))  # A's worker has tried to write its shard by now
        markers = _markers(out)
        assert markers[rec["shard"]].generation == claim_b.generation, "A's fenced worker replaced B's marker"
        late = {s: m for s, m in markers.items() if m.generation == gen_a and m.finished_at >= claim_b.started_at}
        assert not late, f"the superseded driver's workers wrote markers after the takeover: {late}"
        assert_same_store(out, reference)
        os.kill(a.pid, signal.SIGCONT)
        _, a_err = a.communicate(timeout=120)
        assert a.returncode == 3, a_err
        assert "taken over by driver on" in a_err
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
    assert_same_store(out, reference)  # A, resumed, changed nothing
    assert _status(cluster, out)["state"] == "complete"


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real, small filesystem: a tmpfs mounted for this test (needs root / CAP_SYS_ADMIN; skipped
    where mounts are not allowed; the fsspec write-fault test in test_build_lease.py runs anywhere)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "w2wtest", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the fsspec write-fault test covers the code path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_tmpfs_then_resume(cluster, source, reference, small_tmpfs):
    """build.out on a 96 KiB tmpfs: the store's 6 chunks (~21 KB each) do not fit. The build exits 1;
    each failed shard names ENOSPC (driver output and `w2w status`) and has no marker; after the
    filesystem grows (remount: space freed) `w2w resume` completes to the reference's bytes."""
    import subprocess

    out = small_tmpfs / "store"
    res = build(cluster, source, out, **{"build.max_restarts": 0, "build.max_task_retries": 0})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "No space left on device" in res.stdout
    st = _status(cluster, out)
    markers = _markers(out)
    assert st["shards"]["done"] == len(markers) < N_IDS // R
    import re

    failed = {int(s) for s in re.findall(r"shard (\d+) failed: ", res.stdout)}
    assert failed and {int(s) for s in st["failed_shards"]} == failed  # every cause reached status
    assert all("No space left on device" in e for e in st["failed_shards"].values())
    assert not failed & set(markers) and st["shards"]["pending"] == 0
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    res = w2w("resume", str(out), env=cluster.env, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_store(out, reference)


def test_lease_on_s3_sees_another_processes_takeover(s3):
    """s3fs caches directory listings per (reused) filesystem instance: the fence check must still
    see a claim written by another process (here a takeover from a second Python process)."""
    import os
    import subprocess
    import sys

    from pipeline.builder.lease import BuildLease, LeaseLost, check_fence

    url = f"s3://{S3_BUCKET}/lease-cache/store"
    lease = BuildLease(url, heartbeat_s=600, log=lambda m: None).acquire()
    check_fence(url, lease.generation)  # lists the lease folder through this process's s3fs instance
    code = ("import sys; from pipeline.builder.lease import BuildLease; "
            "print(BuildLease(sys.argv[1], heartbeat_s=600, log=lambda m: None).acquire(takeover=True).generation)")
    taken = subprocess.run([sys.executable, "-c", code, url], env=dict(os.environ), capture_output=True, text=True,
                           timeout=120)
    assert taken.returncode == 0 and taken.stdout.strip() == str(lease.generation + 1), taken.stderr
    with pytest.raises(LeaseLost, match="taken over"):
        check_fence(url, lease.generation)
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
