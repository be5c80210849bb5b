"""The weight store, manifest, markers, progress files and class latents on fsspec URLs.

`memory://` lives in one process (Ray actors cannot share it), so this test drives the actors'
own code path in-process: `train_shard` + `WeightStore.write_shard` per shard, a shard left
half-written without its marker, the resume selection `shards_to_do`, then `build_status`.
The result must equal a local-disk build byte for byte. The Ray build on a `file://` URL (plus
`w2w status` / `w2w resume` on it) is in tests/test_build_faults.py.
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest

N_IDS, R = 10, 4  # shards of 4, 4, 2


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from pipeline.data.synthfaces import write_identity_source

    return write_identity_source(tmp_path_factory.mktemp("srcfs") / "identities", N_IDS, 2, seed=0)


def _cfg(source, out):
    from pipeline.builder.builder import absolutize
    from pipeline.config import load_config
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    return absolutize(load_config(repo / "conf/tiny.yaml", [
        f"data.source={source}", "data.images_per_identity=2", f"build.out={out}", "build.trainer=synthetic",
        "build.synthetic_layout=tiny", f"build.rows_per_shard={R}"]))


def _build(cfg, half_written: int | None = None):
    """What run_build's actors do, in this process. Optionally stop with one shard half-written."""
    from pipeline.builder.builder import plan_build, prepare_store
    from pipeline.builder.store import ShardMarker
    from pipeline.builder.worker import TrainerContext, train_shard

    from pipeline.builder.lease import BuildLease

    plan = plan_build(cfg)
    ctx = TrainerContext.create(cfg)
    # the driver's lease: a live heartbeat is what makes `status` say "running"
    BuildLease(cfg.build.out, heartbeat_s=60, log=lambda m: None).acquire()
    store = prepare_store(cfg, plan, {"layout": ctx.layout.to_json(), "fingerprint": ctx.fingerprint})
    store.write_progress("build", {"state": "running", "started_at": 0.0})

    def run(shard: int) -> None:
        ids = plan.shard_ids(shard)
        store.write_progress(f"{shard:06d}", {"state": "running", "shard": shard, "updated_at": 1e18})
        result = train_shard(ctx, ids)
        marker = ShardMarker(shard=shard, start=0, stop=0, checksum="", identities=ids, losses=result.losses,
                             quarantined=result.quarantined, worker="test")
        store.write_shard(shard, result.block, marker)
        store.clear_progress(f"{shard:06d}")

    for s in range(plan.n_shards):
        if s == half_written:
            start, _ = store.shard_rows(s)
            # the writer died between chunk and marker: some rows written, no marker
            store.array[start : start + 1] = train_shard(ctx, plan.shard_ids(s)).block[:1]
            continue
        run(s)
    return store, run


def _chunks(store) -> dict[int, bytes]:
    return {s: store.fs.cat_file(store.chunk_path(s)) for s in range(store.n_shards)}


def test_memory_url_build_resume_status_equals_local(source, tmp_path):
    from pipeline.builder.builder import shards_to_do
    from pipeline.builder.status import build_status
    from pipeline.builder.store import WeightStore

    local, _ = _build(_cfg(source, tmp_path / "local"))
    url = f"memory://w2w-test-{uuid.uuid4().hex[:8]}/store"
    try:
        mem, run = _build(_cfg(source, url), half_written=1)
        assert mem.out == url and WeightStore.exists(url)
        assert mem.fs.exists(mem.chunk_path(1)) and mem.marker(1) is None

        st = build_status(url)
        assert st["shards"] == {"total": 3, "done": 2, "running": 0, "failed": 0, "stale": 0, "pending": 1}
        assert st["identities"]["done"] == N_IDS - R and st["state"] == "running"

        reopened = WeightStore.open(url)
        assert shards_to_do(reopened) == [1]
        run(1)
        assert shards_to_do(WeightStore.open(url)) == []
        # a marker that no longer matches its chunk is dropped and the shard redone
        reopened.array[0:1] = np.zeros((1, reopened.numel), np.float32)
        assert shards_to_do(WeightStore.open(url)) == [0] and reopened.marker(0) is None
        run(0)
        reopened.write_progress("build", {"state": "finished", "started_at": 0.0})

        st = build_status(url)
        assert st["state"] == "complete" and st["shards"]["done"] == 3 and st["identities"]["valid"] == N_IDS
        mem = WeightStore.open(url, mode="r")
        assert _chunks(mem) == _chunks(local)
        lm, mm = local.markers(), mem.markers()
        assert {s: m.checksum for s, m in lm.items()} == {s: m.checksum for s, m in mm.items()}
        np.testing.assert_array_equal(np.asarray(mem.array[:]), np.asarray(local.array[:]))
        assert mem.manifest().equals(local.manifest())
        assert mem.valid_rows().tolist() == list(range(N_IDS))
    finally:
        import fsspec

        fs = fsspec.filesystem("memory")
        root = url.split("://", 1)[1].split("/")[0]
        if fs.exists(f"/{root}"):
            fs.rm(f"/{root}", recursive=True)


def test_class_latents_on_memory_url(tmp_path):
    """Real trainer context (tiny base): class latents written to and read back from a URL."""
    import torch

    from pipeline.builder.worker import TrainerContext
    from pipeline.config import load_config
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    url = f"memory://w2w-test-{uuid.uuid4().hex[:8]}/store/class_latents.safetensors"
    threads = torch.get_num_threads()
    try:
        cfg = load_config(repo / "conf/tiny.yaml", ["model.device=cpu", "train.prior_loss_weight=1", "train.num_class_images=2",
                                                    "train.class_image_steps=2"])
        ctx = TrainerContext.create(cfg)
        ctx.ensure_class_latents(url)
        first = ctx.class_latents
        ctx.class_latents = None
        ctx.ensure_class_latents(url)  # exists now: loaded, not regenerated
        assert torch.equal(ctx.class_latents, first) and first.shape[0] == 2
    finally:
        torch.set_num_threads(threads)
        import fsspec

        fs = fsspec.filesystem("memory")
        root = "/" + url.split("://", 1)[1].split("/")[0]
        if fs.exists(root):
            fs.rm(root, recursive=True)
