"""What limits identity fidelity in the tiny world? Small controlled runs with the project's own trainer.

Each row trains the same identities (SynthFaces seed 0, indices 0..N-1, 10 images each) with
`pipeline.train.train_identities` under conf/tiny.yaml plus the row's overrides, then measures
with `pipeline.eval.fidelity.identity_fidelity` (the report's fidelity section): renders of the
instance prompt at 4 fixed seeds against the identity's mean embedding, the base-model floor, the
real-image ceiling, id accuracy among the N identities, attribute agreement, how much the LoRA
changes a render, and the denoising error on the identity's own images (model vs base).

    python benchmarks/fidelity_study.py --rows A,B,N --out docs/fidelity_study.jsonl
    python benchmarks/fidelity_study.py --list
    python benchmarks/fidelity_study.py --custom "mine: lora.rank=2 train.steps=200"

One JSON line per row is appended to --out (the docs table in docs/TINY_WORLD.md is made from it).
Timings depend on what else runs on the machine: the line records the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ATTN = "[to_q,to_k,to_v,to_out.0]"
ATTN_CONV = "[to_q,to_k,to_v,to_out.0,conv1,conv2]"
CONV = "[conv1,conv2]"
ALL = "[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,time_emb_proj,proj_in,proj_out,ff.net.0.proj,ff.net.2]"
# name -> (description, overrides on conf/tiny.yaml, trainer)
P = "train.prior_loss_weight=1"  # DreamBooth prior preservation (32 class images), as conf/tiny.yaml had before issue 14
NP = "train.prior_loss_weight=0"
QV = "lora.targets=[to_q,to_v]"
# name -> (description, overrides on conf/tiny.yaml, trainer). Every row spells out what it depends on.
ROWS: dict[str, tuple[str, list[str], str]] = {
    "A": ("conf/tiny.yaml before issue 14: r1 q/v, alpha 27, lr 2e-3, 100 steps, prior",
          ["lora.rank=1", "lora.alpha=27", QV, "train.lr=2e-3", "train.steps=100", P], "batched"),
    "B": ("A with 400 steps", ["lora.rank=1", "lora.alpha=27", QV, "train.lr=2e-3", "train.steps=400", P], "batched"),
    "H": ("B with lr 2e-4", ["lora.rank=1", "lora.alpha=27", QV, "train.lr=2e-4", "train.steps=400", P], "batched"),
    "I": ("r4 q/k/v/out, alpha 27, lr 5e-4, 400 steps, prior", ["lora.rank=4", "lora.alpha=27", f"lora.targets={ATTN}", "train.lr=5e-4",
                                                                 "train.steps=400", P], "batched"),
    "N": ("B without prior preservation", ["lora.rank=1", "lora.alpha=27", QV, "train.lr=2e-3", "train.steps=400", NP], "batched"),
    "S1": ("B with alpha = rank = 1", ["lora.rank=1", "lora.alpha=1", QV, "train.lr=2e-3", "train.steps=400", P], "batched"),
    "S2": ("B with alpha = rank = 1, lr 1e-2", ["lora.rank=1", "lora.alpha=1", QV, "train.lr=1e-2", "train.steps=400", P], "batched"),
    "S1N": ("r1 q/v, alpha = rank = 1, lr 1e-2, 400 steps, no prior", ["lora.rank=1", "lora.alpha=1", QV, "train.lr=1e-2",
                                                                        "train.steps=400", NP], "batched"),
    "S3": ("r4 q/k/v/out, alpha = rank = 4, lr 5e-3, 400 steps, no prior", ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN}",
                                                                           "train.lr=5e-3", "train.steps=400", NP], "batched"),
    "V1": ("r4 attention + resnet conv1/conv2, alpha 4, lr 1e-3, 400 steps, prior",
           ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=1e-3", "train.steps=400", P], "batched"),
    "V2": ("V1 without prior", ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=1e-3", "train.steps=400", NP], "batched"),
    "V3": ("V2 with lr 3e-3 (conf/tiny.yaml after issue 14, but 400 steps)",
           ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=3e-3", "train.steps=400", NP], "batched"),
    "V3p": ("V3 with prior", ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=3e-3", "train.steps=400", P], "batched"),
    "V3s200": ("V3 with 200 steps", ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=3e-3", "train.steps=200", NP],
               "batched"),
    "V3s800": ("V3 with 800 steps", ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=3e-3", "train.steps=800", NP],
               "batched"),
    "V4": ("resnet conv1/conv2 only, r4, alpha 4, lr 3e-3, 400 steps, no prior",
           ["lora.rank=4", "lora.alpha=4", f"lora.targets={CONV}", "train.lr=3e-3", "train.steps=400", NP], "batched"),
    "V5": ("V3 with lr 1e-2", ["lora.rank=4", "lora.alpha=4", f"lora.targets={ATTN_CONV}", "train.lr=1e-2", "train.steps=400", NP], "batched"),
    "R8": ("V3 with rank = alpha = 8", ["lora.rank=8", "lora.alpha=8", f"lora.targets={ATTN_CONV}", "train.lr=3e-3", "train.steps=400", NP],
           "batched"),
    "ALL": ("V3 plus conv_shortcut, time_emb_proj, proj_in/out, feed-forward",
            ["lora.rank=4", "lora.alpha=4", f"lora.targets={ALL}", "train.lr=3e-3", "train.steps=400", NP], "batched"),
}


def denoise_error(base, slot, vector, latents, embeds, gen_seed: int = 0, timesteps: int = 4) -> float:
    """Mean epsilon-MSE on an identity's own latents at fixed noise/timesteps (lower = the model knows them)."""
    import torch

    g = torch.Generator().manual_seed(gen_seed)
    n = latents.shape[0]
    t = torch.randint(0, base.scheduler.config.num_train_timesteps, (n * timesteps,), generator=g)
    noise = torch.randn((n * timesteps, *latents.shape[1:]), generator=g)
    clean = latents.repeat(timesteps, 1, 1, 1)
    noisy = base.scheduler.add_noise(clean, noise, t)
    slot.set(vector)
    with torch.no_grad():
        pred = base.unet(noisy, t, embeds.expand(noisy.shape[0], -1, -1)).sample
    return float((pred - noise).pow(2).mean())


