#!/usr/bin/env bash
# Smoke-test a built w2w image: `w2w --help`, a synthetic build (no base model, no images),
# `w2w status`, then a real resume: one shard's completion marker is removed and `w2w resume`
# must redo exactly that shard. The build output lives in a host folder mounted at /out, so
# every step runs in a fresh container, as on a cluster where pods come and go.
#   bash docker/smoke-run.sh IMAGE
# Used by `make docker-smoke` and docker/smoke-local.sh. Needs a Docker daemon.
set -euo pipefail
IMAGE=${1:?usage: docker/smoke-run.sh IMAGE}
DOCKER=${DOCKER:-docker}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/w2w-smoke.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
# --network none: Ray's local cluster talks over loopback inside the container and nothing else.
run() { "$DOCKER" run --rm --network none --shm-size=512m -v "$OUT":/out "$IMAGE" "$@"; }

echo "== w2w --help"
run --help | head -n 3
echo "== w2w build (synthetic trainer, 64 identities, 4 shards)"
run build conf/tiny.yaml build.trainer=synthetic build.synthetic_layout=tiny build.synthetic_identities=64 build.rows_per_shard=16 build.out=/out/smoke build.workers=2 --no-progress
echo "== w2w status"
run status /out/smoke
marker=$(ls "$OUT"/smoke/shards/*.json | head -n 1)
echo "== w2w resume after removing $(basename "$marker")"
rm "$marker"
run resume /out/smoke --no-progress
run status /out/smoke --json > "$OUT/status.json"
python3 - "$OUT/status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
counts = s.get("shards", s)
print("status after resume:", {k: counts.get(k) for k in ("done", "running", "failed", "pending")})
assert counts.get("done") and not counts.get("pending") and not counts.get("failed"), s
EOF
echo "docker smoke: OK ($IMAGE)"
