"""The build lease and write faults, in one process (issue 17 items 2 and 3; the real-process tests
with a Ray cluster, SIGKILL/SIGSTOP of drivers and two racing `w2w build` are in
tests/test_build_faults.py).

Real files (a local directory, and `memory://` where it says so), real threads racing for the
lease. The write-fault test uses an fsspec filesystem (`faulty://`, a MemoryFileSystem whose
writes fail on demand) because it must run anywhere; the same fault on a real, full filesystem
(a tmpfs mounted for the test) is `test_build_faults.py::test_disk_full_on_tmpfs_then_resume`.
"""
from __future__ import annotations

import errno
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.builder.lease import BuildLease, LeaseError, LeaseLost, check_fence, current_claim, read_claims

REPO = Path(__file__).resolve().parents[1]


def _lease(out, **kw) -> BuildLease:
    return BuildLease(str(out), log=lambda m: None, **kw)


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_second_driver_refused_takeover_fences_first(tmp_path, scheme):
    out = str(tmp_path / "store") if scheme == "local" else f"memory://lease-{uuid.uuid4().hex[:8]}/store"
    first = _lease(out, heartbeat_s=0.2).acquire()
    try:
        assert first.generation == 1 and current_claim(out).won
        with pytest.raises(LeaseError) as err:
            _lease(out).acquire()
        msg = str(err.value)
        assert f"pid {first.claim.pid}" in msg and first.claim.host in msg and "last seen" in msg and "--takeover" in msg
        time.sleep(0.5)  # the heartbeat moves on
        assert current_claim(out).updated_at > first.claim.started_at

        second = _lease(out, heartbeat_s=0.2).acquire(takeover=True)
        assert second.generation == 2
        check_fence(out, 2)
        with pytest.raises(LeaseLost, match="taken over by driver on"):
            check_fence(out, 1)
        time.sleep(0.6)  # the first driver's heartbeat thread notices the newer generation
        assert first.lost and "generation 1" in first.lost
        with pytest.raises(LeaseLost):
            first.check()
        first.release()  # a superseded driver does not release (or rewrite) the newer claim
        assert current_claim(out).generation == 2 and current_claim(out).state == "running"
        second.release()
        claim = current_claim(out)
        assert claim.generation == 2 and claim.state == "released"
        # released: the next driver proceeds without --takeover, one generation up
        third = _lease(out).acquire()
        assert third.generation == 3
        third.release()
        assert [c.generation for c in read_claims(out)] == [3]  # older claims pruned, newest kept
    finally:
        first.release()


def test_stale_heartbeat_lets_the_next_driver_proceed(tmp_path):
    out = str(tmp_path / "store")
    dead = _lease(out, heartbeat_s=0.1).acquire()
    dead._stop.set()  # the driver "dies": no more heartbeats, no release
    dead.claim.updated_at -= 3600
    dead._write()
    assert not current_claim(out).fresh()
    said = []
    nxt = BuildLease(out, log=said.append).acquire()
    assert nxt.generation == 2 and any("is gone (stale heartbeat)" in s for s in said)
    nxt.release()


