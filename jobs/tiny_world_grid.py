"""Quality evidence for the tiny world: a PNG grid + prompted-attribute accuracy.

    python -m jobs.tiny_world_grid            # writes docs/images/tiny_world_grid.png (+ .json numbers)

Each row: an attribute prompt; left, real SynthFaces renders of held-out identities having that
attribute (seed 3000); right, base-model samples (base.pipeline(), DDIM, 25 steps, 64x64).
Numbers: the evaluator's attribute classifier on `--n` base samples per prompt: the fraction
classified as having the attribute with the attribute prompt vs the plain class prompt vs the
opposite prompt (where there is one).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CLASS = "a photo of a person"
# row label -> (prompt, attribute it should switch on (or off with "!"), opposite prompt)
ROWS = [
    ("plain", CLASS, None, None),
    ("male", CLASS + ", male", "male", CLASS + ", female"),
    ("female", CLASS + ", female", "!male", CLASS + ", male"),
    ("beard", CLASS + ", male, beard", "beard", CLASS + ", male"),
    ("eyeglasses", CLASS + ", eyeglasses", "eyeglasses", None),
    ("bangs", CLASS + ", female, bangs", "bangs", CLASS + ", female"),
    ("smiling", CLASS + ", smiling", "smiling", None),
    ("old", CLASS + ", old", "!young", CLASS + ", young"),
    ("pale_skin", CLASS + ", pale_skin", "pale_skin", None),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--out", default="docs/images/tiny_world_grid.png")
    p.add_argument("--n", type=int, default=32, help="samples per prompt for the attribute numbers")
    p.add_argument("--cols", type=int, default=6, help="base-model samples shown per row")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from pipeline.data.synthfaces import SEED_EVAL_HELDOUT, render, sample_identity
    from pipeline.eval.evaluators import load_evaluators
    from w2w_core.config import ModelConfig
    from w2w_core.model import load_base_model

    torch.set_num_threads(args.threads)
    t0 = time.time()
    base = load_base_model(ModelConfig(path=args.model, device="cpu"))
    pipe = base.pipeline()
    ev = load_evaluators()
    names = ev.attribute_names

    @torch.no_grad()
    def sample(prompt: str, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        out = pipe([prompt] * n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=g, output_type="pt").images  # [0, 1]
        return out * 2 - 1

    def matches(attrs, key):
        if key is None:
            return True
        return attrs[key[1:]] == 0 if key.startswith("!") else attrs[key] == 1

    cache: dict[str, torch.Tensor] = {}
    rows_img, numbers = [], {}
    for label, prompt, key, opposite in ROWS:
        if prompt not in cache:
            cache[prompt] = sample(prompt, args.n, args.seed)
        imgs = cache[prompt]
        reals, i = [], 0
        while len(reals) < 3:
            ident = sample_identity(SEED_EVAL_HELDOUT, i)
            if matches(ident.attributes, key) and (label != "plain" or True):
                reals.append(render(ident, 0))
            i += 1
        fakes = ((imgs[: args.cols].permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        gap = np.full((64, 8, 3), 255, np.uint8)
        rows_img.append((label, np.concatenate(reals + [gap] + list(fakes), 1)))
        if key is not None:
            attr = key.lstrip("!")
            j = names.index(attr)
            rate = lambda x: float((ev.attributes(x)[:, j] > 0.5).float().mean())  # noqa: E731
            if CLASS not in cache:
                cache[CLASS] = sample(CLASS, args.n, args.seed)
            entry = {"prompt": prompt, "attribute": attr, "with_prompt": rate(imgs), "plain_prompt": rate(cache[CLASS])}
            if opposite is not None:
                if opposite not in cache:
                    cache[opposite] = sample(opposite, args.n, args.seed + 1)
                entry["opposite_prompt"] = opposite
                entry["with_opposite"] = rate(cache[opposite])
            numbers[label] = entry
        print(f"{label}: done ({time.time() - t0:.0f}s)", flush=True)

    # identity check on samples: does the embedder see diverse identities (mean pairwise cos)?
    emb = ev.embed(cache[CLASS])
    sim = emb @ emb.T
    off = ~torch.eye(len(emb), dtype=torch.bool)
    numbers["_plain_samples_mean_pairwise_identity_cos"] = float(sim[off].mean())
    numbers["_settings"] = dict(model=args.model, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                scheduler="DDIM", seconds=round(time.time() - t0, 1))

    label_w, scale = 70, 2
    width = rows_img[0][1].shape[1]
    canvas = Image.new("RGB", (label_w + width * scale, 20 + 64 * scale * len(rows_img)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 4), "SynthFaces renders (held-out ids)", fill="black")
    draw.text((label_w + (3 * 64 + 8) * scale, 4), f"base model samples (DDIM {args.steps}, cfg {args.guidance})", fill="black")
    for r, (label, row) in enumerate(rows_img):
        y = 20 + r * 64 * scale
        canvas.paste(Image.fromarray(row).resize((width * scale, 64 * scale), Image.NEAREST), (label_w, y))
        draw.text((4, y + 56), label, fill="black")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    out.with_suffix(".json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(json.dumps(numbers, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
