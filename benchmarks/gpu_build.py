"""GPU build benchmark (issue 10): how fast can the dataset be built on one GPU?

SD1.5-shape UNet (random init), 64x64 latents, 77x768 text embeddings, prior preservation.
Runs, in one process on the same device:
  * the peft reference trainer at batch 1 and batch 2 (one identity at a time),
  * the batched multi-LoRA trainer for K = 8, 16, 32, 64, 128 (OOM rows are reported, not fatal),
  * toggles at one K (--toggle-k): bf16 autocast off/on, bf16 base weights, channels_last,
    fused AdamW, torch.compile, less frequent host syncs.

    python benchmarks/gpu_build.py --json runs/bench/gpu_build.json
    python benchmarks/gpu_build.py --device cpu --latent-size 8 --sd15-channels 32,64,64,64 --steps 1 \
        --ks 2 --toggle-k 2 --toggles fp32,bf16_base,channels_last,fused_adam   # CPU smoke test
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

from pipeline.train.batched import BatchedOptions  # noqa: E402

TOGGLES = ("fp32", "bf16_base", "channels_last", "fused_adam", "compile", "sync_every_10")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toggle-k", type=int, default=32, help="K at which the toggles are compared (0 = skip)")
    p.add_argument("--toggles", default=",".join(TOGGLES), help=f"subset of {TOGGLES}")
    own, rest = p.parse_known_args(argv)
    defaults = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--sd15", "--ks", "8,16,32,64,128",
                "--ref-batch-sizes", "1,2", "--steps", "10", "--warmup-steps", "2"]
    args = tt.build_parser().parse_args(defaults + rest)
    torch.set_grad_enabled(True)
    result = tt.run(args)
    base, layout, ctx, size = result["base"], result["layout"], result["ctx"], result["size"]
    rows = result["rows"]
    K = own.toggle_k
    toggles = [t for t in own.toggles.split(",") if t]
    unknown = set(toggles) - set(TOGGLES)
    if unknown:
        raise SystemExit(f"unknown toggles {sorted(unknown)}; choose from {TOGGLES}")
    base_opts = dict(channels_last=args.channels_last, compile=args.compile, fused_adam=args.fused_adam,
                     sync_every=args.sync_every)
    for toggle in toggles if K > 0 else []:
        opts, mp = dict(base_opts), None
        if toggle == "fp32":
            mp = "no"
        elif toggle in ("channels_last", "fused_adam", "compile"):
            opts[toggle] = True
        elif toggle == "sync_every_10":
            opts["sync_every"] = 10
        restore = None
        if toggle == "bf16_base":
            restore = base.dtype
            base.unet.to(torch.bfloat16)
            base.dtype = torch.bfloat16
        try:
            row = tt.time_batched(base, layout, ctx, args, size, K, BatchedOptions(**opts), label=f"batched K={K} +{toggle}", mp=mp)
            fps = result["machine"].get("flop_per_sample", 0.0)
            if fps:
                row["tflops"] = row["samples_per_s"] * fps / 1e12
                peak = tt.peak_tflops(args)
                if peak:
                    row["mfu"] = row["tflops"] / peak
            rows.append(row)
            print(tt._fmt(row, rows), flush=True)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"config": f"batched K={K} +{toggle}", "trainer": "batched", "K": K, "error": "OOM"})
        except Exception as err:  # a toggle that does not work here (e.g. compile without a compiler)
            rows.append({"config": f"batched K={K} +{toggle}", "trainer": "batched", "K": K,
                         "error": f"{type(err).__name__}: {str(err)[:80]}"})
            print(f"batched K={K} +{toggle}: {err}", flush=True)
        finally:
            if restore is not None:
                base.unet.to(restore)
                base.dtype = restore
    import json

    print(json.dumps(result["machine"]))
    print(tt.markdown(result))
    tt.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
