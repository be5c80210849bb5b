"""`w2w status`: what a build's store says about it (markers = truth, progress files = advisory).

Whether a build is running is the age of its driver's heartbeat in the build lease
(pipeline.builder.lease), never a pid check: status may run on another host than the driver.
"""
from __future__ import annotations

import time

from pipeline.builder.lease import current_claim
from pipeline.builder.store import WeightStore

STALE_AFTER_S = 600.0  # a "running" heartbeat older than this is reported as stale


def build_status(out: str, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    store = WeightStore.open(out, mode="r")
    markers = store.markers()
    progress = store.read_progress()
    run = progress.pop("build", None)
    claim = current_claim(out)
    driver = None
    if claim is not None:
        driver = {"host": claim.host, "pid": claim.pid, "generation": claim.generation, "state": claim.state,
                  "started_at": claim.started_at, "last_seen_s": round(claim.age(now), 1),
                  "alive": claim.fresh(now), "description": claim.describe(now)}
    running, failed, stale = [], {}, []
    for name, rec in progress.items():
        try:
            s = int(name)
        except ValueError:
            continue
        if s in markers:
            continue
        if rec.get("state") == "running":
            (stale if now - float(rec.get("updated_at", 0)) > STALE_AFTER_S else running).append(s)
        elif rec.get("state") == "failed":
            failed[s] = rec.get("error", "")
    # Failures the driver recorded in its run record (a full disk may have refused the shard's own file).
    if run and run.get("state") == "failed" and isinstance(run.get("failed"), dict):
        for name, why in run["failed"].items():
            s = int(name)
            if s not in markers and s not in failed:
                failed[s] = why
                if s in running:
                    running.remove(s)
    # Stores written before the lease existed have no claim: no driver of theirs can still run.
    live = claim is not None and claim.fresh(now)
    if not live or (run and run.get("state") in ("finished", "failed")):
        # no live driver (or its run is over): whatever still says "running" was interrupted
        stale += running
        running = []
    n = store.n_shards
    done_rows = sum(m.stop - m.start for m in markers.values())
    quarantined = {i: r for m in markers.values() for i, r in m.quarantined.items()}
    pending = n - len(markers) - len(running) - len(failed) - len(stale)
    # throughput: shards finished since the current run started (else over all markers)
    t_start = float(run["started_at"]) if run else None
    recent = [m for m in markers.values() if t_start is None or m.finished_at >= t_start]
    rate = None
    if recent:
        first = t_start if t_start is not None else min(m.finished_at - m.seconds for m in recent)
        last = now if live and run and run.get("state") == "running" else max(m.finished_at for m in recent)
        elapsed = max(last - first, 1e-6)
        rate = sum(m.stop - m.start for m in recent) / elapsed * 3600.0
    remaining_rows = store.n_rows - done_rows
    eta = remaining_rows / rate * 3600.0 if rate and remaining_rows else (0.0 if not remaining_rows else None)
    if len(markers) == n:
        state = "complete"
    elif live:
        state = "running"
    elif claim is not None and claim.state == "running":
        state = "interrupted"  # the driver died (or hangs) without releasing its lease
    else:
        state = {"finished": "incomplete", None: "not started", "running": "interrupted"}.get(
            (run or {}).get("state"), (run or {}).get("state"))
    return {
        "out": store.out,
        "state": state,
        "driver": driver,
        "shards": {"total": n, "done": len(markers), "running": len(running), "failed": len(failed),
                   "stale": len(stale), "pending": max(pending, 0)},
        "identities": {"total": store.n_rows, "done": done_rows, "quarantined": len(quarantined),
                       "valid": done_rows - len(quarantined)},
        "running_shards": sorted(running),
        "failed_shards": {str(k): v for k, v in sorted(failed.items())},
        "stale_shards": sorted(stale),
        "quarantined": quarantined,
        "throughput_identities_per_hour": rate,
        "eta_seconds": eta,
        "run": run,
        "trainer": store.attrs.get("config", {}).get("build", {}).get("trainer"),
    }


def format_status(st: dict) -> str:
    sh, ids = st["shards"], st["identities"]
    state = st["state"]
    driver = st.get("driver")
    if state == "interrupted" and driver:
        state = f"interrupted: driver on {driver['host']} pid {driver['pid']} last seen {_dur(driver['last_seen_s'])} ago"
    lines = [
        f"build {st['out']}  [{state}]  trainer={st['trainer']}",
        f"  shards      {sh['done']}/{sh['total']} done, {sh['running']} running, {sh['failed']} failed, "
        f"{sh['stale']} interrupted, {sh['pending']} pending",
        f"  identities  {ids['done']}/{ids['total']} done, {ids['quarantined']} quarantined, {ids['valid']} valid",
    ]
    rate = st["throughput_identities_per_hour"]
    lines.append("  throughput  " + (f"{rate:,.0f} identities/hour" if rate else "n/a"))
    eta = st["eta_seconds"]
    if st["state"] != "complete":
        lines.append("  eta         " + (_dur(eta) if eta is not None else "n/a")
                     + ("" if st["state"] == "running" else f" (not running: `w2w resume {st['out']}`)"))
    if st["state"] == "running" and driver:
        lines.append(f"  driver      {driver['host']} pid {driver['pid']}, heartbeat {_dur(driver['last_seen_s'])} ago "
                     f"(lease generation {driver['generation']})")
    for s, err in list(st["failed_shards"].items())[:10]:
        lines.append(f"  failed shard {s}: {err}")
    for ident, reason in list(st["quarantined"].items())[:10]:
        lines.append(f"  quarantined {ident}: {reason[:160]}")
    if len(st["quarantined"]) > 10:
        lines.append(f"  ... {len(st['quarantined']) - 10} more quarantined (see --json)")
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
