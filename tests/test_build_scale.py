"""benchmarks/build_scale.py at a small size, so CI runs the scale simulation's code path.

Synthetic trainer, SD1.5 layout (D = 99,648) without a model, virtual identities, a local Ray
started by the builder itself. The full-size run is documented in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_build_scale_small(tmp_path):
    out_json = tmp_path / "scale.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    res = subprocess.run(
        [sys.executable, "benchmarks/build_scale.py", "--identities", "48", "--rows-per-shard", "16",
         "--workers", "2", "--no-interrupt", "--out", str(tmp_path / "scale"), "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out_json.read_text())
    assert r["identities"] == 48 and r["shards"] == 3 and r["numel"] == 99_648
    for key in ("plan_seconds", "build_seconds", "status_seconds", "resume_noop_verify_seconds",
                "resume_noop_noverify_seconds", "mean_zarr_write_s_per_shard", "identities_per_hour"):
        assert r[key] > 0, key
    assert not (tmp_path / "scale").exists()  # removed without --keep
