"""Identity fidelity (pipeline.eval.fidelity, the report's first section) on a small trained space.

The LoRAs of conf/tiny.yaml's recipe, trained briefly on 3 SynthFaces identities, must render
their identities measurably better than the base model does (the floor), and a trained LoRA must
change the render where a zero LoRA changes nothing. Cheap: 3 identities, 150 steps, 10 DDIM steps.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.synthfaces import ATTRIBUTE_NAMES, render_identity, sample_identity, to_tensor
from pipeline.eval.evaluators import load_evaluators
from pipeline.eval.fidelity import identity_fidelity
from pipeline.eval.report import Renderer
from pipeline.train import IdentityInput, train_identities
from w2w_core.layout import LoraLayout
from w2w_core.model import load_base_model

N = 3


@pytest.fixture(scope="module")
def trained():
    cfg = load_config("conf/tiny.yaml", ["train.steps=150", f"train.identities_per_batch={N}",
                                         "train.num_class_images=4", "train.class_image_steps=4"])
    base = load_base_model(cfg.model)
    layout = LoraLayout.from_unet(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    idents = [sample_identity(0, i) for i in range(N)]
    images = [to_tensor(render_identity(0, i, 8)) for i in range(N)]
    results = train_identities(base, layout, cfg.train, [IdentityInput(idents[i].id, images[i], seed=i) for i in range(N)])
    assert all(r.status == "ok" for r in results)
    labels = torch.tensor([[idents[i].attributes[a] for a in ATTRIBUTE_NAMES] for i in range(N)])
    render = Renderer(base, layout, steps=10)
    yield render, [r.vector for r in results], images, labels, layout


def test_trained_loras_hold_identity_above_the_floor(trained):
    render, vectors, images, labels, _ = trained
    f = identity_fidelity(render.many, load_evaluators(), vectors, images, labels, ATTRIBUTE_NAMES)
    assert f["ceiling"] > 0.8  # real images of one identity agree with each other
    assert f["fidelity"] > f["floor"] + 0.1, f
    assert f["attribute_agreement"] > f["attribute_agreement_floor"], f


def test_trained_lora_changes_the_render_and_a_zero_lora_does_not(trained):
    render, vectors, images, labels, layout = trained
    ev = load_evaluators()
    zero = identity_fidelity(render.many, ev, [torch.zeros(layout.numel)] * N, images)
    trained_f = identity_fidelity(render.many, ev, vectors, images)
    assert zero["render_change"] == 0.0 and zero["fidelity"] == pytest.approx(zero["floor"], abs=1e-6)
    assert trained_f["render_change"] > 0.05, trained_f["render_change"]
