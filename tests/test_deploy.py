"""Offline checks of the deployment files (docs/DEPLOY.md). No Kubernetes API is reachable here:
the KubeRay manifests are validated against KubeRay's own ray.io/v1 CRD schemas, vendored as JSON
Schema by docker/kuberay/schema/vendor_crds.py (the kuberay commit is recorded in each file), so
a field KubeRay accepts is accepted here and one it rejects is rejected. The Dockerfiles are
parsed here; building and running the image is `make docker-smoke-local` (minutes, not in `make test`)."""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.cli import build_parser
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
KUBERAY = DOCKER / "kuberay"


# ---------------------------------------------------------------- Dockerfiles
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerignored(name: str) -> bool:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    ignored = False
    for p in patterns:
        negate = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        if name == p or name.startswith(p + "/"):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name, base", [("Dockerfile", "nvidia/cuda:"), ("Dockerfile.cpu", "python:3.11-slim")])
def test_dockerfile_structure(name, base):
    ins = instructions(DOCKER / name)
    assert ins[0][0] in ("FROM", "ARG")
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) == 1
    # the base is a build arg (a local or mirrored base where the public one cannot be pulled)
    # whose default is the intended public image
    assert froms[0] == "${BASE_IMAGE}"
    assert dict(a.split("=", 1) for op, a in ins[: ins.index(("FROM", froms[0]))] if op == "ARG")["BASE_IMAGE"].startswith(base)
    # no `# syntax=` directive: BuildKit would pull a frontend image for it, which fails offline
    assert not (DOCKER / name).read_text().startswith("# syntax")
    entry = [a for op, a in ins if op == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["w2w"]  # exec form

    runs = [a for op, a in ins if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (\.|\"\.\[[\w,]+\]\")(\s|$)", r))
    assert torch_at < project_at, "torch must be installed alone, before the project"
    torch_run = runs[torch_at]
    assert "--index-url ${TORCH_INDEX_URL}" in torch_run and " . " not in torch_run + " "
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    pinned = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert args["TORCH_VERSION"] == pinned
    assert args["TORCH_INDEX_URL"].endswith("/cpu" if name.endswith(".cpu") else "/cu128")

    copies = [a.split() for op, a in ins if op == "COPY"]
    assert copies
    for parts in copies:
        parts = [p for p in parts if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"{name}: COPY source {src} does not exist"
            assert not dockerignored(src), f"{name}: COPY source {src} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    for heavy in (".git", ".venv", "runs", "tests"):
        assert dockerignored(heavy)
    for needed in ("pyproject.toml", "w2w_core", "pipeline", "jobs", "conf"):
        assert not dockerignored(needed)


def recipe(target: str) -> str:
    return (REPO / "Makefile").read_text().split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]


def test_docker_smoke_targets():
    assert "docker/Dockerfile.cpu" in recipe("docker-smoke") and "docker/smoke-run.sh" in recipe("docker-smoke")
    assert "docker/smoke-local.sh" in recipe("docker-smoke-local")
    assert "docker" not in recipe("test")  # minutes of image build: never part of `make test`
    local = (DOCKER / "smoke-local.sh").read_text()
    assert "--build-arg BASE_IMAGE=" in local and "--build-arg TORCH_INDEX_URL=" in local
    assert "docker/smoke-run.sh" in local and "nice -n 19" in local
    for script in ("smoke-run.sh", "smoke-local.sh"):
        subprocess.run(["bash", "-n", str(DOCKER / script)], check=True)  # parses


def test_smoke_run_commands_are_valid():
    """The image's ENTRYPOINT is w2w: `docker run IMAGE build conf/tiny.yaml ...` = `w2w build ...`."""
    text = (DOCKER / "smoke-run.sh").read_text()
    commands = [shlex.split(m.group(1)) for m in re.finditer(r"^run ([^|>\n]+)", text, re.M)]
    assert [c[0] for c in commands] == ["--help", "build", "status", "resume", "status"]
    parser = build_parser()
    args = parser.parse_args(commands[1])
    cfg = load_config(REPO / args.config, args.overrides)
    assert cfg.build.trainer == "synthetic" and cfg.build.synthetic_identities > 0  # no base model, no images
    out = cfg.build.out
    assert out.startswith("/out/") and cfg.build.synthetic_identities // cfg.build.rows_per_shard >= 2
    for argv in commands[2:]:
        assert parser.parse_args(argv).out == out


# ---------------------------------------------------------------- KubeRay manifests
def load(name):
    return yaml.safe_load((KUBERAY / name).read_text())


def validator(kind):
    schema = json.loads((KUBERAY / "schema" / f"{kind}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


MANIFESTS = [("raycluster.yaml", "raycluster"), ("rayjob.yaml", "rayjob")]


def cluster_spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_schemas_are_the_vendored_kuberay_crds():
    """The schemas come from a named kuberay commit, not from hand transcription."""
    for kind, crd in (("raycluster", "ray.io_rayclusters.yaml"), ("rayjob", "ray.io_rayjobs.yaml")):
        schema = json.loads((KUBERAY / "schema" / f"{kind}.schema.json").read_text())
        assert re.search(rf"ray-project/kuberay@[0-9a-f]{{40}}:ray-operator/config/crd/bases/{crd}", schema["$comment"])
        assert "Generated by docker/kuberay/schema/vendor_crds.py" in schema["$comment"]


@pytest.mark.parametrize("name, kind", MANIFESTS)
def test_manifest_validates(name, kind):
    doc = load(name)
    errors = sorted(validator(kind).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("name, kind", MANIFESTS)
def test_manifest_policy(name, kind):
    spec = cluster_spec(load(name))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # no training on the head
    images = {c["image"] for c in head["template"]["spec"]["containers"]}
    workers = spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            images.add(c["image"])
            res = c["resources"]
            gpus = int(group["rayStartParams"]["num-gpus"])
            assert int(res["requests"]["nvidia.com/gpu"]) == int(res["limits"]["nvidia.com/gpu"]) == gpus >= 1
    assert len(images) == 1, f"head and workers must run the same image, got {images}"


def _head_container(doc):
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _head_volumes(doc):
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize(
    "name, kind, breakage",
    [
        ("raycluster.yaml", "raycluster", lambda d: d["spec"].pop("headGroupSpec")),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=4)),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName")),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0})),
        ("raycluster.yaml", "raycluster", lambda d: d.update(apiVersion="ray.io/v1alpha1")),
        ("raycluster.yaml", "raycluster",
         lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
             {"nvidia.com/gpu": "one"})),
        ("raycluster.yaml", "raycluster", lambda d: d["metadata"].update(name="w" * 54)),
        ("raycluster.yaml", "raycluster", lambda d: d["metadata"].update(name="w2w.build")),
        ("raycluster.yaml", "raycluster", lambda d: d["metadata"].update(name="2w-build")),
        ("raycluster.yaml", "raycluster", lambda d: _head_volumes(d).append({"name": "h", "hostPath": {"type": "Directory"}})),
        ("raycluster.yaml", "raycluster", lambda d: _head_volumes(d).append({"name": "n", "nfs": {"path": "/x"}})),
        ("raycluster.yaml", "raycluster", lambda d: _head_volumes(d).append({"name": "c", "csi": {"readOnly": True}})),
        ("raycluster.yaml", "raycluster", lambda d: _head_container(d).pop("name")),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"].update(upgradeStrategy={"type": "Rolling"})),
        ("rayjob.yaml", "rayjob", lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec")),
        ("rayjob.yaml", "rayjob", lambda d: d["spec"].update(shutdownAfterJobFinish=True)),
        ("rayjob.yaml", "rayjob", lambda d: d["spec"].update(shutdownAfterJobFinishes="yes")),
        ("rayjob.yaml", "rayjob", lambda d: d["metadata"].update(name="j" * 48)),
        ("rayjob.yaml", "rayjob", lambda d: d["spec"].update(preRunningDeadlineSeconds="10m")),
        ("rayjob.yaml", "rayjob", lambda d: _head_container(d).update(imagee="x")),
    ],
    ids=["no-head", "typo-maxReplica", "no-groupName", "int-rayStartParam", "old-apiVersion", "bad-quantity",
         "name-54-chars", "name-with-dot", "name-leading-digit", "hostPath-no-path", "nfs-no-server", "csi-no-driver",
         "container-no-name", "bad-upgradeStrategy", "job-no-head", "typo-shutdown", "shutdown-not-bool",
         "job-name-48-chars", "deadline-not-int", "typo-container-field"],
)
def test_broken_manifest_fails(name, kind, breakage):
    doc = copy.deepcopy(load(name))
    breakage(doc)
    assert list(validator(kind).iter_errors(doc)), "the schema accepted a broken manifest"


@pytest.mark.parametrize(
    "name, kind, change",
    [
        # fields of the real CRDs that a hand-written subset had rejected
        ("rayjob.yaml", "rayjob", lambda d: d["spec"].update(preRunningDeadlineSeconds=600, activeDeadlineSeconds=86400)),
        ("rayjob.yaml", "rayjob", lambda d: d["spec"].update(submissionMode="SidecarMode")),  # no enum in the CRD
        ("rayjob.yaml", "rayjob", lambda d: d["metadata"].update(name="j" * 47)),
        ("raycluster.yaml", "raycluster", lambda d: d["metadata"].update(name="w" * 53)),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"].update(
            authOptions={"mode": "token"}, upgradeStrategy={"type": "Recreate"}, networkPolicy={})),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(
            labels={"ray.io/accelerator": "h100"}, idleTimeoutSeconds=120)),
        ("raycluster.yaml", "raycluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(
            nodeSelector={"pool": "cpu"}, priorityClassName="batch", serviceAccountName="w2w",
            terminationGracePeriodSeconds=30)),
        ("raycluster.yaml", "raycluster", lambda d: _head_container(d).update(imagePullPolicy="Never")),
        ("raycluster.yaml", "raycluster", lambda d: _head_volumes(d).append(
            {"name": "n", "nfs": {"server": "nfs.local", "path": "/exports/w2w"}})),
    ],
    ids=["job-deadlines", "sidecar-mode", "job-name-47-chars", "name-53-chars", "auth-upgrade-netpol",
         "group-labels", "podspec-fields", "pull-never", "nfs-volume"],
)
def test_valid_variants_pass(name, kind, change):
    """The schemas are not stricter than KubeRay: real fields and limits pass."""
    doc = copy.deepcopy(load(name))
    change(doc)
    errors = list(validator(kind).iter_errors(doc))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_rayjob_entrypoint_is_a_valid_w2w_command():
    spec = load("rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "w2w"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "build" and args.config == "conf/sd15.yaml"
    cfg = load_config(REPO / args.config, args.overrides)
    assert cfg.build.out.startswith("s3://") and cfg.build.ray_address == "auto"
    assert cfg.model.path.startswith("/models/") and cfg.data.source.startswith("/data/")
    # the paths the entrypoint names are the ones the pods mount
    mounts = {m["mountPath"] for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c["volumeMounts"]}
    assert {"/models", "/data"} <= mounts
