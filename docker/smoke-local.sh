#!/usr/bin/env bash
# Build the CPU image and smoke-test it on a machine that reaches no image registry and no
# PyTorch index (only PyPI and Debian's archive), e.g. the development sandbox:
#   make docker-smoke-local          (as root; minutes, CPU-heavy: not part of `make test`)
#
# 1. a Docker daemon: the running one, else `dockerd` is started with its own --data-root
#    (apt-get install docker.io debootstrap) and stopped at the end;
# 2. a local base image: Debian bookworm with python3.11 + venv (debootstrap --variant=minbase),
#    carrying this host's CA bundle so pip in the build reaches PyPI wherever the host does,
#    imported with `docker import` (skipped when $BASE_IMAGE exists already);
# 3. torch==2.13.0 (CPU) from a wheel on disk ($TORCH_WHEELS, default /opt/wheels), served with
#    its dependencies as a PEP 503 index on 127.0.0.1 for the build (--network host); set
#    TORCH_INDEX_URL to use another index instead;
# 4. `docker build` of docker/Dockerfile.cpu with those build args (legacy builder: BuildKit
#    would try to pull its own images), then docker/smoke-run.sh on the image.
# Prints the time of each step and the image size.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-w2w:cpu-local}
BASE_IMAGE=${BASE_IMAGE:-w2w-base:bookworm-py311}
# the Debian mirror this host's apt uses (deb822 sources, else sources.list)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
DOCKER_ROOT=${DOCKER_ROOT:-/var/lib/w2w-docker}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
TORCH_VERSION=$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
NICE=${NICE:-nice -n 19}   # the build shares the machine: lowest CPU priority
export DOCKER_BUILDKIT=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/w2w-docker-local.XXXXXX")
started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started ))s] $*"; }

cleanup() {
    [ -n "${INDEX_PID:-}" ] && kill "$INDEX_PID" 2>/dev/null || true
    [ -n "${DOCKERD_PID:-}" ] && kill "$DOCKERD_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ]; then echo "docker/smoke-local.sh: run as root (dockerd, debootstrap)" >&2; exit 2; fi
for tool in docker dockerd debootstrap; do
    command -v "$tool" >/dev/null || { echo "docker/smoke-local.sh: $tool is missing: apt-get install -y docker.io debootstrap" >&2; exit 2; }
done

if ! docker info >/dev/null 2>&1; then
    step "starting dockerd (--data-root $DOCKER_ROOT)"
    mkdir -p "$DOCKER_ROOT"
    dockerd --data-root "$DOCKER_ROOT" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { cat "$WORK/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1; }
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    step "building the base image $BASE_IMAGE (debootstrap bookworm, python3.11)"
    rootfs="$WORK/rootfs"
    $NICE debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
fi

if [ -z "${TORCH_INDEX_URL:-}" ]; then
    wheel=$(ls "$TORCH_WHEELS"/torch-"$TORCH_VERSION"*cp311*linux*_x86_64.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then
        # torch and its dependencies (pip download with this host's pip configuration), as a
        # PEP 503 index: the Dockerfile installs torch from this index alone, like PyTorch's.
        step "local torch index: $(basename "$wheel") + its dependencies"
        python3 -m pip download -q --only-binary=:all: -d "$WORK/wheels" "$wheel" 2>"$WORK/pip-download.log" \
            || { cat "$WORK/pip-download.log" >&2; exit 1; }
        python3 - "$WORK/wheels" "$WORK/index/simple" <<'EOF'
import os, re, sys
wheels, simple = sys.argv[1:]
for name in sorted(os.listdir(wheels)):
    project = re.sub(r"[-_.]+", "-", name.split("-")[0]).lower()
    os.makedirs(f"{simple}/{project}", exist_ok=True)
    os.symlink(f"{wheels}/{name}", f"{simple}/{project}/{name}")
    with open(f"{simple}/{project}/index.html", "a") as f:
        f.write(f'<a href="{name}">{name}</a>\n')
EOF
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        python3 -m http.server "$port" --bind 127.0.0.1 --directory "$WORK/index" >"$WORK/index.log" 2>&1 &
        INDEX_PID=$!
        TORCH_INDEX_URL="http://127.0.0.1:$port/simple"
    else
        TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
    fi
fi

step "docker build -f docker/Dockerfile.cpu -t $IMAGE (base $BASE_IMAGE, torch from $TORCH_INDEX_URL)"
build_started=$(date +%s)
$NICE docker build --network host -f docker/Dockerfile.cpu -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" .
build_s=$(( $(date +%s) - build_started ))
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')

step "smoke run of $IMAGE"
$NICE bash docker/smoke-run.sh "$IMAGE"

step "done"
echo "image $IMAGE: $(( size / 1000000 )) MB ($size bytes); docker build ${build_s}s; all steps $(( $(date +%s) - started ))s"
