"""GPU build benchmark (issue 15): how fast can the dataset be built on one GPU?

SD1.5-shape UNet (random init), 64x64 latents, 77x768 text embeddings, prior preservation, the
recipe's precision (bf16 base weights, bf16 autocast, fp32 LoRA parameters). Everything runs in
ONE process on the same device, so every ratio below is measured side by side:

  1. the peft reference trainer at batch 1 and 2 (one identity at a time);
  2. the batched multi-LoRA trainer for K = 8, 16, 32, 64, 128, then the largest K that fits
     (doubling past the list, or one bisection step below the first OOM);
  3. toggles at the best K: fp32 base weights (autocast only), bf16 without autocast, channels_last, fused AdamW,
     host loss sync every 10 steps, the toggles that helped combined, torch.compile (last,
     only when the time budget allows: it recompiles per call);
  4. a torch.profiler trace of 3 steps at the best K, kernels grouped by kind (GEMM/conv,
     attention, normalisation, elementwise, optimizer, copies) and the GPU-busy fraction;
  5. single-image inversion at SD1.5 shape: 400 Adam steps on 10,000 PC coefficients
     (w2w_core.invert.invert, the code `w2w invert` runs), next to the published ~55 s on an A100.

Rows are written to --json after every measurement, so a run cut short still reports.

    python benchmarks/gpu_build.py --json $OUT/gpu_build.json --profile-out $OUT/profile.txt --time-budget-s 420
    # CPU smoke test of every code path (seconds):
    python benchmarks/gpu_build.py --device cpu --sd15-channels 32,64,64,64 --latent-size 8 --steps 1 \\
        --warmup-steps 1 --ks 2,4 --max-k 8 --inversion-steps 3 --inversion-components 16 --profile-steps 1
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

from pipeline.train.batched import BatchedOptions, train_batched  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402

# toggle -> how it changes (BatchedOptions fields, base weight dtype)
TOGGLES = ("fp32_base", "no_autocast", "channels_last", "fused_adam", "sync_every_10", "compile")
COMBINABLE = ("channels_last", "fused_adam", "sync_every_10")
# no_autocast: the bf16 base runs in bf16 end to end. Under autocast, CUDA runs group_norm and
# layer_norm in fp32, so every norm casts its input up and the next conv casts it back: casts and
# copies were a third of the kernel time at K=64 on an H200 (docs/BENCHMARKS.md). Not yet measured.
KERNEL_KINDS = (  # first match wins; names are lower-cased CUDA kernel names
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("normalisation", ("norm",)),
    ("gemm/conv", ("gemm", "xmma", "cutlass", "nvjet", "conv", "wgrad", "dgrad", "fprop", "implicit", "cudnn", "sm90")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "cat")),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled", "index", "gelu", "silu", "mul", "add")),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--toggle-k", type=int, default=-1, help="K for the toggles (-1: the best K measured; 0: skip)")
    p.add_argument("--toggles", default=",".join(TOGGLES), help=f"subset of {TOGGLES}")
    p.add_argument("--max-k", type=int, default=512, help="stop the largest-K search here")
    p.add_argument("--compile-min-s", type=float, default=150.0,
                   help="run the torch.compile toggle only if this much of --time-budget-s is left")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps at the best K (0 = no profile)")
    p.add_argument("--profile-out", default="", help="write the profiler's kernel table here")
    p.add_argument("--inversion-steps", type=int, default=400, help="0 = skip the inversion timing")
    p.add_argument("--inversion-components", type=int, default=10_000)
    p.add_argument("--inversion-modes", default="eager",
                   help="comma list of eager|compile, each optionally :STEPS (default --inversion-steps), "
                        "e.g. eager:100,compile:400; compared per step in the same process")
    return p


def main(argv=None) -> dict:
    own_parser = build_parser()
    own, rest = own_parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        own_parser.print_help()
        tt.build_parser().print_help()
        raise SystemExit(0)
    cuda = torch.cuda.is_available()
    defaults = ["--device", "cuda" if cuda else "cpu", "--sd15", "--ks", "8,16,32,64,128",
                "--ref-batch-sizes", "1,2", "--steps", "10", "--warmup-steps", "2"]
    if cuda:
        defaults.append("--base-bf16")  # the recipe: conf/sd15.yaml model.dtype = bfloat16
    args = tt.build_parser().parse_args(defaults + rest)
    args.started_at = time.monotonic()
    torch.set_grad_enabled(True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = tt.run(args)
    base, layout, ctx, size = result["base"], result["layout"], result["ctx"], result["size"]
    rows, info = result["rows"], result["machine"]
    info["base_dtype"] = str(base.dtype).replace("torch.", "")
    fps, peak = info.get("flop_per_sample", 0.0), tt.peak_tflops(args)
    info["peak_tflops"] = peak

    def emit(row: dict) -> dict:
        if fps and "samples_per_s" in row:
            row["tflops"] = row["samples_per_s"] * fps / 1e12
            if peak:
                row["mfu"] = row["tflops"] / peak
        rows.append(row)
        print(tt._fmt(row, rows) if "samples_per_s" in row else f"{row['config']}: {row.get('error', '')}", flush=True)
        save()
        return row

    def save() -> None:
        tt.write_json({"machine": info, "rows": rows}, args.json)

    base_opts = BatchedOptions(channels_last=args.channels_last, compile=args.compile, fused_adam=args.fused_adam,
                               sync_every=args.sync_every)

    def measure(K: int, label: str, options: BatchedOptions, base_dtype: torch.dtype | None = None,
                mp: str | None = None) -> dict:
        if tt.over_budget(args):
            return emit({"config": label, "trainer": "batched", "K": K, "error": "skipped: time budget"})
        restore = base.dtype
        if base_dtype is not None and base_dtype != base.dtype:
            base.unet.to(base_dtype)
            base.dtype = base_dtype
        try:
            return emit(tt.time_batched(base, layout, ctx, args, size, K, options, label=label, mp=mp))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return emit({"config": label, "trainer": "batched", "K": K, "error": "OOM"})
        except Exception as err:  # a toggle that does not work here (e.g. compile without a compiler)
            return emit({"config": label, "trainer": "batched", "K": K, "error": f"{type(err).__name__}: {str(err)[:120]}"})
        finally:
            if base.dtype != restore:
                base.unet.to(restore)
                base.dtype = restore

    # -- 2. the largest K that fits
    batched = [r for r in rows if r["trainer"] == "batched" and r["config"].startswith("batched K=")]
    fits = sorted(r["K"] for r in batched if "step_s" in r)
    ooms = sorted(r["K"] for r in batched if r.get("error") == "OOM")
    if fits and not ooms:
        K = fits[-1] * 2
        while K <= own.max_k and not tt.over_budget(args):
            row = measure(K, f"batched K={K}", base_opts)
            if "step_s" not in row:
                break
            fits.append(K)
            K *= 2
    elif fits and ooms and ooms[0] > fits[-1] + 8:
        mid = (fits[-1] + ooms[0]) // 2 // 8 * 8
        if "step_s" in measure(mid, f"batched K={mid}", base_opts):
            fits.append(mid)
    largest = max(fits) if fits else 0
    info["largest_k_that_fits"] = largest

    ok = [r for r in rows if r["trainer"] == "batched" and "step_s" in r and r["config"].startswith("batched K=")]
    best = max(ok, key=lambda r: (round(r["samples_per_s"], 6), -r["K"])) if ok else None
    K = (best["K"] if best else 0) if own.toggle_k < 0 else own.toggle_k
    info["best_k"] = K

    # -- 3. toggles at the best K
    toggles = [t for t in own.toggles.split(",") if t]
    unknown = set(toggles) - set(TOGGLES)
    if unknown:
        raise SystemExit(f"unknown toggles {sorted(unknown)}; choose from {TOGGLES}")
    reference = best if (best and best["K"] == K) else None
    helped = []
    for toggle in [t for t in toggles if t != "compile"] if K > 0 else []:
        opts, dtype, mp = BatchedOptions(**vars(base_opts)), None, None
        if toggle == "fp32_base":
            dtype = torch.float32
        elif toggle == "no_autocast":
            mp = "no"
        elif toggle == "sync_every_10":
            opts.sync_every = 10
        else:
            setattr(opts, toggle, True)
        row = measure(K, f"batched K={K} +{toggle}", opts, dtype, mp)
        if reference and "samples_per_s" in row and toggle in COMBINABLE and row["samples_per_s"] > 1.01 * reference["samples_per_s"]:
            helped.append(toggle)
    if len(helped) > 1:
        opts = BatchedOptions(**vars(base_opts))
        for toggle in helped:
            if toggle == "sync_every_10":
                opts.sync_every = 10
            else:
                setattr(opts, toggle, True)
        measure(K, f"batched K={K} +" + "+".join(helped), opts)
    info["toggles_that_helped"] = helped

    # -- 4. profile at the best K
    if K > 0 and own.profile_steps > 0 and not tt.over_budget(args):
        try:
            info["profile"] = profile_batched(base, layout, ctx, args, size, K, base_opts, own.profile_steps, own.profile_out)
            print("profile:", json.dumps(info["profile"]), flush=True)
        except Exception as err:
            info["profile"] = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
        save()

    # -- 5. inversion at SD1.5 shape
    if own.inversion_steps > 0 and not tt.over_budget(args):
        try:
            info["inversion"] = {}
            inv_base = sd15_inversion_base(base, args, size)
            for mode in [m for m in own.inversion_modes.split(",") if m]:
                name, _, steps = mode.partition(":")
                if name not in ("eager", "compile"):
                    raise SystemExit(f"unknown inversion mode {name!r}; choose eager or compile")
                if tt.over_budget(args):
                    info["inversion"][name] = {"error": "skipped: time budget"}
                    continue
                info["inversion"][name] = time_inversion(inv_base, layout, size, int(steps or own.inversion_steps),
                                                         own.inversion_components, compile=name == "compile")
                print(f"inversion ({name}):", json.dumps(info["inversion"][name]), flush=True)
                save()
        except Exception as err:
            info["inversion"] = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
            print("inversion failed:", info["inversion"]["error"], flush=True)
        save()

    # -- 3b. torch.compile last: it is the slowest to set up and may not fit the budget
    if "compile" in toggles and K > 0:
        left = args.time_budget_s - (time.monotonic() - args.started_at) if args.time_budget_s else math.inf
        if left >= own.compile_min_s:
            measure(K, f"batched K={K} +compile", BatchedOptions(**{**vars(base_opts), "compile": True}))
        else:
            emit({"config": f"batched K={K} +compile", "trainer": "batched", "K": K,
                  "error": f"skipped: {left:.0f} s of the time budget left, needs {own.compile_min_s:.0f} s"})

    info["wall_s"] = time.monotonic() - args.started_at
    print(json.dumps(info))
    print(tt.markdown({"machine": info, "rows": rows}))
    save()
    return result


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_batched(base, layout, ctx, args, size, K, options, steps, out_path) -> dict:
    """Where the time of a batched step goes: GPU kernel time by kind, and how busy the GPU is."""
    from torch.profiler import ProfilerActivity, profile

    device = base.device
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, mixed_precision=tt._mixed(args), identities_per_batch=K)
    ids = tt.identities(K, args, size, device)
    train_batched(base, layout, cfg, ids, ctx, options)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tt.sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        train_batched(base, layout, cfg, ids, ctx, options)
        tt.sync(device)
    wall = time.perf_counter() - t0
    by_kind: dict[str, float] = {}
    kernels = 0.0
    n_kernels = 0
    for evt in prof.events():
        if device.type == "cuda" and str(getattr(evt, "device_type", "")).endswith("CUDA"):
            us = float(evt.time_range.elapsed_us())  # a kernel's own duration on the GPU
            by_kind[kernel_kind(evt.name)] = by_kind.get(kernel_kind(evt.name), 0.0) + us
            kernels += us
            n_kernels += 1
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=30)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(table)
    summary = {"K": K, "steps": steps, "wall_s": wall, "kernels_per_step": n_kernels / steps}
    if kernels:
        summary["gpu_busy_fraction"] = kernels / 1e6 / wall
        summary["kernel_ms_per_step"] = kernels / 1e3 / steps
        summary["kernel_share"] = {k: v / kernels for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    return summary


def sd15_inversion_base(base, args, size):
    """The benchmark's UNet with an SD1.5-shape VAE and CLIP-L-shape text encoder (random init)."""
    from diffusers import AutoencoderKL

    from w2w_core.model import BaseModel, clip_text_encoder, tiny_tokenizer

    small = bool(args.sd15_channels)  # CPU smoke test: shrink the one-off encoders too
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 77
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=size * 8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64) if small else (128, 256, 512, 512), scaling_factor=0.18215,
    )
    text_encoder = clip_text_encoder(
        tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=2 if small else 12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    )
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval().to(device=base.device, dtype=base.dtype)
    return BaseModel(unet=base.unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=base.scheduler,
                     device=base.device, dtype=base.dtype, resolution=size * 8, fingerprint="bench-inversion")


