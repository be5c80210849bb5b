"""Fault tests of the Ray builder with the REAL batched trainer and the tiny base (builtin:tiny).

Real `ray start` cluster (token auth), real Zarr, the committed tiny model, a few steps. A worker
is SIGKILLed mid-build, `w2w resume` finishes the build, and the store must equal, byte for byte,
an uninterrupted build of the same config. One identity has a corrupt image and is quarantined.

Byte equality across processes needs a fixed torch thread count per worker: the same shard
trained with 1 and with 2 threads differs in the last bits (reduction order), so every actor
pins `torch.set_num_threads(build.cpus_per_worker)` (pipeline.build.worker.pin_torch_threads).
`test_trainer_is_deterministic_across_processes` checks it: the pytest process re-trains shard 0
and gets the actor's bytes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _raycluster import VENV_BIN, RayCluster, w2w, wait_for

pytestmark = pytest.mark.slow
REPO = str(Path(__file__).resolve().parents[1])
N_IDS, IMAGES, R = 10, 3, 4  # shards of 4, 4, 2 identities
BAD = 5  # row of the identity with a corrupt image (shard 1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RayCluster(tmp_path_factory.mktemp("rayreal"))
    c.env["OMP_NUM_THREADS"] = "1"
    yield c
    c.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from pipeline.data.synthfaces import write_identity_source

    root = tmp_path_factory.mktemp("srcreal") / "identities"
    write_identity_source(root, N_IDS, IMAGES, seed=0)
    bad = sorted(p for p in root.iterdir() if p.is_dir())[BAD]
    sorted(bad.iterdir())[0].write_bytes(b"not an image at all")
    return root


def overrides(cluster, source, out, **extra) -> list[str]:
    kv = {
        "data.source": str(source), "data.images_per_identity": IMAGES, "build.out": str(out),
        "build.trainer": "batched", "model.device": "cpu", "train.steps": 3, "train.num_class_images": 4,
        "train.class_image_steps": 2, "build.rows_per_shard": R, "build.workers": 2,
        "build.ray_address": cluster.address,
    }
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="module")
def reference(cluster, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("refreal") / "store"
    res = w2w("build", "conf/tiny.yaml", *overrides(cluster, source, out), "--no-progress",
              env=cluster.env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def store_bytes(out: Path) -> dict:
    from pipeline.build.store import WeightStore

    store = WeightStore.open(str(out), mode="r")
    markers = store.markers()
    assert sorted(markers) == list(range(store.n_shards))
    chunks = {s: (Path(store.chunk_path(s)).read_bytes(), markers[s].checksum, markers[s].quarantined,
                  markers[s].losses) for s in markers}
    return {"chunks": chunks, "class_latents": Path(store.class_latents_path).read_bytes(),
            "manifest": store.manifest()}


def running_worker_pid(out: Path):
    prog = out / "progress"
    for p in sorted(prog.glob("0*.json")) if prog.exists() else []:
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if rec.get("state") == "running" and not (out / "shards" / p.name).exists():
            return rec["pid"]
    return None


def test_real_build_quarantines_corrupt_image(reference):
    from pipeline.build.store import WeightStore

    store = WeightStore.open(str(reference), mode="r")
    bad = store.manifest().column("identity").to_pylist()[BAD]
    q = store.quarantined()
    assert list(q) == [bad] and "unreadable data" in q[bad]
    x = np.asarray(store.array[:])
    assert np.isnan(x[BAD]).all()
    good = [r for r in range(N_IDS) if r != BAD]
    assert np.isfinite(x[good]).all() and (np.abs(x[good]).sum(axis=1) > 0).all()
    assert store.valid_rows().tolist() == good
    assert store.layout.numel == store.numel and store.done_shards(verify=True) == {0, 1, 2}


def test_trainer_is_deterministic_across_processes(cluster, source, reference):
    """This process (not a Ray actor) re-trains shard 0 with the same config: identical bytes."""
    import torch

    from pipeline.build.builder import plan_build
    from pipeline.build.store import WeightStore, chunk_checksum
    from pipeline.build.worker import TrainerContext, train_shard
    from pipeline.config import load_config

    threads = torch.get_num_threads()
    try:
        cfg = load_config(Path(REPO) / "conf/tiny.yaml", overrides(cluster, source, reference))
        ctx = TrainerContext.create(cfg)
        assert torch.get_num_threads() == 1  # pinned to build.cpus_per_worker
        store = WeightStore.open(str(reference), mode="r")
        ctx.ensure_class_latents(store.class_latents_path)  # the build's, generated by an actor
        got = train_shard(ctx, plan_build(cfg).shard_ids(0)).block
    finally:
        torch.set_num_threads(threads)
    assert chunk_checksum(got) == store.markers()[0].checksum
    np.testing.assert_array_equal(got, store.read_shard(0))


def test_sigkill_real_worker_then_resume_is_byte_identical(cluster, source, reference, tmp_path):
    out = tmp_path / "store"
    # synthetic_delay_s (execution-only) holds each shard a few seconds so the kill lands mid-shard
    cmd = [f"{VENV_BIN}/w2w", "build", "conf/tiny.yaml",
           *overrides(cluster, source, out, **{"build.synthetic_delay_s": 3, "build.max_restarts": 0,
                                               "build.max_task_retries": 0}), "--no-progress"]
    proc = subprocess.Popen(cmd, env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: running_worker_pid(out) or proc.poll() is not None, timeout=180)
        assert proc.poll() is None, proc.communicate()
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stdout + stderr
    st = json.loads(w2w("status", str(out), "--json", env=cluster.env, cwd=REPO).stdout)
    assert st["shards"]["done"] < st["shards"]["total"]
    res = w2w("resume", str(out), "build.synthetic_delay_s=0", env=cluster.env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    got, want = store_bytes(out), store_bytes(reference)
    assert got["class_latents"] == want["class_latents"]
    assert got["manifest"].equals(want["manifest"])
    assert got["chunks"].keys() == want["chunks"].keys()
    for s in want["chunks"]:
        assert got["chunks"][s][1] == want["chunks"][s][1], f"shard {s} checksum differs"
        assert got["chunks"][s][0] == want["chunks"][s][0], f"shard {s} chunk bytes differ"
        assert got["chunks"][s][2:] == want["chunks"][s][2:], f"shard {s} quarantine/losses differ"
