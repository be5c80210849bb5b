"""A real, private Ray cluster for tests: `ray start --head` in a temp dir, token auth on.

Never `ray stop` (it would stop every Ray process of this user, other sessions' included):
the finalizer kills exactly the processes whose command line names this cluster's temp dir.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_token(path: Path) -> Path:
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path.write_text(generate_new_authentication_token())
    return path


class RayCluster:
    def __init__(self, root: Path, num_cpus: int = 2, dashboard: bool = False, extra_env: dict | None = None):
        # Unix socket paths must stay short: keep the session dir under /tmp.
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="w2wray", dir="/tmp"))
        self.token = make_token(self.root / "token")
        self.port = free_port()
        self.dashboard_port = free_port() if dashboard else None
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            RAY_AUTH_TOKEN_PATH=str(self.token),
            PATH=VENV_BIN + os.pathsep + self.env.get("PATH", ""),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        self.env.update(extra_env or {})  # e.g. object-store credentials: every Ray worker inherits them
        cmd = [
            f"{VENV_BIN}/ray", "start", "--head", "--num-cpus", str(num_cpus), "--port", str(self.port),
            "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 1024 * 1024),
            "--temp-dir", str(self.root / "ray"), "--disable-usage-stats",
            # every fixed default port moved off its default: other sessions may run clusters too
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        ]
        if dashboard:
            cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)]
        else:
            cmd += ["--include-dashboard", "false"]
        # Server side: token auth explicitly on (the client side is left to w2w / RAY_AUTH_MODE).
        env = {**self.env, "RAY_AUTH_MODE": "token"}
        try:
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as err:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{err.stdout}\n{err.stderr}") from err

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def processes(self) -> list[psutil.Process]:
        mark = str(self.root)
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                env = p.info.get("environ") or {}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if p.pid != os.getpid() and (mark in cmdline or env.get("RAY_AUTH_TOKEN_PATH") == str(self.token)):
                found.append(p)
        return found

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def w2w(*args: str, env: dict, cwd=None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([f"{VENV_BIN}/w2w", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float = 60, interval: float = 0.1):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def running_worker_pid(out: Path):
    """pid of a worker that is training a shard of the build at `out` (from its progress file)."""
    import json

    prog = out / "progress"
    for p in sorted(prog.glob("0*.json")) if prog.exists() else []:
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if rec.get("state") == "running" and not (out / "shards" / p.name).exists():
            return rec["pid"]
    return None


def build_killing_a_worker(build_args: list[str], out: Path, env: dict, cwd, timeout: float = 180):
    """Run `w2w build ...`, SIGKILL one worker process mid-shard, return (returncode, stdout, stderr)."""
    import signal

    proc = subprocess.Popen([f"{VENV_BIN}/w2w", "build", *build_args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for(lambda: running_worker_pid(out) or proc.poll() is not None, timeout=timeout)
        assert proc.poll() is None, proc.communicate()
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


def assert_same_store_bytes(out, ref) -> None:
    """The store at `out` equals the one at `ref` byte for byte: every shard's chunk file, marker
    checksum, quarantine list and losses, the manifest, and the class latents where a build wrote
    them. `out` and `ref` are local paths or fsspec URLs."""
    import fsspec

    from pipeline.builder.store import WeightStore

    got, want = WeightStore.open(str(out), mode="r"), WeightStore.open(str(ref), mode="r")
    got_markers, want_markers = got.markers(), want.markers()
    assert sorted(want_markers) == list(range(want.n_shards)), "the reference build is not finished"
    assert sorted(got_markers) == sorted(want_markers), "finished shards differ"
    for s, m in want_markers.items():
        g = got_markers[s]
        assert g.checksum == m.checksum, f"shard {s} checksum differs"
        assert got.fs.cat_file(got.chunk_path(s)) == want.fs.cat_file(want.chunk_path(s)), f"shard {s} chunk bytes differ"
        assert (g.quarantined, g.losses) == (m.quarantined, m.losses), f"shard {s} quarantine/losses differ"
    assert got.manifest().equals(want.manifest()), "manifests differ"
    latents = [fsspec.core.url_to_fs(st.class_latents_path) for st in (got, want)]
    present = [fs.exists(path) for fs, path in latents]
    assert present[0] == present[1], "class latents written by one build only"
    if present[1]:
        assert latents[0][0].cat_file(latents[0][1]) == latents[1][0].cat_file(latents[1][1]), "class latents differ"


@contextlib.contextmanager
def serving(proc: subprocess.Popen, env: dict[str, str]):
    """Export a local test server's endpoint env to this process for the block (clusters started
    inside it pass the same env to their workers), then stop the server."""
    import pytest

    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_server(bucket: str):
    """Start a moto S3 server in its own process; return (process, env for clients and Ray workers).

    A real S3 cannot exist here: moto serves the S3 REST API over HTTP on localhost, and s3fs /
    botocore talk to it exactly as to AWS (AWS_ENDPOINT_URL points them at it).
    """
    import urllib.request

    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
            return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, timeout=60)
    assert proc.poll() is None, "moto server exited"
    req = urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/{bucket}", method="PUT")  # create the bucket
    urllib.request.urlopen(req, timeout=10)
    return proc, env