def run_row(name: str, desc: str, overrides: list[str], trainer: str, n_ids: int, images: int, threads: int) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.data.source import IdentitySource  # noqa: F401  (same loader family as the build)
    from pipeline.data.synthfaces import ATTRIBUTE_NAMES, render_identity, sample_identity, to_tensor
    from pipeline.eval.evaluators import load_evaluators
    from pipeline.eval.fidelity import identity_fidelity
    from pipeline.eval.report import Renderer
    from w2w_core.render import LoraSlot
    from pipeline.train import IdentityInput, generate_class_latents, train_identities
    from w2w_core.layout import LoraLayout
    from w2w_core.model import load_base_model

    torch.set_num_threads(threads)
    cfg = load_config(REPO / "conf/tiny.yaml", [f"train.identities_per_batch={n_ids}", *overrides])
    base = load_base_model(cfg.model)
    layout = LoraLayout.from_unet(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    idents = [sample_identity(0, i) for i in range(n_ids)]
    imgs = [to_tensor(render_identity(0, i, images)) for i in range(n_ids)]
    inputs = [IdentityInput(idents[i].id, imgs[i], seed=i) for i in range(n_ids)]
    class_latents = None
    if cfg.train.prior_loss_weight > 0:
        class_latents = generate_class_latents(base, cfg.train)
    t0 = time.perf_counter()
    results = train_identities(base, layout, cfg.train, inputs, trainer=trainer, class_latents=class_latents)
    train_s = time.perf_counter() - t0
    vectors = [r.vector if r.vector is not None else torch.zeros(layout.numel) for r in results]

    ev = load_evaluators()
    render = Renderer(base, layout, 25)
    labels = torch.tensor([[idents[i].attributes[a] for a in ATTRIBUTE_NAMES] for i in range(n_ids)])
    fid = identity_fidelity(render.many, ev, vectors, imgs, labels, ATTRIBUTE_NAMES)
    embeds = base.encode_prompts([cfg.train.instance_prompt])
    mse_model, mse_base = [], []
    with LoraSlot(base, layout) as slot:
        for i in range(n_ids):
            lat = base.encode_images(imgs[i]).float()
            mse_model.append(denoise_error(base, slot, vectors[i], lat, embeds, gen_seed=i))
            mse_base.append(denoise_error(base, slot, torch.zeros(layout.numel), lat, embeds, gen_seed=i))
    # |delta W| relative to |W| over the adapted modules (the probe's "updates too large" check)
    named = dict(base.unet.named_modules())
    dw, w = 0.0, 0.0
    for v in vectors[:2]:
        for m, delta in layout.deltas(v).items():
            dw += float(delta.norm())
            w += float(named[m].weight.norm())
    return {
        "row": name, "description": desc, "overrides": overrides, "trainer": trainer, "identities": n_ids,
        "images": images, "numel": layout.numel, "train_seconds": round(train_s, 1), "threads": threads,
        "loadavg_after": os.getloadavg()[0],
        "fidelity": fid["fidelity"], "fidelity_sd": fid["fidelity_sd"], "floor": fid["floor"], "ceiling": fid["ceiling"],
        "per_identity_fidelity": [round(v, 3) for v in fid["per_identity"]["fidelity"]],
        "id_accuracy": fid["id_accuracy"], "attribute_agreement": fid.get("attribute_agreement"),
        "attribute_agreement_floor": fid.get("attribute_agreement_floor"), "render_change": fid["render_change"],
        "denoise_mse_model": sum(mse_model) / n_ids, "denoise_mse_base": sum(mse_base) / n_ids,
        "delta_w_over_w": dw / max(w, 1e-12) / 2,
        "quarantined": sum(r.status != "ok" for r in results),
        "final_loss_mean": float(sum(r.loss_mean_last10 for r in results if r.status == "ok") / max(1, sum(r.status == "ok" for r in results))),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown_table(path: str) -> str:
    """The docs table (docs/TINY_WORLD.md) from a results file, one row per line, in file order."""
    head = ("| row | config (overrides on conf/tiny.yaml) | LoRA numbers | train s, 8 ids | fidelity mean ± sd | "
            "id acc (chance 0.125) | attribute agreement (base 0.65) | render change | denoising MSE model / base | dW/W |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {name: i for i, name in enumerate(ROWS)}
    records = [json.loads(line) for line in open(path)]
    records.sort(key=lambda r: order.get(r["row"], len(order)))  # the study's order; stable for reruns
    for r in records:
        lines.append(
            f"| {r['row']} | {ROWS[r['row']][0] if r['row'] in ROWS else r['description']} | {r['numel']:,} | {r['train_seconds']:.0f} (load {r['loadavg_after']:.0f}) | "
            f"{r['fidelity']:.3f} ± {r['fidelity_sd']:.3f} | {r['id_accuracy']:.2f} | {r['attribute_agreement']:.3f} | "
            f"{r['render_change']:.3f} | {r['denoise_mse_model']:.4f} / {r['denoise_mse_base']:.4f} | {r['delta_w_over_w']:.2f} |")
    lines += ["", "Exact overrides per row (`python benchmarks/fidelity_study.py --rows NAME` reruns it):", ""]
    for r in records:
        lines.append(f"- {r['row']}: `{' '.join(ROWS[r['row']][1] if r['row'] in ROWS else r['overrides'])}`")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row names (see --list; default A,B,N,S1, or none with --custom)")
    ap.add_argument("--custom", action="append", default=[], help='"name: key=value key=value" extra row (trainer batched)')
    ap.add_argument("--identities", type=int, default=8)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/fidelity_study.jsonl")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", metavar="JSONL", help="print the markdown table of a results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return 0
    if args.list:
        for k, (d, o, t) in ROWS.items():
            print(f"{k}: {d}\n    {t} {' '.join(o)}")
        return 0
    rows = args.rows if args.rows is not None else ("" if args.custom else "A,B,N,S1")
    todo = [(r, *ROWS[r]) for r in rows.split(",") if r]
    for spec in args.custom:
        name, _, rest = spec.partition(":")
        todo.append((name.strip(), rest.strip(), rest.split(), "batched"))
    for name, desc, overrides, trainer in todo:
        row = run_row(name, desc, overrides, trainer, args.identities, args.images, args.threads)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
