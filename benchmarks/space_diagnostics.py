"""Why does w2w inversion fail in a small space? Two measurements on a built space (docs/TINY_WORLD.md).

  seed-agreement   train identities twice (different noise/timestep draws, the same shared LoRA init)
                   under conf/tiny.yaml + overrides; cosine of the two LoRAs of one identity (each
                   minus the mean of all trained LoRAs) against that of two different identities,
                   for the flat (A, B) vectors and for the merged updates scaling * B @ A.
  projection-bound train full LoRAs (all images) of held-out identities with the space's recipe,
                   then render them as trained and projected onto the space's PCs: the projection
                   is the best any inversion restricted to the space can reach.

    python benchmarks/space_diagnostics.py seed-agreement --identities 6
    python benchmarks/space_diagnostics.py projection-bound runs/demo --identities 6

One JSON line per run on stdout (and appended to --out if given).
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

HELDOUT_SEED = 5000  # SynthFaces identities no build has seen (the report's held-out seed)


def _centered_cosines(vectors, n: int) -> tuple[float, float]:
    """vectors: 2n rows, row i and n+i the same identity -> (mean cos same identity, mean cos different)."""
    import torch

    d = vectors.double() - vectors.double().mean(0)
    cos = torch.nn.functional.cosine_similarity
    same = [cos(d[i], d[n + i], dim=0).item() for i in range(n)]
    diff = [cos(d[i], d[n + j], dim=0).item() for i in range(n) for j in range(n) if i != j]
    return sum(same) / len(same), sum(diff) / len(diff)


def seed_agreement(args) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.data.synthfaces import SEED_DEMO, render_identity, to_tensor
    from pipeline.train import IdentityInput, train_identities
    from w2w_core.layout import LoraLayout
    from w2w_core.model import load_base_model

    cfg = load_config(REPO / "conf" / "tiny.yaml", args.overrides)
    base = load_base_model(cfg.model, device="cpu")
    layout = LoraLayout.from_unet(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    n = args.identities
    images = [to_tensor(render_identity(SEED_DEMO, i, cfg.data.images_per_identity)) for i in range(n)]
    inputs = [IdentityInput(f"a{i}", images[i], seed=i) for i in range(n)]
    inputs += [IdentityInput(f"b{i}", images[i], seed=1000 + i) for i in range(n)]
    t0 = time.perf_counter()
    results = train_identities(base, layout, cfg.train, inputs, trainer="batched")
    vectors = torch.stack([r.vector for r in results])

    merged = torch.stack([torch.cat([d.flatten() for d in layout.deltas(v).values()]) for v in vectors])
    same, diff = _centered_cosines(vectors, n)
    merged_same, merged_diff = _centered_cosines(merged, n)
    return {"measure": "seed-agreement", "overrides": args.overrides, "identities": n, "numel": layout.numel,
            "same_identity_cos": round(same, 3), "different_identity_cos": round(diff, 3),
            "merged_same_identity_cos": round(merged_same, 3), "merged_different_identity_cos": round(merged_diff, 3),
            "train_seconds": round(time.perf_counter() - t0, 1)}


def projection_bound(args) -> dict:
    import torch

    from pipeline.builder.store import WeightStore
    from pipeline.config import from_dict
    from pipeline.data.synthfaces import render_identity, to_tensor
    from pipeline.eval.evaluators import load_evaluators
    from pipeline.eval.fidelity import identity_fidelity
    from pipeline.eval.report import Renderer
    from pipeline.train import IdentityInput, train_identities
    from w2w_core.space import WeightSpace

    space = WeightSpace.load(args.out_dir)
    cfg = from_dict(WeightStore.open(str(args.out_dir), mode="r").attrs["config"])
    base = space.base_model()
    evaluators = load_evaluators()
    n = args.identities
    images = [to_tensor(render_identity(HELDOUT_SEED, h, cfg.data.images_per_identity)) for h in range(n)]
    t0 = time.perf_counter()
    fits = train_identities(base, space.layout, cfg.train, [IdentityInput(f"heldout{h}", images[h], seed=h) for h in range(n)],
                            trainer="batched")
    train_s = time.perf_counter() - t0
    full = [f.vector for f in fits]
    origin = space.reconstruct(torch.zeros(space.k))
    projected = [space.reconstruct(space.project(v)) for v in full]
    kept = [1 - ((v - p).norm() / (v - origin).norm()).item() ** 2 for v, p in zip(full, projected)]
    render = Renderer(base, space.layout, 25)
    out = {"measure": "projection-bound", "space": str(args.out_dir), "models": len(space.identities), "k": space.k,
           "heldout_identities": n, "variance_kept_by_projection": round(sum(kept) / n, 3), "train_seconds": round(train_s, 1)}
    for name, vectors in (("full_lora", full), ("projected", projected)):
        r = identity_fidelity(render.many, evaluators, vectors, images)
        out[name] = {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="measure", required=True)
    s = sub.add_parser("seed-agreement", help="do two trainings of one identity agree?")
    s.add_argument("overrides", nargs="*", help="key=value overrides on conf/tiny.yaml")
    b = sub.add_parser("projection-bound", help="held-out full LoRAs as trained vs projected onto OUT's space")
    b.add_argument("out_dir", type=Path)
    for q in (s, b):
        q.add_argument("--identities", type=int, default=6)
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--out", default="", help="append the JSON line here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    row = seed_agreement(args) if args.measure == "seed-agreement" else projection_bound(args)
    row.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average=round(os.getloadavg()[0], 1))
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
