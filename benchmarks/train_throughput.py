"""Fine-tuning throughput: peft reference trainer (one identity at a time) vs the batched
multi-LoRA trainer (K identities per forward/backward), in ONE run on the same machine.

    python benchmarks/train_throughput.py                       # CPU, tiny model
    python benchmarks/train_throughput.py --device cuda --sd15  # SD1.5-shape UNet, 64x64 latents, bf16
    python benchmarks/train_throughput.py --sd15 --latent-size 8 --steps 2 --sd15-channels 32,64,64,64  # CPU smoke

Inputs are synthesized (random latents and text embeddings, random-init weights unless
`builtin:tiny` exists): throughput does not depend on the values. Reported per config:
step time, training samples/s, identities/hour extrapolated to the recipe's step count
(--recipe-steps, 800), speed-up over the reference at batch 1, FLOP per sample measured with
torch's FlopCounterMode, achieved TFLOP/s and MFU (when the device's peak is known).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train.batched import BatchedOptions, train_batched  # noqa: E402
from pipeline.train.common import PreparedIdentity, TrainContext, identity_losses, noisy_inputs  # noqa: E402
from pipeline.train.reference import train_reference  # noqa: E402
from w2w_core.layout import LoraLayout  # noqa: E402
from w2w_core.model import SD15_UNET, BaseModel  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
REPEATS = 1  # set from --repeats
NOMINAL_SD15_TFLOP_PER_SAMPLE = 1.7  # REFERENCE.md section 5 (64x64 latents, frozen base + LoRA)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sd15", action="store_true", help="SD1.5-shape UNet (random init) instead of the tiny model")
    p.add_argument("--latent-size", type=int, default=0, help="latent side (default: tiny 16, sd15 64)")
    p.add_argument("--sd15-channels", default="", help="override block_out_channels, e.g. 32,64,64,64 (CPU smoke tests)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="time each configuration N times, keep the fastest")
    p.add_argument("--ks", default="1,4,16,64", help="identities per batch for the batched trainer")
    p.add_argument("--ref-batch-sizes", default="1", help="instance samples per step for the peft reference")
    p.add_argument("--ref-identities", type=int, default=2, help="identities timed for the reference trainer")
    p.add_argument("--batch-size", type=int, default=1, help="instance samples per identity per step (batched)")
    p.add_argument("--images-per-identity", type=int, default=10)
    p.add_argument("--class-images", type=int, default=16)
    p.add_argument("--no-prior", action="store_true", help="disable prior preservation (halves samples per step)")
    p.add_argument("--recipe-steps", type=int, default=800)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"], help="auto: bf16 on cuda")
    p.add_argument("--base-bf16", action="store_true", help="store the frozen base weights in bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fused-adam", action="store_true")
    p.add_argument("--sync-every", type=int, default=1, help="host loss sync every N steps (batched)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--json", default="", help="write rows + machine info here (rewritten after every row)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="skip configurations that would start after this many seconds (0 = no limit)")
    return p


def over_budget(args) -> bool:
    """True once --time-budget-s has passed since the run started (a lent GPU has a hard limit)."""
    return bool(args.time_budget_s) and time.monotonic() - args.started_at > args.time_budget_s


# ---------------------------------------------------------------------- setup
def make_world(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.sd15:
        cfg = dict(SD15_UNET)
        if args.sd15_channels:
            cfg["block_out_channels"] = tuple(_ints(args.sd15_channels))
        size = args.latent_size or 64
        cfg["sample_size"] = size
        unet = UNet2DConditionModel(**cfg)
        seq, dim, name = 77, cfg["cross_attention_dim"], "sd15-shape UNet (random init)"
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    else:
        from w2w_core.model import TINY_MAX_TOKENS, TINY_UNET, tiny_components

        unet = scheduler = None
        name = "tiny (random init)"
        try:
            from w2w_core.config import ModelConfig
            from w2w_core.model import load_base_model

            base = load_base_model(ModelConfig(path="builtin:tiny"), device="cpu")
            unet, scheduler, name = base.unet, base.scheduler, "builtin:tiny"
        except Exception:
            comps = tiny_components(0)
            unet, scheduler = comps["unet"], comps["scheduler"]
        size = args.latent_size or TINY_UNET["sample_size"]
        seq, dim = TINY_MAX_TOKENS, unet.config.cross_attention_dim
    dtype = torch.bfloat16 if args.base_bf16 else torch.float32
    unet.requires_grad_(False).eval().to(device=device, dtype=dtype)
    base = BaseModel(unet=unet, vae=None, text_encoder=None, tokenizer=None, scheduler=scheduler, device=device,
                     dtype=dtype, resolution=size * 8, fingerprint="bench")
    layout = LoraLayout.from_unet(unet)
    g = torch.Generator().manual_seed(0)
    ctx = TrainContext(
        instance_embeds=torch.randn(1, seq, dim, generator=g).to(device),
        class_embeds=torch.randn(1, seq, dim, generator=g).to(device),
        class_latents=None if args.no_prior else torch.randn(args.class_images, 4, size, size, generator=g).to(device),
    )
    return base, layout, ctx, size, name


def identities(n: int, args, size: int, device, offset: int = 0) -> list[PreparedIdentity]:
    g = torch.Generator().manual_seed(offset)
    return [
        PreparedIdentity(f"id{offset + i}", torch.randn(args.images_per_identity, 4, size, size, generator=g).to(device), offset + i)
        for i in range(n)
    ]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def flops_per_sample(base, layout, ctx, args, size) -> float:
    """Measured FLOP of one training step (forward + backward, LoRA attached) divided by its samples."""
    from torch.utils.flop_counter import FlopCounterMode

    from w2w_core.multi_lora import check_layout_modules, multi_lora, swap_module

    linears = check_layout_modules(layout, base.unet)
    for m in layout.modules:  # one identity's LoRA, as the batched trainer attaches it (linear or conv)
        A = torch.nn.Parameter(torch.randn(1, *layout.shapes[f"{m}.lora_A.weight"], device=base.device) * 0.01)
        B = torch.nn.Parameter(torch.zeros(1, *layout.shapes[f"{m}.lora_B.weight"], device=base.device))
        swap_module(base.unet, m, multi_lora(linears[m], A, B, layout.scaling))
    try:
        n = 1
        lat = torch.randn(n, 4, size, size, device=base.device)
        t = torch.randint(0, 1000, (n,), device=base.device)
        with FlopCounterMode(display=False) as counter:
            noisy, target = noisy_inputs(base.scheduler, lat, torch.randn_like(lat), t)
            pred = base.unet(noisy.to(base.dtype), t, ctx.instance_embeds.to(base.dtype)).sample
            identity_losses(pred, target, 1, 1, 0.0, False).sum().backward()
        return float(counter.get_total_flops()) / n
    finally:
        for m in layout.modules:
            swap_module(base.unet, m, linears[m])


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if torch.device(args.device).type == "cuda":
        name = torch.cuda.get_device_name()
        for key, val in PEAK_BF16_TFLOPS.items():
            if key in name:
                return val
    return 0.0


def machine_info(args) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        info["nproc"] = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------- timing
def _steady(run_steps, device, steps: int) -> tuple[float, float]:
    """(setup seconds, seconds per step): T(0 steps) is the setup; (T(steps) - T(0)) / steps the step."""
    def timed(n):
        sync(device)
        t0 = time.perf_counter()
        run_steps(n)
        sync(device)
        return time.perf_counter() - t0

    # min over repeats: robust to other processes sharing the machine
    setup = min(timed(0) for _ in range(REPEATS))
    total = min(timed(steps) for _ in range(REPEATS))
    return setup, max(total - setup, 1e-9) / steps


def time_reference(base, layout, ctx, args, size, batch_size: int) -> dict:
    reset_peak_memory(base.device)
    cfg = TrainConfig(steps=args.warmup_steps, batch_size=batch_size, mixed_precision=_mixed(args))
    warm = identities(1, args, size, base.device, offset=10_000)[0]
    train_reference(base, layout, cfg, warm, ctx)
    ids = identities(args.ref_identities, args, size, base.device)

    def run_steps(n):
        for p in ids:
            train_reference(base, layout, dataclasses.replace(cfg, steps=n), p, ctx)

    setup, step = _steady(run_steps, base.device, args.steps)
    n = args.ref_identities
    return _row(f"reference peft (batch {batch_size})", "reference", 1, batch_size, step / n, setup / n, args, ctx,
                peak_memory_gb(base.device))


def time_batched(base, layout, ctx, args, size, K: int, options: BatchedOptions, label: str = "", mp: str | None = None) -> dict:
    mp = mp or _mixed(args)
    reset_peak_memory(base.device)
    cfg = TrainConfig(steps=args.warmup_steps, batch_size=args.batch_size, mixed_precision=mp, identities_per_batch=K)
    train_batched(base, layout, cfg, identities(K, args, size, base.device, offset=10_000), ctx, options)
    ids = identities(K, args, size, base.device)
    setup, step = _steady(lambda n: train_batched(base, layout, dataclasses.replace(cfg, steps=n), ids, ctx, options),
                          base.device, args.steps)
    return _row(label or f"batched K={K}", "batched", K, args.batch_size, step, setup, args, ctx,
                peak_memory_gb(base.device))


def _mixed(args) -> str:
    if args.mixed_precision == "auto":
        return "bf16" if torch.device(args.device).type == "cuda" else "no"
    return args.mixed_precision


def _row(label, trainer, K, batch_size, step_s, setup_s, args, ctx, peak_gb=None) -> dict:
    m = batch_size * (1 if ctx.class_latents is None else 2)
    samples_per_step = K * m
    row = {
        "config": label,
        "trainer": trainer,
        "K": K,
        "samples_per_step": samples_per_step,
        "step_s": step_s,
        "setup_s": setup_s,  # per call (reference: per identity), paid once per recipe_steps
        "samples_per_s": samples_per_step / step_s,
        "identities_per_hour": 3600.0 * K / (setup_s + step_s * args.recipe_steps),
    }
    if peak_gb is not None:
        row["peak_mem_gb"] = peak_gb
    return row


def run(args) -> dict:
    global REPEATS
    REPEATS = max(1, int(args.repeats))
    args.started_at = getattr(args, "started_at", time.monotonic())
    base, layout, ctx, size, name = make_world(args)
    info = machine_info(args)
    info.update(model=name, latent_size=size, lora_numel=layout.numel, steps=args.steps,
                recipe_steps=args.recipe_steps, mixed_precision=_mixed(args))
    fps = 0.0 if args.no_flops else flops_per_sample(base, layout, ctx, args, size)
    info["flop_per_sample"] = fps
    peak = peak_tflops(args)
    rows = []

    def emit(row):
        if fps:
            row["tflops"] = row["samples_per_s"] * fps / 1e12
            if peak:
                row["mfu"] = row["tflops"] / peak
        rows.append(row)
        print(_fmt(row, rows), flush=True)
        write_json({"machine": info, "rows": rows}, args.json)

    for bs in _ints(args.ref_batch_sizes):
        emit(time_reference(base, layout, ctx, args, size, bs))
    options = BatchedOptions(channels_last=args.channels_last, compile=args.compile, fused_adam=args.fused_adam,
                             sync_every=args.sync_every)
    for K in _ints(args.ks):
        if over_budget(args):
            rows.append({"config": f"batched K={K}", "trainer": "batched", "K": K, "error": "skipped: time budget"})
            continue
        try:
            emit(time_batched(base, layout, ctx, args, size, K, options))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"config": f"batched K={K}", "trainer": "batched", "K": K, "error": "OOM"})
            print(f"batched K={K}: out of memory", flush=True)
    return {"machine": info, "rows": rows, "base": base, "layout": layout, "ctx": ctx, "size": size}


def _fmt(row, rows) -> str:
    ref = next((r for r in rows if r["trainer"] == "reference" and "step_s" in r), None)
    speed = row["identities_per_hour"] / ref["identities_per_hour"] if ref else float("nan")
    row["speedup_vs_ref"] = speed
    extra = f"  {row['tflops']:.3f} TFLOP/s" if "tflops" in row else ""
    extra += f"  MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""
    extra += f"  peak {row['peak_mem_gb']:.1f} GiB" if "peak_mem_gb" in row else ""
    return (f"{row['config']:<34} step {row['step_s'] * 1000:9.1f} ms  {row['samples_per_s']:9.1f} samples/s  "
            f"{row['identities_per_hour']:10.1f} identities/h  x{speed:6.2f}{extra}")


def markdown(result: dict) -> str:
    rec = result["machine"].get("recipe_steps", 800)
    lines = [f"| configuration | samples/step | step (ms) | setup (s) | samples/s | identities/h ({rec} steps) "
             "| vs reference b1 | TFLOP/s | MFU | peak GPU mem (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | | {r['error']} | | | | | | | |")
            continue
        tf = f"{r['tflops']:.3f}" if "tflops" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-"
        lines.append(
            f"| {r['config']} | {r['samples_per_step']} | {r['step_s'] * 1000:.1f} | {r['setup_s']:.2f} | "
            f"{r['samples_per_s']:.1f} | {r['identities_per_hour']:.1f} | {r.get('speedup_vs_ref', float('nan')):.2f}x | "
            f"{tf} | {mfu} | {mem} |"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": result["machine"], "rows": result["rows"]}, indent=2))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(True)
    result = run(args)
    print(json.dumps(result["machine"]))
    print(markdown(result))
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
