"""The committed tiny base model (`builtin:tiny`) loads offline and samples quickly on CPU."""
from __future__ import annotations

import random
import time

import pytest
import torch

from w2w_core.config import ModelConfig
from w2w_core.model import ASSETS, TINY_VOCAB_WORDS, load_base_model

TINY = ASSETS / "tiny"
pytestmark = pytest.mark.skipif(not (TINY / "model_index.json").is_file(), reason="tiny weights not built")


@pytest.fixture(scope="module")
def base():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield load_base_model(ModelConfig(path="builtin:tiny", device="cpu"))
    finally:
        mp.undo()


def test_committed_weights_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 30e6, f"committed assets are {total / 1e6:.1f} MB"
    assert list(TINY.rglob("*.safetensors")), "weights must be safetensors"


def test_loads_and_generates(base):
    assert base.resolution == 64
    pipe = base.pipeline()
    t = time.perf_counter()
    out = pipe("a photo of a person, male", num_inference_steps=10, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    elapsed = time.perf_counter() - t
    assert out.shape == (1, 3, 64, 64)
    assert out.std() > 0.05  # not a constant image
    assert elapsed < 30  # a few seconds unloaded


def test_prompts_in_vocabulary(base):
    """Every pretraining caption (attributes and trait phrases) and the engine's prompts are whole
    tokens of the committed tokenizer and fit its length: nothing is <unk>, nothing is cut."""
    from jobs.pretrain_tiny import caption
    from pipeline.data.synthfaces import sample_identity, trait_phrases

    rng = random.Random(0)
    attrs = dict(male=1, beard=1, eyeglasses=1, bangs=1, smiling=1, young=0, pale_skin=1)
    prompts = ["sks person", "a photo of a person"] + [caption(attrs, rng) for _ in range(50)]
    for i in range(40):
        ident = sample_identity(1000, i)
        prompts += [caption(ident.attributes, rng, trait_phrases(ident)) for _ in range(5)]
    prompts.append(caption(attrs, random.Random(1), ["long chestnut hair", "green eyes", "pale skin"], p_plain=0, p_empty=0))
    unk = base.tokenizer.unk_token_id
    for p in prompts:
        ids = base.tokenizer(p).input_ids
        assert unk not in ids, p
        assert len(ids) <= base.tokenizer.model_max_length, p
    for w in ("sks", "person", "photo", "male", "female", "young", "old", "beard", "pale", "hair", "eyes"):
        assert w in TINY_VOCAB_WORDS


def test_vae_roundtrip(base):
    from pipeline.data.synthfaces import render_identity, to_tensor

    x = to_tensor(render_identity(1000, 0, 2))
    rec = base.decode_latents(base.encode_images(x))
    assert (rec - x).abs().mean() < 0.15
