#!/usr/bin/env bash
# Issue 14's base-model study on one lent GPU, in one call (docs/TINY_WORLD.md, "A longer-pretrained base"):
# three UNet + text-encoder pretrainings side by side on the committed VAE, in three processes on
# one GPU (how much they slow each other was not measured). Hypothesis: the committed UNet
# (4000 steps x 32 on a CPU) is under-trained; with 5-7x the samples smiling and bangs follow the prompt
# and beards are drawn visibly, which the smiling direction and the beard edit need.
#   b256      : batch 256, lr 1.5e-3 (the committed recipe's lr), 3000 identities x 8 images
#   b512      : batch 512, lr 2e-3, same data
#   b256_6k   : batch 256, lr 1.5e-3, 6000 identities x 8 images (more data, same compute)
# Each ends at STEPS or UNET_MIN minutes, whichever comes first (pretrain_meta.json records which).
# Usage: OUT=/some/dir bash benchmarks/gpu_pretrain_study.sh   (PYTHONPATH must reach the repo)
set -euo pipefail
OUT=${OUT:?set OUT}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-3000}
UNET_MIN=${UNET_MIN:-5.5}
IDS=${IDS:-3000}
WORKERS=${WORKERS:-4}
export PYTHONUNBUFFERED=1
common="--seed 0 --images 8 --device $DEVICE --data-workers $WORKERS --vae-from w2w_core/assets/tiny --captions traits"
common="$common --unet-steps $STEPS --unet-minutes $UNET_MIN"
$PY -m jobs.pretrain_tiny --out "$OUT/b256" $common --identities "$IDS" --unet-batch 256 --unet-lr 1.5e-3 \
    > "$OUT/b256.log" 2>&1 &
$PY -m jobs.pretrain_tiny --out "$OUT/b512" $common --identities "$IDS" --unet-batch 512 --unet-lr 2e-3 \
    > "$OUT/b512.log" 2>&1 &
$PY -m jobs.pretrain_tiny --out "$OUT/b256_6k" $common --identities $((2 * IDS)) --unet-batch 256 --unet-lr 1.5e-3 \
    > "$OUT/b256_6k.log" 2>&1 &
wait
# one archive per model: the device tool returns at most 8 files of 16 MiB each
for r in b256 b512 b256_6k; do
    tail -n 1 "$OUT/$r.log" | cut -c1-400
    tar -C "$OUT" -cf "$OUT/$r.tar" "$r" && rm -rf "${OUT:?}/$r"
done
