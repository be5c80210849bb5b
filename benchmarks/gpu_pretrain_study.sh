#!/usr/bin/env bash
# Issue 14's base-model study on one lent GPU, in one call (docs/TINY_WORLD.md, "A better base model"):
# one VAE, then three UNet + text-encoder pretrainings side by side on the same GPU (the tiny model
# is launch-bound, so three processes overlap almost for free):
#   long_traits  : ~2.5 min at batch 256, captions name attributes + traits
#   long_attrs   : the same compute, captions name the attributes only
#   short_traits : the CPU recipe's compute (1800 steps x 32), captions with traits
# Usage: OUT=/some/dir bash benchmarks/gpu_pretrain_study.sh   (PYTHONPATH must reach the repo)
set -euo pipefail
OUT=${OUT:?set OUT}
PY=${PY:-python3}
UNET_MIN=${UNET_MIN:-2.5}
export PYTHONUNBUFFERED=1
common="--seed 0 --identities 3000 --images 8 --device cuda --data-workers 5"
$PY -m jobs.pretrain_tiny --out "$OUT/vae" $common --vae-steps 4000 --vae-batch 64 --vae-minutes 1.0 \
    --unet-steps 1 --unet-minutes 0 > "$OUT/vae.log" 2>&1
tail -n 2 "$OUT/vae.log"
$PY -m jobs.pretrain_tiny --out "$OUT/long_traits" $common --vae-from "$OUT/vae" --captions traits \
    --unet-steps 40000 --unet-batch 256 --unet-minutes "$UNET_MIN" > "$OUT/long_traits.log" 2>&1 &
$PY -m jobs.pretrain_tiny --out "$OUT/long_attrs" $common --vae-from "$OUT/vae" --captions attributes \
    --unet-steps 40000 --unet-batch 256 --unet-minutes "$UNET_MIN" > "$OUT/long_attrs.log" 2>&1 &
$PY -m jobs.pretrain_tiny --out "$OUT/short_traits" $common --vae-from "$OUT/vae" --captions traits \
    --unet-steps 1800 --unet-batch 32 --unet-minutes "$UNET_MIN" > "$OUT/short_traits.log" 2>&1 &
wait
for r in long_traits long_attrs short_traits; do tail -n 1 "$OUT/$r.log" | cut -c1-600; done
# one archive: the device tool returns only a few files per call (the first run of this script lost
# its weights that way: only 8 of 44 files came back)
tar -C "$OUT" -cf "$OUT/models.tar" vae long_traits long_attrs short_traits
rm -rf "$OUT/vae" "$OUT/long_traits" "$OUT/long_attrs" "$OUT/short_traits"
