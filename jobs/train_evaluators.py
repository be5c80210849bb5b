"""Train the tiny-world evaluators (identity embedder + attribute classifier) on SynthFaces.

    python -m jobs.train_evaluators --seed 0

Train identities: SynthFaces seed 2000; held-out identities: seed 3000 (both disjoint from the
pretraining seed 1000 and the demo seed 0). Prints and stores held-out verification accuracy and
per-attribute accuracy in w2w_core/assets/evaluators/evaluators.json.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augment: flips, blur (like VAE/diffusion samples), colour gain, noise."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    blur = torch.rand(b, generator=gen) < 0.4
    xb = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where(blur[:, None, None, None], xb, x)
    gain = 1 + 0.1 * torch.randn(b, 3, 1, 1, generator=gen)
    x = (x + 1) * gain - 1 + 0.03 * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default w2w_core/assets/evaluators)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--identities", type=int, default=400)
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--heldout-identities", type=int, default=100)
    p.add_argument("--heldout-images", type=int, default=6)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--invariant-to", default="",
                   help="comma-separated attributes the identity embedding should ignore, e.g. eyeglasses,beard: "
                        "each training identity is also rendered with each one flipped "
                        "(synthfaces.with_attribute) under the same identity label, as a person is photographed "
                        "with and without glasses (default: none)")
    p.add_argument("--variant-images", type=int, default=4,
                   help="images per flipped-attribute variant of an identity (default 4)")
    args = p.parse_args(argv)

    from pipeline.data.synthfaces import (ATTRIBUTE_NAMES, SEED_EVAL_HELDOUT, SEED_EVAL_TRAIN, render, render_identity,
                                          sample_identity, to_tensor, with_attribute)
    from pipeline.eval.evaluators import EVALUATOR_DIR, EvaluatorNet, Evaluators, save_evaluators, verification_accuracy

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.time()

    def dataset(seed, n_ids, n_img):
        import numpy as np

        imgs = np.concatenate([render_identity(seed, i, n_img) for i in range(n_ids)])
        labels = torch.arange(n_ids).repeat_interleave(n_img)
        attrs = torch.tensor([[sample_identity(seed, i).attributes[a] for a in ATTRIBUTE_NAMES] for i in range(n_ids)],
                             dtype=torch.float32).repeat_interleave(n_img, 0)
        return to_tensor(imgs), labels, attrs

    invariant = [name for name in args.invariant_to.split(",") if name]
    unknown = sorted(set(invariant) - set(ATTRIBUTE_NAMES))
    if unknown:
        p.error(f"--invariant-to: unknown attribute(s) {unknown}; valid: {', '.join(ATTRIBUTE_NAMES)}")

    def variants(seed, n_ids, n_img):
        """Each identity with each `invariant` attribute flipped (where SynthFaces allows it), same label."""
        import numpy as np

        imgs, labels, attrs = [], [], []
        for i in range(n_ids):
            ident = sample_identity(seed, i)
            for name in invariant:
                try:
                    other = with_attribute(ident, name, 1 - ident.attributes[name])
                except ValueError:  # a beard on a female identity: not drawn
                    continue
                imgs += [render(other, 1000 + k) for k in range(n_img)]  # other poses than the originals'
                labels += [i] * n_img
                attrs += [[other.attributes[a] for a in ATTRIBUTE_NAMES]] * n_img
        return to_tensor(np.stack(imgs)), torch.tensor(labels), torch.tensor(attrs, dtype=torch.float32)

    x, y, a = dataset(SEED_EVAL_TRAIN, args.identities, args.images)
    if invariant:
        xv, yv, av = variants(SEED_EVAL_TRAIN, args.identities, args.variant_images)
        x, y, a = torch.cat([x, xv]), torch.cat([y, yv]), torch.cat([a, av])
    xh, yh, ah = dataset(SEED_EVAL_HELDOUT, args.heldout_identities, args.heldout_images)
    print(f"data: train {tuple(x.shape)} ({args.identities} ids, seed {SEED_EVAL_TRAIN}); "
          f"held-out {tuple(xh.shape)} (seed {SEED_EVAL_HELDOUT}) in {time.time() - t_start:.0f}s", flush=True)

    net = EvaluatorNet(len(ATTRIBUTE_NAMES))
    proto = torch.nn.Parameter(torch.randn(args.identities, 64) * 0.1)
    opt = torch.optim.AdamW(list(net.parameters()) + [proto], lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    pos_weight = ((1 - a.mean(0)) / a.mean(0).clamp_min(1e-3)).clamp(1, 10)
    net.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=gen)
        emb, logits = net(degrade(x[idx], gen))
        id_logits = 16.0 * emb @ F.normalize(proto, dim=-1).T  # cosine softmax (NormFace)
        loss_id = F.cross_entropy(id_logits, y[idx])
        loss_attr = F.binary_cross_entropy_with_logits(logits, a[idx], pos_weight=pos_weight)
        loss = loss_id + loss_attr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} id {loss_id.item():.3f} attr {loss_attr.item():.3f} "
                  f"({time.time() - t_start:.0f}s)", flush=True)
    net.eval()
    ev = Evaluators(net, list(ATTRIBUTE_NAMES))
    with torch.no_grad():
        sub = torch.arange(0, len(x), max(1, len(x) // 1200))
        _, threshold = verification_accuracy(ev.embed(x[sub]), y[sub])
        emb_h = ev.embed(xh)
        ver_acc, _ = verification_accuracy(emb_h, yh, threshold)
        sim = emb_h @ emb_h.T
        same = yh[:, None] == yh[None, :]
        off = ~torch.eye(len(yh), dtype=torch.bool)
        probs = ev.attributes(xh)
    attr_acc = {n: round(((probs[:, i] > 0.5).float() == ah[:, i]).float().mean().item(), 4) for i, n in enumerate(ATTRIBUTE_NAMES)}
    train_s = time.time() - t_start
    meta = dict(
        embed_dim=64, width=32, resolution=64, seed=args.seed,
        train_identity_seed=SEED_EVAL_TRAIN, heldout_identity_seed=SEED_EVAL_HELDOUT,
        train_identities=args.identities, heldout_identities=args.heldout_identities,
        steps=args.steps, train_seconds=round(train_s, 1),
        verification_threshold=round(threshold, 4),
        heldout_verification_accuracy=round(ver_acc, 4),
        heldout_mean_cos_same=round(sim[same & off].mean().item(), 4),
        heldout_mean_cos_different=round(sim[~same].mean().item(), 4),
        heldout_attribute_accuracy=attr_acc,
        invariant_to=invariant, variant_images=args.variant_images if invariant else 0,
        heldout_attribute_base_rate={n: round(max(ah[:, i].mean().item(), 1 - ah[:, i].mean().item()), 4)
                                     for i, n in enumerate(ATTRIBUTE_NAMES)},
        command="python -m jobs.train_evaluators " + " ".join(sys.argv[1:]),
    )
    out = save_evaluators(net, list(ATTRIBUTE_NAMES), meta, args.out or EVALUATOR_DIR)
    for k, v in meta.items():
        print(f"{k}: {v}")
    print(f"saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
