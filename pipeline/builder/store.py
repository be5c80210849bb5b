"""The weight store contract (docs/STORE.md): the only thing the builder and the subspace stage share.

    <out>/weights.zarr        Zarr v3 group; array `weights` (n_rows, numel) float32,
                              chunks (rows_per_shard, numel), no sharding codec.
                              Group attributes: layout JSON, base fingerprint, config, attributes.
    <out>/manifest.parquet    one row per identity: row, identity, source, shard, <attribute columns>
    <out>/shards/<s>.json     completion marker, written only after chunk s is fully written
    <out>/progress/*.json     advisory heartbeat/failure files (running/failed shards, the build run)
    <out>/class_latents.safetensors  prior-preservation latents, generated once per build

Shard s = rows [s*R, (s+1)*R) = exactly one chunk, written by exactly one worker, so
concurrent writers never share a chunk. A shard without a marker is not done, whatever
the array holds. Paths may be local or fsspec URLs (file://, s3://, gs://, memory://).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from w2w_core.layout import LoraLayout

WEIGHTS_DIR = "weights.zarr"
WEIGHTS_ARRAY = "weights"
MANIFEST = "manifest.parquet"
SHARDS_DIR = "shards"
PROGRESS_DIR = "progress"
CLASS_LATENTS = "class_latents.safetensors"
STORE_FORMAT = "w2w-store/1"
RESERVED_COLUMNS = ("row", "identity", "source", "shard")


class StoreError(ValueError):
    """The store on disk does not match what the caller asked for (message says how to fix it)."""


@dataclass
class ShardMarker:
    shard: int
    start: int
    stop: int
    checksum: str  # sha256 of the chunk's float32 little-endian bytes
    identities: list[str]
    losses: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)  # identity -> reason
    seconds: float = 0.0
    worker: str = ""
    finished_at: float = 0.0
    write_seconds: float = 0.0  # time to write the chunk (Zarr encode + store)
    generation: int = 0  # the build lease generation of the driver whose worker wrote it (0: no lease)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)


def chunk_checksum(block: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(block, dtype="<f4").tobytes()).hexdigest()


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def zarr_location(url: str) -> str:
    """What to hand Zarr for `url`: a plain path for local files (`file://...` included), else the URL.

    Zarr's fsspec store does not create parent directories on a local filesystem (fsspec's
    LocalFileSystem has auto_mkdir=False), so `file://` URLs go through Zarr's LocalStore.
    """
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(str(url))
    return path if isinstance(fs, LocalFileSystem) else str(url)


class WeightStore:
    """Read/write access to one build's output directory (local path or fsspec URL)."""

    def __init__(self, out: str, group: zarr.Group):
        self.out = str(out)
        self.fs, self._root = fsspec.core.url_to_fs(self.out)
        self.group = group
        self.array = group[WEIGHTS_ARRAY]
        attrs = dict(group.attrs)
        self.attrs = attrs
        self.layout = LoraLayout.from_json(attrs["layout"])
        self.n_rows, self.numel = (int(x) for x in self.array.shape)
        self.rows_per_shard = int(self.array.chunks[0])

    # ------------------------------------------------------------------ open / create
    @classmethod
    def exists(cls, out: str) -> bool:
        fs, root = fsspec.core.url_to_fs(str(out))
        return fs.exists(join(root, WEIGHTS_DIR, "zarr.json"))

    @classmethod
    def open(cls, out: str, mode: str = "r+") -> "WeightStore":
        if not cls.exists(out):
            raise FileNotFoundError(f"no weight store at {out} (expected {join(str(out), WEIGHTS_DIR)}); run `w2w build` first")
        group = zarr.open_group(zarr_location(join(str(out), WEIGHTS_DIR)), mode=mode)
        if group.attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{out} is not a w2w store of format {STORE_FORMAT!r}")
        return cls(out, group)

    @classmethod
    def create(
        cls,
        out: str,
        layout: LoraLayout,
        manifest: pa.Table,
        rows_per_shard: int,
        attributes: Iterable[str],
        metadata: dict,
        advisory: dict | None = None,
    ) -> "WeightStore":
        """Create the array (NaN-filled, nothing written yet) and the manifest.

        `metadata` (base fingerprint, training config, ...) is what makes two builds the
        same build; re-creating an existing store with different metadata is refused.
        `advisory` attributes (e.g. the full config including worker counts) are stored
        but not compared; re-opening refreshes them.
        """
        advisory = dict(advisory or {})
        out = str(out)
        n_rows = manifest.num_rows
        attrs = {
            "format": STORE_FORMAT,
            "layout": layout.to_json(),
            "attributes": list(attributes),
            "n_identities": n_rows,
            **metadata,
        }
        if cls.exists(out):
            store = cls.open(out)
            store.check_same_build(attrs, ignore=advisory.keys())
            if advisory:
                store.group.attrs.update(_json_round_trip(advisory))
                store.attrs.update(_json_round_trip(advisory))
            return store
        fs, root = fsspec.core.url_to_fs(out)
        fs.makedirs(join(root, SHARDS_DIR), exist_ok=True)
        write_table(manifest, join(out, MANIFEST))
        group = zarr.open_group(zarr_location(join(out, WEIGHTS_DIR)), mode="w")
        group.create_array(
            WEIGHTS_ARRAY,
            shape=(n_rows, layout.numel),
            chunks=(rows_per_shard, layout.numel),
            dtype="float32",
            fill_value=float("nan"),
            # No sharding codec: one chunk = one shard = one writer.
        )
        group.attrs.update(_json_round_trip({**attrs, **advisory, "advisory_keys": sorted(advisory)}))
        return cls(out, group)

    def check_same_build(self, attrs: dict, ignore: Iterable[str] = ()) -> None:
        skip = set(ignore) | set(self.attrs.get("advisory_keys", [])) | {"advisory_keys"}
        mine = {k: v for k, v in self.attrs.items() if k not in skip}
        theirs = {k: v for k, v in _json_round_trip(attrs).items() if k not in skip}
        diffs = _diff(mine, theirs)
        if diffs:
            detail = "; ".join(f"{k}: store has {_short(a)}, requested {_short(b)}" for k, a, b in diffs[:8])
            if len(diffs) > 8:
                detail += f"; ... {len(diffs) - 8} more"
            raise StoreError(
                f"{self.out} already holds a build with a different configuration ({detail}). "
                "Use `w2w resume` to finish it, or choose a new build.out."
            )

    # ------------------------------------------------------------------ geometry
    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    # ------------------------------------------------------------------ shards
    def marker_path(self, shard: int) -> str:
        return join(self._root, SHARDS_DIR, f"{shard:06d}.json")

    def write_shard(self, shard: int, block: np.ndarray, marker: ShardMarker, fence=None) -> ShardMarker:
        """Write chunk `shard` whole, then its marker (atomically). Order makes resume exact.

        `fence()` (the build lease check) runs before the chunk and again before the marker, so
        a superseded driver's worker writes neither once a newer driver holds the lease (the
        window left is one chunk write; a chunk torn by it has no marker of its own and a marker
        that no longer matches is caught by the checksum verification of every build/resume).
        A failed write (disk full, permission, object-store error) removes the torn chunk (no
        marker points at it; removing it gives back its space) and the marker's temp file, then
        raises the original error: the shard is simply not done.
        """
        start, stop = self.shard_rows(shard)
        block = np.asarray(block, dtype=np.float32)
        if block.shape != (stop - start, self.numel):
            raise StoreError(f"shard {shard} block has shape {block.shape}, expected {(stop - start, self.numel)}")
        if fence is not None:
            fence()
        t0 = time.perf_counter()
        try:
            self.array[start:stop] = block
        except BaseException:
            self._remove_quietly(self.chunk_path(shard))
            raise
        marker.write_seconds = round(time.perf_counter() - t0, 4)
        marker.shard, marker.start, marker.stop = shard, start, stop
        marker.checksum = chunk_checksum(block)
        marker.finished_at = marker.finished_at or time.time()
        if fence is not None:
            fence()
        path = self.marker_path(shard)
        tmp = path + ".partial"
        try:
            with self.fs.open(tmp, "w") as f:
                f.write(marker.to_json())
            self.fs.mv(tmp, path)
        except BaseException:
            self._remove_quietly(tmp)
            raise
        return marker

    def _remove_quietly(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except Exception:  # noqa: BLE001 - best effort after a failed write; the original error is raised
            pass

    def clear_marker(self, shard: int) -> None:
        """Forget shard `shard` (e.g. its marker no longer matches the chunk): it will be redone."""
        path = self.marker_path(shard)
        if self.fs.exists(path):
            self.fs.rm(path)

    def chunk_path(self, shard: int) -> str:
        """Where Zarr v3 keeps chunk (shard, 0) with the default chunk-key encoding."""
        return join(self._root, WEIGHTS_DIR, WEIGHTS_ARRAY, "c", str(shard), "0")

    def read_shard(self, shard: int) -> np.ndarray:
        start, stop = self.shard_rows(shard)
        return np.asarray(self.array[start:stop])

    def marker(self, shard: int) -> ShardMarker | None:
        path = self.marker_path(shard)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return ShardMarker(**json.load(f))

    def markers(self) -> dict[int, ShardMarker]:
        """All completion markers, read in one listing (cheap at 1,000+ shards)."""
        out = {}
        for path in self.fs.glob(join(self._root, SHARDS_DIR, "*.json")):
            name = path.rsplit("/", 1)[-1]
            with self.fs.open(path, "r") as f:
                marker = ShardMarker(**json.load(f))
            if name == f"{marker.shard:06d}.json":
                out[marker.shard] = marker
        return out

    def verify_shard(self, shard: int, marker: ShardMarker | None = None) -> bool:
        """A shard is done only if its marker exists and matches the chunk's bytes."""
        marker = marker or self.marker(shard)
        return marker is not None and marker.checksum == chunk_checksum(self.read_shard(shard))

    def done_shards(self, verify: bool = False) -> set[int]:
        markers = self.markers()
        if verify:
            return {s for s, m in markers.items() if self.verify_shard(s, m)}
        return set(markers)

    # ------------------------------------------------------------------ advisory progress files
    def progress_path(self, name: str) -> str:
        return join(self._root, PROGRESS_DIR, f"{name}.json")

    def write_progress(self, name: str, record: dict) -> None:
        """Advisory (never used for correctness): heartbeat / failure of a shard or the build run."""
        path = self.progress_path(name)
        self.fs.makedirs(join(self._root, PROGRESS_DIR), exist_ok=True)
        write_small_file(self.fs, path, json.dumps(record, sort_keys=True, default=str), f".{os.getpid()}.partial")

    def clear_progress(self, name: str) -> None:
        path = self.progress_path(name)
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    def read_progress(self) -> dict[str, dict]:
        out = {}
        for path in self.fs.glob(join(self._root, PROGRESS_DIR, "*.json")):
            try:
                with self.fs.open(path, "r") as f:
                    out[path.rsplit("/", 1)[-1][:-5]] = json.load(f)
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # being replaced right now
        return out

    @property
    def class_latents_path(self) -> str:
        return join(self.out, CLASS_LATENTS)

    # ------------------------------------------------------------------ tables
    def manifest(self) -> pa.Table:
        return read_table(join(self.out, MANIFEST))

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attrs.get("attributes", []))

    def quarantined(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for marker in self.markers().values():
            out.update(marker.quarantined)
        return out

    def valid_rows(self) -> np.ndarray:
        """Rows that downstream stages use: in a finished shard and not quarantined."""
        manifest = self.manifest()
        markers = self.markers()
        bad = set()
        for m in markers.values():
            bad.update(m.quarantined)
        rows = manifest.column("row").to_numpy()
        shards = manifest.column("shard").to_numpy()
        ids = manifest.column("identity").to_pylist()
        keep = [r for r, s, i in zip(rows, shards, ids) if int(s) in markers and i not in bad]
        return np.asarray(sorted(keep), dtype=np.int64)

    @property
    def weights_url(self) -> str:
        """What `dask.array.from_zarr(url, component='weights')` opens."""
        return zarr_location(join(self.out, WEIGHTS_DIR))


def write_small_file(fs, path: str, text: str, tmp_suffix: str = ".partial") -> None:
    """Write a small advisory record atomically (temp file + move); when that fails (a full disk
    has no block for the temp file) overwrite the existing file in place, which reuses its
    blocks: a failure's cause (or a released lease) must still reach `w2w status` on a full disk.
    Readers skip a record caught half-written."""
    tmp = path + tmp_suffix
    try:
        with fs.open(tmp, "w") as f:
            f.write(text)
        fs.mv(tmp, path)
    except OSError:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass
        if not fs.exists(path):
            raise
        with fs.open(path, "w") as f:
            f.write(text)


def write_table(table: pa.Table, url: str) -> None:
    """Write a Parquet table atomically (temp file, then rename)."""
    fs, path = fsspec.core.url_to_fs(url)
    tmp = path + ".partial"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(tmp, path)


def read_table(url: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"table not found: {url}")
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _json_round_trip(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _diff(mine: dict, theirs: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """Differences as (dotted key, mine, theirs), descending into nested dicts."""
    out = []
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k), theirs.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", a, b))
    return out


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
