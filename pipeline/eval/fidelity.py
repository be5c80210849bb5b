"""Identity fidelity: do the per-identity LoRAs of a space hold their identities?

Everything downstream (sampling, editing, inversion) is only as good as the models the
space is built from, so this is measured first: each training model renders the instance
prompt at fixed seeds, and the identity embedder compares the renders with the mean
embedding of that identity's own training images. Two reference points frame the number:
the floor (the bare base model's renders, same prompt and seeds, against the same
identities) and the ceiling (a real image of the identity against its other images).
The attribute classifier adds a coarser check: do the renders carry the identity's labels?
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

FIDELITY_SEEDS = (0, 1, 2, 3)
# (vectors, prompts, seeds) -> images (K, S, 3, H, W) in [-1, 1], e.g. pipeline.eval.report.Renderer.many
RenderFn = Callable[[list, list, list], torch.Tensor]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@torch.no_grad()
def identity_fidelity(
    render: RenderFn,
    evaluators,
    vectors: Sequence[torch.Tensor],
    images: Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    label_names: Sequence[str] = (),
    prompt: str = "sks person",
    seeds: Sequence[int] = FIDELITY_SEEDS,
    keep_renders: bool = False,
) -> dict:
    """Fidelity of `vectors[i]` (a trained LoRA) to identity i, whose real images are `images[i]`.

    images[i]: (n_i >= 2, 3, H, W) in [-1, 1]. labels: (N, len(label_names)) 0/1, optional.
    Returns means and per-identity lists: `fidelity` (renders vs the identity's mean embedding),
    `floor` (base renders vs the same means), `ceiling` (image 0 vs the mean of the others),
    `id_accuracy` (a render's nearest identity mean among the N is its own; chance 1/N),
    `attribute_agreement` for renders, base renders and real images (classifier > 0.5 vs labels),
    `render_change` (mean |pixel| difference of a model's renders from the base renders).
    """
    if len(vectors) != len(images):
        raise ValueError(f"{len(vectors)} vectors for {len(images)} identities")
    if len(vectors) < 2:
        raise ValueError("identity fidelity needs at least 2 identities (id accuracy compares them)")
    seeds = [int(s) for s in seeds]
    prompts = [prompt] * len(seeds)
    means, ceiling = [], []
    for imgs in images:
        if imgs.shape[0] < 2:
            raise ValueError("each identity needs at least 2 real images (the ceiling compares one with the others)")
        emb = evaluators.embed(imgs)
        means.append(emb.mean(0))
        ceiling.append(_cos(emb[0], emb[1:].mean(0)).item())
    means_t = torch.stack(means)  # (N, E)
    all_imgs = render([torch.zeros_like(vectors[0])] + list(vectors), prompts, seeds)
    base_imgs = all_imgs[0]
    base_emb = evaluators.embed(base_imgs)  # (S, E)
    base_sims = _cos(base_emb[:, None], means_t[None])  # (S, N)
    floor = base_sims.mean(0)  # (N,)

    fidelity, id_hits, change, renders, per_seed = [], [], [], [], []
    for i in range(len(vectors)):
        imgs = all_imgs[i + 1]
        emb = evaluators.embed(imgs)
        sims = _cos(emb[:, None], means_t[None])  # (S, N)
        fidelity.append(sims[:, i].mean().item())
        per_seed.append(sims[:, i])
        id_hits.append((sims.argmax(1) == i).float().mean().item())
        change.append((imgs - base_imgs).abs().mean().item())
        renders.append(imgs)

    out = {
        "identities": len(vectors),
        "seeds": seeds,
        "prompt": prompt,
        "fidelity": float(np.mean(fidelity)),
        "fidelity_sd": float(np.std(fidelity)),
        "floor": float(floor.mean()),
        "ceiling": float(np.mean(ceiling)),
        "id_accuracy": float(np.mean(id_hits)),
        "id_accuracy_chance": 1.0 / len(vectors),
        "render_change": float(np.mean(change)),
        "per_identity": {"fidelity": fidelity, "floor": floor.tolist(), "ceiling": ceiling},
        # Mean over identities for each seed: a weak base model renders some initial noises badly for every model.
        "per_seed": {"fidelity": torch.stack(per_seed).mean(0).tolist(),
                     "floor": base_sims.mean(1).tolist()},
    }
    if labels is not None and len(label_names):
        names = list(label_names)
        cols = [evaluators.attribute_names.index(a) for a in names]
        labels = torch.as_tensor(labels).float()

        def agreement(batches: list[torch.Tensor]) -> tuple[float, dict[str, float]]:
            hits = torch.cat([((evaluators.attributes(b)[:, cols] > 0.5).float() == labels[i]).float()
                              for i, b in enumerate(batches)])  # (sum of B_i, A)
            return hits.mean().item(), {a: hits[:, j].mean().item() for j, a in enumerate(names)}

        out["attribute_agreement"], out["attribute_agreement_per_attribute"] = agreement(renders)
        out["attribute_agreement_floor"], _ = agreement([base_imgs] * len(vectors))
        out["attribute_agreement_real"], _ = agreement(list(images))
    if keep_renders:
        out["_renders"] = renders
        out["_base_renders"] = base_imgs
    return out
