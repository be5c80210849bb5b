"""The distributed dataset builder: plan shards, run long-lived Ray actors, write the store.

    plan_build(cfg)      -> Plan (sorted identity ids -> rows -> shards, manifest table)
    run_build(cfg, ...)  -> BuildSummary  (used by `w2w build` and `w2w resume`)

One actor per GPU (or CPU slot; `build.workers` overrides) loads the base model once and
trains shard after shard through `pipeline.builder.worker.train_shard`, writing the chunk and
then the marker itself. The driver only dispatches shard ids to free actors. Ray retries
crashed actors and their in-flight task (`max_restarts`, `max_task_retries`); when an actor
is gone for good the driver re-queues its shard on the others (at most `max_task_retries`
times). Shards that still fail are left without a marker: `w2w resume` redoes them.

One driver at a time: `run_build` holds the store's build lease (pipeline.builder.lease) for
its whole run, heartbeating it every `build.heartbeat_s`; a second driver is refused while that
heartbeat is fresh (`takeover=True` supersedes it), and every marker a worker writes is fenced
by the lease generation of the driver that dispatched it.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.builder.lease import BuildLease, LeaseLost
from pipeline.builder.store import StoreError, WeightStore, join
from pipeline.builder.worker import TrainerContext, synthetic_layout, train_shard, virtual_ids

# Config keys that change how a build runs, not what it produces: stored, never compared.
EXECUTION_KEYS = (
    "out",
    "workers",
    "gpus_per_worker",
    "cpus_per_worker",
    "ray_address",
    "max_restarts",
    "max_task_retries",
    "synthetic_delay_s",
    "heartbeat_s",
)
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024  # the builder moves only markers through Ray


@dataclass
class Plan:
    ids: list[str]
    manifest: pa.Table
    attribute_names: list[str]
    rows_per_shard: int
    source: str

    @property
    def n_shards(self) -> int:
        return -(-len(self.ids) // self.rows_per_shard)

    def shard_ids(self, shard: int) -> list[str]:
        return self.ids[shard * self.rows_per_shard : (shard + 1) * self.rows_per_shard]

    @property
    def ids_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()


@dataclass
class BuildSummary:
    out: str
    n_shards: int
    done_before: int
    done_now: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    quarantined: int = 0
    seconds: float = 0.0
    workers: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------------------------- planning
def plan_build(cfg) -> Plan:
    """Row i = the i-th identity in sorted id order; shard s = rows [s*R, (s+1)*R)."""
    R = cfg.build.rows_per_shard
    if cfg.build.synthetic_identities:
        if cfg.build.trainer != "synthetic":
            raise StoreError("build.synthetic_identities needs build.trainer=synthetic (virtual identities have no images)")
        ids = virtual_ids(cfg.build.synthetic_identities)
        names = ["male", "young"]
        digest = np.frombuffer(hashlib.sha256(b"virtual").digest(), dtype=np.uint8)
        cols = {a: pa.array(((np.arange(len(ids)) * (k + 3) + digest[k]) % 2).astype(np.int8)) for k, a in enumerate(names)}
        source = f"virtual:{len(ids)}"
    else:
        from pipeline.data.source import IdentitySource

        src = IdentitySource.from_config(cfg.data)
        ids = list(src.ids)
        names = list(src.attribute_names)
        table = src.table
        if cfg.data.limit:
            ids = ids[: cfg.data.limit]
            table = table.slice(0, len(ids))
        cols = {a: table.column(a).cast(pa.int8()) for a in names}
        source = str(cfg.data.source)
    if not ids:
        raise StoreError(f"no identities to build from {cfg.data.source!r}")
    n = len(ids)
    rows = np.arange(n, dtype=np.int64)
    manifest = pa.table(
        {
            "row": pa.array(rows),
            "identity": pa.array(ids, pa.string()),
            "source": pa.array([source] * n, pa.string()),
            "shard": pa.array((rows // R).astype(np.int32)),
            **cols,
        }
    )
    return Plan(ids=ids, manifest=manifest, attribute_names=names, rows_per_shard=R, source=source)


def build_key(cfg_dict: dict) -> dict:
    """The part of the config that defines the result (execution knobs removed)."""
    key = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg_dict.items()}
    key["build"] = {k: v for k, v in key["build"].items() if k not in EXECUTION_KEYS}
    return key


def absolutize(cfg):
    """Local relative paths -> absolute, so actors (other cwd, other process) see the same files."""
    for section, name in (("build", "out"), ("data", "source")):
        obj = getattr(cfg, section)
        value = getattr(obj, name)
        if value and "://" not in value and not value.startswith("builtin:"):
            setattr(obj, name, os.path.abspath(os.path.expanduser(value)))
    return cfg


# ---------------------------------------------------------------------------------- Ray
def connect_ray(address: str = "") -> bool:
    """Connect to (or start) Ray. Returns True when this call started it (and should stop it).

    Token auth (Ray >= 2.5x): a new local cluster turns it on by itself; for an explicit
    address Ray only sends the token when RAY_AUTH_MODE=token, so when a token is available
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and the mode is unset we set
    it, exactly as Ray itself does for address="auto". See docs/RAY.md.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(log_to_driver=False, configure_logging=True, logging_level="WARNING")
    if address or os.environ.get("RAY_ADDRESS"):
        if os.environ.get("RAY_AUTH_MODE") is None and _token_available():
            _enable_token_auth()
        ray.init(address=address or None, **kwargs)
    else:
        ray.init(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kwargs)
    return True


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and its children (Ray caches its config: refresh it)."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth as enable

        enable()
    except ImportError:  # other Ray versions: the environment variable is read at import/init
        os.environ["RAY_AUTH_MODE"] = "token"


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def count_workers(cfg) -> int:
    import ray

    if cfg.build.workers:
        return cfg.build.workers
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if gpus > 0:
        return max(1, int(gpus // (cfg.build.gpus_per_worker or 1)))
    return max(1, int(float(res.get("CPU", 1)) // (cfg.build.cpus_per_worker or 1)))


class ShardWorker:
    """A long-lived actor: loads the trainer context (base model) once, then trains shards."""

    def __init__(self, cfg_dict: dict, out: str, name: str):
        from pipeline.config import from_dict

        self.cfg = from_dict(cfg_dict)
        self.out = out
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self.ctx = TrainerContext.create(self.cfg)
        self._store = None

    @property
    def store(self) -> WeightStore:
        if self._store is None:
            self._store = WeightStore.open(self.out)
        return self._store

    def describe(self) -> dict:
        return {"layout": self.ctx.layout.to_json(), "fingerprint": self.ctx.fingerprint, "worker": self.name}

    def pid(self) -> int:
        return os.getpid()

    def ensure_class_latents(self) -> bool:
        self.ctx.ensure_class_latents(self.store.class_latents_path)
        return self.ctx.class_latents is not None

    def run_shard(self, shard: int, identity_ids: list[str], attempt: int = 0, generation: int = 0) -> dict:
        """Train and write one shard. `generation` is the dispatching driver's lease generation:
        the chunk and the marker are written only while no newer driver holds the lease."""
        from pipeline.builder.lease import check_fence
        from pipeline.builder.store import ShardMarker

        store = self.store
        started = time.time()
        record = {"state": "running", "shard": shard, "worker": self.name, "pid": os.getpid(),
                  "started_at": started, "updated_at": started, "attempt": attempt, "generation": generation}
        fence = (lambda: check_fence(self.out, generation)) if generation else None
        if fence is not None:
            fence()
        _advisory(store.write_progress, f"{shard:06d}", record)
        last = [started]

        def heartbeat(info: dict) -> None:
            now = time.time()
            if now - last[0] > 5:
                last[0] = now
                _advisory(store.write_progress, f"{shard:06d}", {**record, "updated_at": now, **info})

        try:
            if self.ctx.needs_class_latents and self.ctx.class_latents is None:
                self.ctx.ensure_class_latents(store.class_latents_path)
            result = train_shard(self.ctx, identity_ids, progress=heartbeat)
            marker = ShardMarker(
                shard=shard, start=0, stop=0, checksum="", identities=list(identity_ids),
                losses=result.losses, quarantined=result.quarantined,
                seconds=round(time.time() - started, 4), worker=self.name, generation=generation,
            )
            store.write_shard(shard, result.block, marker, fence=fence)
        except LeaseLost:
            raise  # superseded: the newer driver owns this shard's progress file too
        except Exception as err:
            # The cause goes to `w2w status`; if even that write fails (disk full) the original
            # error still reaches the driver, which prints it.
            _advisory(store.write_progress, f"{shard:06d}", {**record, "state": "failed", "updated_at": time.time(),
                                                              "error": f"{type(err).__name__}: {err}"})
            raise
        _advisory(store.clear_progress, f"{shard:06d}")
        return {"shard": shard, "seconds": marker.seconds, "quarantined": len(marker.quarantined)}


# ---------------------------------------------------------------------------------- driver
def prepare_store(cfg, plan: Plan, describe: dict) -> WeightStore:
    from pipeline.config import to_dict
    from w2w_core.layout import LoraLayout

    cfg_dict = to_dict(cfg)
    stored = WeightStore.open(cfg.build.out).attrs.get("build_key") if WeightStore.exists(cfg.build.out) else None
    metadata = {
        "build_key": _build_key_for(cfg, stored),
        "base_fingerprint": describe["fingerprint"],
        "identities_sha256": plan.ids_sha256,
        "rows_per_shard": plan.rows_per_shard,
    }
    return WeightStore.create(
        cfg.build.out,
        LoraLayout.from_json(describe["layout"]),
        plan.manifest,
        plan.rows_per_shard,
        plan.attribute_names,
        metadata,
        advisory={"config": cfg_dict},
    )


def _advisory(write, *args) -> bool:
    """Run an advisory write (progress files); never let it mask the real outcome."""
    try:
        write(*args)
        return True
    except Exception:  # noqa: BLE001 - advisory only: disk full, object-store hiccup, ...
        return False


def comparable_key(requested: dict, stored: dict, defaults: dict) -> dict:
    """`requested` minus keys the stored build_key lacks whose value is the schema default.

    Config fields added after a store was written (e.g. data.follow_symlinks) must not make
    that store "a different build" while they keep the behaviour the store was built with.
    """
    out = {}
    for k, v in requested.items():
        if k not in stored and k in defaults and defaults[k] == v:
            continue
        if isinstance(v, dict) and isinstance(stored.get(k), dict) and isinstance(defaults.get(k), dict):
            v = comparable_key(v, stored[k], defaults[k])
        out[k] = v
    return out


def _build_key_for(cfg, stored_key: dict | None) -> dict:
    from pipeline.config import W2WConfig, to_dict

    key = build_key(to_dict(cfg))
    if stored_key is None:
        return key
    return comparable_key(key, stored_key, build_key(to_dict(W2WConfig())))


def shards_to_do(store: WeightStore, verify: bool = True, threads: int = 4) -> list[int]:
    """Shards without a valid marker; markers that do not match their chunk are removed."""
    markers = store.markers()
    if verify and markers:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            ok = dict(zip(markers, pool.map(lambda s: store.verify_shard(s, markers[s]), markers)))
        for s, good in ok.items():
            if not good:
                store.clear_marker(s)
        done = {s for s, good in ok.items() if good}
    else:
        done = set(markers)
    return [s for s in range(store.n_shards) if s not in done]


def run_build(cfg, progress_bar: bool = True, verify: bool = True, log=print, takeover: bool = False,
              local: bool = False) -> BuildSummary:
    """Plan, take the build lease, connect to Ray, start the actors, dispatch every unfinished shard, wait.

    `local=True`: no Ray (need not be installed): one ShardWorker in this process, the code every
    Ray actor runs, trains the unfinished shards one after another (one machine, e.g. a GPU box);
    same store, markers, lease fencing and resume.

    Raises LeaseError (another live driver holds the store; `takeover=True` supersedes it) and
    LeaseLost (this driver was superseded while running: it stops, its workers write nothing more).
    """
    t0 = time.time()
    cfg = absolutize(cfg)
    out = cfg.build.out
    plan = plan_build(cfg)
    if WeightStore.exists(out):
        store = WeightStore.open(out)
        # Refuse a different build before starting anything (cheap: no Ray, no model, no lease).
        store.check_same_build(
            {**store.attrs, "build_key": _build_key_for(cfg, store.attrs.get("build_key")),
             "identities_sha256": plan.ids_sha256},
            ignore=("config",),
        )
    lease = BuildLease(out, heartbeat_s=cfg.build.heartbeat_s, log=log).acquire(takeover=takeover)
    try:
        run = _run_build_local if local else _run_build_leased
        return run(cfg, plan, lease, t0, progress_bar, verify, log)
    finally:
        lease.release()


def _already_complete(out: str, verify: bool, t0: float, log) -> BuildSummary | None:
    """A summary when the store at `out` has every shard (nothing to start), else None."""
    if not WeightStore.exists(out):
        return None
    store = WeightStore.open(out)
    if shards_to_do(store, verify=verify):
        return None
    log(f"build at {out} is already complete: {store.n_shards}/{store.n_shards} shards; nothing to do")
    return BuildSummary(out=out, n_shards=store.n_shards, done_before=store.n_shards, seconds=time.time() - t0)


def _start_summary(cfg, plan: Plan, store: WeightStore, lease: BuildLease, t0: float, n_workers: int, todo: list,
                   log, where: str) -> BuildSummary:
    _advisory(store.write_progress, "build", {"state": "running", "started_at": t0, "pid": os.getpid(),
                                              "host": socket.gethostname(), "workers": n_workers,
                                              "generation": lease.generation,
                                              "todo_at_start": len(todo), "n_shards": store.n_shards})
    done_before = store.n_shards - len(todo)
    log(f"building {cfg.build.out}: {len(plan.ids)} identities, {store.n_shards} shards "
        f"({done_before} done, {len(todo)} to do) {where}, trainer={cfg.build.trainer}")
    return BuildSummary(out=cfg.build.out, n_shards=store.n_shards, done_before=done_before, workers=n_workers)


def _finish_summary(summary: BuildSummary, store: WeightStore, lease: BuildLease, t0: float, todo: list) -> BuildSummary:
    summary.seconds = time.time() - t0
    lease.check()
    _advisory(store.write_progress, "build", {"state": "failed" if summary.failed else "finished", "started_at": t0,
                                              "finished_at": time.time(), "pid": os.getpid(), "workers": summary.workers,
                                              "host": socket.gethostname(), "generation": lease.generation,
                                              "todo_at_start": len(todo), "n_shards": store.n_shards,
                                              # reasons too: on a full disk this in-place rewrite may be
                                              # the only record of a shard's failure that fits
                                              "failed": {str(s): why for s, why in sorted(summary.failed.items())}})
    return summary


def _run_build_local(cfg, plan: Plan, lease: BuildLease, t0: float, progress_bar: bool, verify: bool, log) -> BuildSummary:
    """`run_build(local=True)`: the shards in this process through ShardWorker, retried like Ray's tasks."""
    from pipeline.config import to_dict

    done = _already_complete(cfg.build.out, verify, t0, log)
    if done is not None:
        return done
    worker = ShardWorker(to_dict(cfg), cfg.build.out, "local")
    lease.check()
    store = prepare_store(cfg, plan, worker.describe())
    todo = shards_to_do(store, verify=verify)
    if worker.ensure_class_latents():
        log(f"class latents: {store.class_latents_path}")
    summary = _start_summary(cfg, plan, store, lease, t0, 1, todo, log, "in this process (no Ray)")
    bar = _bar(store.n_shards, summary.done_before, progress_bar)
    for s in todo:
        for attempt in range(cfg.build.max_task_retries + 1):
            lease.check()
            try:
                info = worker.run_shard(s, plan.shard_ids(s), attempt, lease.generation)
            except LeaseLost:
                raise
            except Exception as err:  # noqa: BLE001 - the shard failed: retry, then leave it for `w2w resume`
                summary.failed[s] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                continue
            summary.failed.pop(s, None)
            summary.done_now += 1
            summary.quarantined += info["quarantined"]
            bar.update(1)
            break
    bar.close()
    return _finish_summary(summary, store, lease, t0, todo)


def _run_build_leased(cfg, plan: Plan, lease: BuildLease, t0: float, progress_bar: bool, verify: bool, log) -> BuildSummary:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from pipeline.config import to_dict

    out = cfg.build.out
    existing = WeightStore.exists(out)
    if existing:
        done = _already_complete(out, verify, t0, log)
        if done is not None:
            return done
        todo = shards_to_do(WeightStore.open(out), verify=False)
    started_ray = connect_ray(cfg.build.ray_address)
    actors = []
    try:
        n_workers = count_workers(cfg)
        if existing:
            n_workers = min(n_workers, len(todo))
        cfg_dict = to_dict(cfg)
        remote = ray.remote(ShardWorker).options(
            num_cpus=cfg.build.cpus_per_worker,
            num_gpus=cfg.build.gpus_per_worker,
            max_restarts=cfg.build.max_restarts,
            max_task_retries=cfg.build.max_task_retries,
        )
        actors = [remote.remote(cfg_dict, out, f"w{k}") for k in range(n_workers)]
        describe = ray.get(actors[0].describe.remote())
        lease.check()
        store = prepare_store(cfg, plan, describe)
        todo = shards_to_do(store, verify=verify)
        if ray.get(actors[0].ensure_class_latents.remote()):
            log(f"class latents: {store.class_latents_path}")
        summary = _start_summary(cfg, plan, store, lease, t0, n_workers, todo, log, f"on {n_workers} workers")
        bar = _bar(store.n_shards, summary.done_before, progress_bar)
        pending = deque(todo)
        attempts: dict[int, int] = {}
        free = list(range(n_workers))
        alive = set(free)
        inflight: dict = {}
        while pending or inflight:
            lease.check()  # superseded (--takeover elsewhere): stop dispatching at once
            while free and pending:
                a, s = free.pop(0), pending.popleft()
                ref = actors[a].run_shard.remote(s, plan.shard_ids(s), attempts.get(s, 0), lease.generation)
                inflight[ref] = (a, s)
            if not inflight:
                break  # no live actors left
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(1.0, cfg.build.heartbeat_s))
            for ref in ready:
                a, s = inflight.pop(ref)
                try:
                    info = ray.get(ref)
                    summary.done_now += 1
                    summary.quarantined += info["quarantined"]
                    bar.update(1)
                    free.append(a)
                    continue
                except RayActorError as err:  # actor gone beyond its restarts: never reuse it
                    alive.discard(a)
                    reason = f"worker {a} died: {str(err).splitlines()[0][:200]}"
                except RayTaskError as err:  # the task raised: the actor is fine
                    if isinstance(err, LeaseLost) or isinstance(getattr(err, "cause", None), LeaseLost):
                        lease.lost = lease.lost or str(getattr(err, "cause", err))
                        lease.check()
                    free.append(a)
                    reason = str(err.cause if hasattr(err, "cause") else err).splitlines()[0][:300]
                attempts[s] = attempts.get(s, 0) + 1
                if attempts[s] <= cfg.build.max_task_retries and alive:
                    pending.append(s)
                else:
                    summary.failed[s] = reason
                    _advisory(store.write_progress, f"{s:06d}", {"state": "failed", "shard": s, "error": reason,
                                                                 "updated_at": time.time(), "attempt": attempts[s]})
            if not alive:
                for s in pending:
                    summary.failed[s] = "no live workers left"
                pending.clear()
        bar.close()
        return _finish_summary(summary, store, lease, t0, todo)
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        if started_ray:
            ray.shutdown()


def _bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="shard", desc="build", disable=not enabled, dynamic_ncols=True)


def resume_config(out: str, overrides=()):
    """The config a store was built with (its attributes) + execution-only overrides."""
    from omegaconf import OmegaConf

    from pipeline.config import ConfigError, from_dict, validate

    store = WeightStore.open(out)
    cfg = from_dict(store.attrs["config"])
    if overrides:
        for item in overrides:
            key = item.split("=", 1)[0]
            if not key.startswith("build.") or key.split(".", 1)[1] not in EXECUTION_KEYS:
                raise ConfigError(
                    f"`w2w resume` accepts only execution overrides (build.{{{','.join(EXECUTION_KEYS)}}}), got {item!r}; "
                    "a different configuration is a different build: use `w2w build` with a new build.out"
                )
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
        cfg = from_dict(OmegaConf.to_container(merged))
    validate(cfg)
    cfg.build.out = out if "://" in out else os.path.abspath(out)
    return cfg


__all__ = ["plan_build", "run_build", "resume_config", "shards_to_do", "connect_ray", "BuildSummary", "join",
           "synthetic_layout"]
