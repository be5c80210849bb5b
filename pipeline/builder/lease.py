"""The build lease: which driver may write into a store right now, and whether it is still alive.

    <out>/lease/gen-<g:09d>-<nonce>.json    one claim per driver run (`w2w build` / `w2w resume`)

A claim holds `generation, nonce, host, pid, started_at, updated_at, heartbeat_s, stale_after_s,
state (running | released), won`. The driver that wins generation g rewrites its claim every
`build.heartbeat_s` seconds (`updated_at` = its heartbeat) and marks it `released` when it ends.

Why a directory of claims and not one lease file: fsspec offers no compare-and-swap that holds
on every backend (local disk, S3, GCS), but all of them list strongly after a write. So a driver
(1) lists the claims, refuses when the newest one is fresh and not its own (unless takeover),
(2) writes its own claim for generation max+1, (3) lists again and wins only when no other claim
of a generation >= its own exists; otherwise it deletes its claim, waits a random moment and
tries again. Of two racing drivers at most one wins: whichever listed second sees the other.

Fencing: the generation only grows (the newest claim is never deleted, only older ones are
pruned). A worker of generation g checks, by one listing, that no claim of a generation > g
exists before it writes a chunk and again before it writes a marker (`check_fence`); a driver
that was taken over (`--takeover`, or its heartbeat went stale and another driver started)
therefore writes no marker after the takeover, and its own heartbeat thread notices and stops
it. Liveness is host-independent: it is the age of the heartbeat, never a pid check.
"""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import fsspec

from pipeline.builder.store import StoreError, join, write_small_file

LEASE_DIR = "lease"
STALE_FACTOR = 4  # a heartbeat older than STALE_FACTOR beats (and at least MIN_STALE_S) is stale
MIN_STALE_S = 10.0


class LeaseError(StoreError):
    """Another driver holds the build lease (message names it and how to proceed)."""


class LeaseLost(LeaseError):
    """This driver's lease was taken over: it must stop writing into the store."""


def stale_after(heartbeat_s: float) -> float:
    return max(STALE_FACTOR * float(heartbeat_s), MIN_STALE_S)


@dataclass
class LeaseClaim:
    generation: int
    nonce: str
    host: str
    pid: int
    started_at: float
    updated_at: float
    heartbeat_s: float
    stale_after_s: float
    state: str = "running"  # running | released
    won: bool = False
    released_at: float = 0.0

    @property
    def name(self) -> str:
        return claim_name(self.generation, self.nonce)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.updated_at)

    def fresh(self, now: float | None = None) -> bool:
        """Running and heard from recently (the driver is alive, wherever it runs)."""
        return self.state == "running" and self.age(now) <= self.stale_after_s

    def describe(self, now: float | None = None) -> str:
        return f"driver on {self.host} pid {self.pid} (generation {self.generation}) last seen {_ago(self.age(now))} ago"


def claim_name(generation: int, nonce: str) -> str:
    return f"gen-{generation:09d}-{nonce}.json"


def generation_of(name: str) -> int | None:
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith("gen-") and base.endswith(".json")):
        return None
    try:
        return int(base[4:13])
    except ValueError:
        return None