def time_inversion(inv_base, layout, size, steps: int, n_components: int, compile: bool = False) -> dict:
    """Seconds for `w2w invert`'s optimisation at SD1.5 shape (the values do not change the time).

    A short call first pays the warm-up (and, with compile, the compilation); the timed call reuses it.
    """
    from w2w_core.invert import invert

    device = inv_base.device
    g = torch.Generator(device="cpu").manual_seed(0)
    D = layout.numel
    components = torch.randn(n_components, D, generator=g)
    components = (components / components.norm(dim=1, keepdim=True)).to(device)
    mean = torch.zeros(D, device=device)
    std = torch.full((D,), 1e-2, device=device)
    image = torch.rand(3, size * 8, size * 8, generator=g) * 2 - 1
    tt.reset_peak_memory(device)
    t0 = time.perf_counter()
    invert(inv_base, layout, mean, std, components, image, steps=5, n_components=n_components, compile=compile)
    tt.sync(device)
    warm_s = time.perf_counter() - t0
    stamps: list[float] = []  # invert reads the loss back every step, so these are step boundaries
    result = invert(inv_base, layout, mean, std, components, image, steps=steps, n_components=n_components,
                    compile=compile, progress=lambda step, loss: stamps.append(time.perf_counter()))
    tt.sync(device)
    gaps = sorted(b - a for a, b in zip(stamps[len(stamps) // 4:], stamps[len(stamps) // 4 + 1:]))
    steady = gaps[len(gaps) // 2] if gaps else result.seconds / max(steps, 1)
    out = {"mode": "compile" if compile else "eager", "warmup_s": warm_s, "steps": steps,
           "components": result.components, "seconds": result.seconds,
           "steady_ms_per_step": 1000 * steady, "first_step_s": (stamps[0] - t0 - warm_s) if stamps else None,
           "seconds_at_400_steps": result.seconds / steps * 400,
           "ms_per_step": 1000 * result.seconds / steps, "published_a100_s": 55.0,
           "base_dtype": str(inv_base.dtype).replace("torch.", ""),
           "first_losses": result.losses[:5]}  # same seed in every mode: eager and compile must agree
    mem = tt.peak_memory_gb(device)
    if mem is not None:
        out["peak_mem_gb"] = mem
    return out


if __name__ == "__main__":
    main()