def test_racing_drivers_exactly_one_wins(tmp_path):
    """16 threads claim the same lease at once (real files): exactly one holds it, the rest are
    refused naming it; repeated to give the race a chance."""
    for round_ in range(3):
        out = str(tmp_path / f"store{round_}")
        barrier = threading.Barrier(16)
        won, refused = [], []

        def contend():
            lease = _lease(out, heartbeat_s=30)
            barrier.wait()
            try:
                won.append(lease.acquire())
            except LeaseError as err:
                refused.append(str(err))

        threads = [threading.Thread(target=contend) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"{len(won)} drivers hold the lease at once"
        assert len(refused) == 15 and all("is being built by" in r or "could not acquire" in r for r in refused)
        assert current_claim(out).nonce == won[0].claim.nonce
        won[0].release()


# ------------------------------------------------------------------------------ write faults
class _Faults:
    """Which writes fail: path substring -> (errno, message)."""
    rules: dict[str, tuple[int, str]] = {}


def _faulty_fs():
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FaultyFS(MemoryFileSystem):
        """memory:// whose writes to paths matching a rule raise OSError, like a full disk or an
        object store answering 503: what `WeightStore` sees from any fsspec backend."""
        protocol = "faulty"

        def _open(self, path, mode="rb", *args, **kwargs):
            if any(c in mode for c in "wa"):
                for pattern, (code, text) in _Faults.rules.items():
                    if pattern in path:
                        raise OSError(code, f"{text}: {path}")
            return super()._open(path, mode, *args, **kwargs)

    fsspec.register_implementation("faulty", FaultyFS, clobber=True)
    return FaultyFS


@pytest.fixture()
def source(tmp_path_factory):
    from pipeline.data.synthfaces import write_identity_source

    return write_identity_source(tmp_path_factory.mktemp("srcwf") / "identities", 8, 2, seed=0)


def _cfg(source, out):
    from pipeline.builder.builder import absolutize
    from pipeline.config import load_config

    return absolutize(load_config(REPO / "conf/tiny.yaml", [
        f"data.source={source}", "data.images_per_identity=2", f"build.out={out}", "build.trainer=synthetic",
        "build.synthetic_layout=tiny", "build.rows_per_shard=2"]))


def _driver(cfg):
    """What run_build does before dispatching, in this process: plan, lease, store, one worker."""
    from pipeline.builder.builder import ShardWorker, plan_build, prepare_store
    from pipeline.config import to_dict

    plan = plan_build(cfg)
    lease = _lease(cfg.build.out, heartbeat_s=60).acquire()
    worker = ShardWorker(to_dict(cfg), cfg.build.out, "w0")
    store = prepare_store(cfg, plan, worker.describe())
    return plan, lease, worker, store


def test_write_faults_fail_the_shard_without_marker_then_resume(source, tmp_path):
    """A chunk write failing with ENOSPC and a marker write failing with an object-store error:
    each fails its shard with the cause in `status`, leaves no marker (and no torn chunk), and
    the resumed shards give the same bytes as a build that never failed."""
    from pipeline.builder.builder import shards_to_do
    from pipeline.builder.status import build_status
    from pipeline.builder.store import WeightStore

    _faulty_fs()
    ref_plan, ref_lease, ref_worker, ref = _driver(_cfg(source, tmp_path / "ref"))
    for s in range(ref_plan.n_shards):
        ref_worker.run_shard(s, ref_plan.shard_ids(s), 0, ref_lease.generation)

    url = f"faulty://wf-{uuid.uuid4().hex[:8]}/store"
    plan, lease, worker, store = _driver(_cfg(source, url))
    codes = {1: errno.ENOSPC, 2: errno.EIO, 3: errno.EACCES}
    _Faults.rules = {"weights/c/1/": (errno.ENOSPC, "No space left on device"),
                     "shards/000002.json.partial": (errno.EIO, "object store answered 503 SlowDown"),
                     "weights/c/3/": (errno.EACCES, "Permission denied")}
    try:
        for s in range(plan.n_shards):
            if s in codes:
                with pytest.raises(OSError) as err:
                    worker.run_shard(s, plan.shard_ids(s), 0, lease.generation)
                assert err.value.errno == codes[s]
            else:
                worker.run_shard(s, plan.shard_ids(s), 0, lease.generation)
    finally:
        _Faults.rules = {}
    assert all(store.marker(s) is None for s in codes)
    assert not store.fs.exists(store.chunk_path(1)) and not store.fs.exists(store.marker_path(2) + ".partial")
    st = build_status(url)
    assert st["shards"]["done"] == plan.n_shards - 3 and st["shards"]["failed"] == 3
    assert "No space left on device" in st["failed_shards"]["1"] and "503" in st["failed_shards"]["2"]
    assert "Permission denied" in st["failed_shards"]["3"]
    assert shards_to_do(WeightStore.open(url)) == [1, 2, 3]
    for s in codes:  # space freed / the store answers again / permission fixed: resume
        worker.run_shard(s, plan.shard_ids(s), 0, lease.generation)
    assert shards_to_do(WeightStore.open(url)) == []
    got = WeightStore.open(url, mode="r")
    for s in range(plan.n_shards):
        assert got.fs.cat_file(got.chunk_path(s)) == ref.fs.cat_file(ref.chunk_path(s)), f"shard {s} differs"
        assert got.marker(s).checksum == ref.marker(s).checksum
    assert build_status(url)["shards"]["failed"] == 0
    lease.release()
    ref_lease.release()


def test_superseded_worker_writes_neither_chunk_nor_marker(source, tmp_path):
    from pipeline.builder.worker import synthetic_vector

    plan, lease, worker, store = _driver(_cfg(source, tmp_path / "store"))
    newer = _lease(tmp_path / "store", heartbeat_s=60).acquire(takeover=True)
    with pytest.raises(LeaseLost, match="fenced"):
        worker.run_shard(0, plan.shard_ids(0), 0, lease.generation)
    assert store.marker(0) is None and not store.fs.exists(store.chunk_path(0))
    marker = worker.run_shard(0, plan.shard_ids(0), 0, newer.generation)
    assert marker["shard"] == 0 and store.marker(0).generation == newer.generation
    np.testing.assert_array_equal(store.read_shard(0)[0], synthetic_vector(plan.ids[0], store.numel, 0))
    newer.release()


def test_store_from_before_new_config_keys_is_the_same_build(source, tmp_path):
    """A store whose build_key predates data.follow_symlinks / data.max_image_pixels resumes while
    those keep their defaults, and is refused (naming the key) when one is changed."""
    from pipeline.builder.builder import _build_key_for, plan_build, prepare_store
    from pipeline.builder.store import StoreError, WeightStore
    from pipeline.builder.worker import TrainerContext

    cfg = _cfg(source, tmp_path / "store")
    ctx = TrainerContext.create(cfg)
    store = prepare_store(cfg, plan_build(cfg), {"layout": ctx.layout.to_json(), "fingerprint": ctx.fingerprint})
    old_key = dict(store.attrs["build_key"])
    old_key["data"] = {k: v for k, v in old_key["data"].items() if k not in ("follow_symlinks", "max_image_pixels")}
    store.group.attrs["build_key"] = old_key
    store = WeightStore.open(str(tmp_path / "store"))
    store.check_same_build({**store.attrs, "build_key": _build_key_for(cfg, store.attrs["build_key"])}, ignore=("config",))
    cfg.data.follow_symlinks = True
    with pytest.raises(StoreError, match="build_key.data.follow_symlinks"):
        store.check_same_build({**store.attrs, "build_key": _build_key_for(cfg, store.attrs["build_key"])},
                               ignore=("config",))