def _lease_dir(out: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(str(out))
    return fs, join(root, LEASE_DIR)


def _names(fs, folder: str) -> list[str]:
    # Object-store filesystems (s3fs, gcsfs) cache directory listings per instance, and fsspec
    # reuses instances: a long-lived worker would never see another driver's newer claim.
    fs.invalidate_cache(folder)
    try:
        return [p for p in fs.glob(join(folder, "gen-*.json")) if generation_of(p) is not None]
    except FileNotFoundError:
        return []


def read_claims(out: str) -> list[LeaseClaim]:
    """Every claim in the store, oldest generation first (unreadable ones, mid-replace, are skipped)."""
    fs, folder = _lease_dir(out)
    claims = []
    for path in _names(fs, folder):
        try:
            with fs.open(path, "r") as f:
                claims.append(LeaseClaim(**json.load(f)))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            continue
    return sorted(claims, key=lambda c: (c.generation, c.won, c.updated_at))


def current_claim(out: str) -> LeaseClaim | None:
    """The newest claim (highest generation; of equals, the winner), or None before any lease."""
    claims = read_claims(out)
    return claims[-1] if claims else None


def check_fence(out: str, generation: int) -> None:
    """Raise LeaseLost when a driver of a newer generation exists: one listing, no file reads."""
    fs, folder = _lease_dir(out)
    newer = [p for p in _names(fs, folder) if (generation_of(p) or 0) > generation]
    if newer:
        holder = _describe_path(fs, max(newer, key=generation_of))
        raise LeaseLost(
            f"the build lease of {out} was taken over by {holder}: this driver's generation {generation} "
            "is fenced and writes nothing more (the newer driver finishes the build)"
        )


def _describe_path(fs, path: str) -> str:
    try:
        with fs.open(path, "r") as f:
            return LeaseClaim(**json.load(f)).describe()
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return f"generation {generation_of(path)}"


class BuildLease:
    """The lease of one driver run: acquire (or refuse), heartbeat in a thread, release."""

    def __init__(self, out: str, heartbeat_s: float = 5.0, log=print):
        self.out = str(out)
        self.fs, self.folder = _lease_dir(self.out)
        self.heartbeat_s = float(heartbeat_s)
        self.log = log
        now = time.time()
        self.claim = LeaseClaim(
            generation=0, nonce=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(),
            started_at=now, updated_at=now, heartbeat_s=self.heartbeat_s, stale_after_s=stale_after(self.heartbeat_s),
        )
        self.lost: str | None = None  # set by the heartbeat thread when another driver took over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def generation(self) -> int:
        return self.claim.generation

    # ------------------------------------------------------------------ acquire
    def acquire(self, takeover: bool = False, attempts: int = 6) -> "BuildLease":
        self.fs.makedirs(self.folder, exist_ok=True)
        for attempt in range(attempts):
            now = time.time()
            claims = read_claims(self.out)
            holder = next((c for c in reversed(claims) if c.fresh(now)), None)
            if holder is not None and not takeover:
                raise LeaseError(
                    f"{self.out} is being built by {holder.describe(now)}; wait for it to finish, "
                    "or if that driver is gone pass --takeover (its workers are fenced and stop writing)"
                )
            previous = claims[-1] if claims else None
            self.claim.generation = (max(c.generation for c in claims) if claims else 0) + 1
            self.claim.updated_at = time.time()
            self._write()
            rivals = [p for p in _names(self.fs, self.folder)
                      if (generation_of(p) or 0) >= self.generation and not p.endswith(self.claim.name)]
            if not rivals:
                self.claim.won = True
                self._write()
                self._prune()
                if holder is not None:
                    self.log(f"taking over the build lease from {holder.describe(now)} (--takeover)")
                elif previous is not None and previous.state == "running":
                    self.log(f"the previous {previous.describe(now)} is gone (stale heartbeat): taking over its lease")
                self._start_heartbeat()
                return self
            self._remove()  # another driver claimed at the same moment: back off, look again
            time.sleep(random.uniform(0.2, 0.8) * (attempt + 1))
        raise LeaseError(
            f"could not acquire the build lease of {self.out}: other drivers kept claiming it at the same "
            f"moment ({attempts} tries); run `w2w status {self.out}` and retry"
        )

    def _write(self) -> None:
        write_small_file(self.fs, join(self.folder, self.claim.name), json.dumps(asdict(self.claim), sort_keys=True))

    def _remove(self) -> None:
        try:
            self.fs.rm(join(self.folder, self.claim.name))
        except FileNotFoundError:
            pass

    def _prune(self) -> None:
        """Drop claims of older generations (the newest one stays: generations only grow)."""
        for path in _names(self.fs, self.folder):
            if (generation_of(path) or 0) < self.generation:
                try:
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="w2w-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                check_fence(self.out, self.generation)
                self.claim.updated_at = time.time()
                self._write()
                failures = 0
            except LeaseLost as err:
                self.lost = str(err)
                return
            except Exception as err:  # noqa: BLE001 - e.g. disk full: keep trying, say it once
                failures += 1
                if failures == 1:
                    self.log(f"warning: cannot write the build heartbeat to {self.folder} ({type(err).__name__}: {err}); "
                             "`w2w status` will call this build interrupted until it can")

    def check(self) -> None:
        """Raise LeaseLost if this driver was taken over (the heartbeat thread or a fresh listing says so)."""
        if self.lost is None:
            try:
                check_fence(self.out, self.generation)
            except LeaseLost as err:
                self.lost = str(err)
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop the heartbeat; mark the claim released (kept: it carries the newest generation)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if self.lost is not None or not self.claim.won:
            return
        try:
            check_fence(self.out, self.generation)
            self.claim.state, self.claim.released_at = "released", time.time()
            self.claim.updated_at = self.claim.released_at
            self._write()
        except Exception as err:  # noqa: BLE001 - a stale claim is reported as interrupted: still truthful
            self.log(f"warning: could not release the build lease in {self.folder}: {type(err).__name__}: {err}")


def _ago(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


__all__ = ["BuildLease", "LeaseClaim", "LeaseError", "LeaseLost", "check_fence", "current_claim", "read_claims"]
