"""`ray job submit --working-dir . -- w2w build ...` against a real `ray start --head` cluster.

The cluster runs with token auth (RAY_AUTH_MODE=token, token in a temp file named by
RAY_AUTH_TOKEN_PATH): the client side needs the same two variables (docs/RAY.md).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from _raycluster import VENV_BIN, RayCluster, w2w

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "benchmarks/results"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RayCluster(tmp_path_factory.mktemp("rayjob"), dashboard=True)
    yield c
    c.stop()


def test_job_submit_builds_store(cluster, tmp_path):
    from pipeline.builder.store import WeightStore
    from pipeline.data.synthfaces import write_identity_source

    src = write_identity_source(tmp_path / "identities", 6, 2, seed=0)
    out = tmp_path / "store"  # absolute: the job runs in an unpacked copy of the working dir
    env = {**cluster.env, "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": cluster.dashboard_url}
    cmd = [
        f"{VENV_BIN}/ray", "job", "submit", "--working-dir", ".",
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
        "w2w", "build", "conf/tiny.yaml", f"data.source={src}", "data.images_per_identity=2", f"build.out={out}",
        "build.trainer=synthetic", "build.synthetic_layout=tiny", "build.rows_per_shard=2", "build.workers=2",
        "--no-progress",
    ]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in res.stdout + res.stderr
    store = WeightStore.open(str(out), mode="r")
    assert store.done_shards(verify=True) == {0, 1, 2}
    assert len(store.valid_rows()) == 6
    st = json.loads(w2w("status", str(out), "--json", env=cluster.env, cwd=REPO).stdout)
    assert st["state"] == "complete"


def test_job_submit_without_token_is_refused(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    res = subprocess.run(
        [f"{VENV_BIN}/ray", "job", "list", "--address", cluster.dashboard_url],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0
    assert "auth" in (res.stdout + res.stderr).lower()
