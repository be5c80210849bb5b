#!/usr/bin/env bash
# Issue 16's GPU extension / issue 14's inversion lever, in one device call (docs/QUALITY_SCALING.md):
# build a SynthFaces space of N_MAX tiny-world models on one GPU with conf/tiny.yaml's recipe (in-process,
# no Ray: run_build(local=True)), then measure quality on nested subsets (benchmarks/quality_scaling.py),
# inversion in every PC each subset gives (K = N - 1), directions and sampling in the first 64.
#
#   OUT=/some/dir bash benchmarks/gpu_quality_scaling.sh
#
# MEASURE (default inversion) picks what quality_scaling.py measures per N (--measure): inversion alone
# keeps an N to well under a minute on a GPU, where the full curve cost minutes per N (2026-11-26 run).
#
# Every stage is time-capped so that one lease returns numbers: the build stops after BUILD_S seconds and
# the curve then uses the models that finished (finished shards are complete; nothing half-written);
# the curve's JSON is rewritten after every N. CPU smoke test (a minute):
#   OUT=/tmp/gq N_MAX=24 NS=12,24 DEVICE=cpu STEPS=3 RENDER_STEPS=2 INVERT_STEPS=2 INVERT_IDS=2 \
#       PIP=0 bash benchmarks/gpu_quality_scaling.sh
set -euo pipefail
OUT=${OUT:?set OUT}
PY=${PY:-python3}
N_MAX=${N_MAX:-2048}
NS=${NS:-256,512,1024,2048}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-512}
BUILD_S=${BUILD_S:-240}
CURVE_S=${CURVE_S:-240}
SYNTH_PROCS=${SYNTH_PROCS:-8}
INVERT_IDS=${INVERT_IDS:-16}
MEASURE=${MEASURE:-inversion}
EDIT_SWEEP=${EDIT_SWEEP:-}     # with MEASURE containing editing: e.g. 3,4,5,6 (the report's sweep)
EDIT_MODELS=${EDIT_MODELS:-8}
SAMPLE_MODELS=${SAMPLE_MODELS:-16}
INVERT_STEPS=${INVERT_STEPS:-200}
RENDER_STEPS=${RENDER_STEPS:-25}
WORK=${WORK:-/tmp/gq_work}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date +%T)] $*"; }

if [ "${PIP:-1}" = 1 ]; then  # the device image lacks these; the wheels travel in .whl (git-ignored)
  $PY -m pip install -q --no-index --find-links .whl zarr==3.1.6 "dask[array]==2026.8.0" diffusers==0.42.1 \
      omegaconf==2.4.0 > "$OUT/pip.log" 2>&1 || { tail -n 20 "$OUT/pip.log"; exit 1; }
fi
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# 1. identities: SYNTH_PROCS processes, each its own index range, merged into one source folder
log "synth $N_MAX identities x 10 images in $SYNTH_PROCS processes"
per=$(( (N_MAX + SYNTH_PROCS - 1) / SYNTH_PROCS ))
rm -rf "$WORK/parts" "$WORK/ids"
for j in $(seq 0 $((SYNTH_PROCS - 1))); do
  start=$((j * per)); n=$(( N_MAX - start < per ? N_MAX - start : per ))
  [ "$n" -gt 0 ] && $PY -m jobs.cli synth "$WORK/parts/p$j" --identities "$n" --start-index "$start" --images 10 \
      > "$WORK/synth$j.log" 2>&1 &
done
wait
$PY - "$WORK" <<'EOF'
import sys
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
work = Path(sys.argv[1]); ids = work / "ids"; ids.mkdir()
parts = sorted((work / "parts").iterdir(), key=lambda p: int(p.name[1:]))
tables = []
for part in parts:
    tables.append(pq.read_table(part / "attributes.parquet"))
    for d in part.iterdir():
        if d.is_dir():
            d.rename(ids / d.name)
pq.write_table(pa.concat_tables(tables), ids / "attributes.parquet")
print("merged", sum(t.num_rows for t in tables), "identities")
EOF

# 2. the build, time-capped (a stopped build keeps its finished shards); not quality_scaling.py --build,
#    whose cap would also end the curve
log "build (cap ${BUILD_S}s)"
build_started=$SECONDS
sets=("data.source=$WORK/ids" "model.device=$DEVICE" "train.identities_per_batch=$BATCH" "build.rows_per_shard=$BATCH")
[ -n "${STEPS:-}" ] && sets+=("train.steps=$STEPS")
timeout "$BUILD_S" $PY - "$WORK/space" "${sets[@]}" <<'EOF' 2>&1 | tail -n 30 > "$OUT/build.log" || true
import sys, time
from pipeline.builder.builder import run_build
from pipeline.config import load_config
out, sets = sys.argv[1], sys.argv[2:]
cfg = load_config("conf/tiny.yaml", [*sets, f"build.out={out}"])
t0 = time.time()
summary = run_build(cfg, progress_bar=False, log=lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", flush=True), local=True)
print("BUILD DONE", summary.seconds, "s; failed:", summary.failed, flush=True)
EOF
tail -n 4 "$OUT/build.log"
valid=$($PY -c "from pipeline.builder.store import WeightStore; print(WeightStore.open('$WORK/space', mode='r').valid_rows().size)")
log "models built: $valid in $((SECONDS - build_started)) s (model load, class latents and the cap's unfinished shard included)"
ns=$($PY -c "print(','.join([n for n in '$NS'.split(',') if int(n) < $valid] + ['$valid']))")

# 3. the curve, K = N - 1 (inversion in every PC; directions and sampling in the config's first 64)
log "curve at N = $ns (cap ${CURVE_S}s)"
timeout "$CURVE_S" $PY benchmarks/quality_scaling.py "$WORK/space" --ns "$ns" --components 100000 \
    --invert-identities "$INVERT_IDS" --invert-steps "$INVERT_STEPS" --render-steps "$RENDER_STEPS" --measure "$MEASURE" \
    --edit-sweep "$EDIT_SWEEP" --edit-models "$EDIT_MODELS" --sample-models "$SAMPLE_MODELS" \
    --json "$OUT/quality_scaling_gpu.json" --table "$OUT/quality_scaling_gpu.md" > "$OUT/curve.log" 2>&1 || true
grep -E "scaling: N=[0-9]+ done|Error|error" "$OUT/curve.log" | cut -c1-400 | tail -n 20
cat "$OUT/quality_scaling_gpu.md" 2>/dev/null || true
log "done"
