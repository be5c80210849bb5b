"""Does the base model's VAE keep what the evaluators read? (docs/TINY_WORLD.md, "Tiny base model")

Encodes and decodes held-out SynthFaces images (seed 3000, image 0 of each identity) with the VAE of
--model and compares the evaluators on originals and reconstructions: identity-embedding cosine, and
each attribute's accuracy against the labels. If an attribute survives the round trip, a base model
that cannot draw it is limited by its UNet, not by its VAE.

    python benchmarks/vae_check.py                       # the committed builtin:tiny
    python benchmarks/vae_check.py --model /path/to/pretrain_out --identities 200
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny", help="base model (diffusers folder or builtin:tiny)")
    p.add_argument("--identities", type=int, default=120, help="held-out identities (SynthFaces seed 3000)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from pipeline.data.synthfaces import SEED_EVAL_HELDOUT, render, sample_identity, to_tensor
    from pipeline.eval.evaluators import load_evaluators
    from w2w_core.config import ModelConfig
    from w2w_core.model import load_base_model

    torch.set_num_threads(args.threads)
    evaluators = load_evaluators()
    base = load_base_model(ModelConfig(path=args.model), "cpu")
    identities = [sample_identity(SEED_EVAL_HELDOUT, i) for i in range(args.identities)]
    images = to_tensor(np.stack([render(identity, 0) for identity in identities]))
    with torch.no_grad():
        recon = base.decode_latents(base.encode_images(images))
        p_real, p_recon = evaluators.attributes(images), evaluators.attributes(recon)
        id_cos = (evaluators.embed(images) * evaluators.embed(recon)).sum(1).mean().item()
    result = {"model": args.model, "identities": args.identities, "l1": (images - recon).abs().mean().item(),
              "identity_cosine": id_cos, "attribute_accuracy": {}}
    for j, name in enumerate(evaluators.attribute_names):
        labels = torch.tensor([identity.attributes[name] for identity in identities]).bool()
        result["attribute_accuracy"][name] = {
            "real": ((p_real[:, j] > 0.5) == labels).float().mean().item(),
            "reconstructed": ((p_recon[:, j] > 0.5) == labels).float().mean().item()}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
