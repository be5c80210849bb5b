"""Tiny-world evaluators: an identity embedder and an attribute classifier (one small CNN).

Stand-ins for the paper's face-recognition embedding (identity preservation) and attribute
labels, trained by `python -m jobs.train_evaluators` on SynthFaces renders of identities
disjoint from everything else (seeds 2000 train / 3000 held-out). Weights:
w2w_core/assets/evaluators/{evaluators.safetensors, evaluators.json}.

    ev = load_evaluators()
    ev.embed(images)        # images in [-1, 1], (B, 3, 64, 64) -> (B, E) unit vectors
    ev.attributes(images)   # -> (B, n_attr) probabilities, columns = ev.attribute_names
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EVALUATOR_DIR = Path(__file__).resolve().parents[2] / "w2w_core" / "assets" / "evaluators"
WEIGHTS = "evaluators.safetensors"
META = "evaluators.json"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class EvaluatorNet(nn.Module):
    """64x64 RGB -> (embedding, attribute logits)."""

    def __init__(self, n_attributes: int, embed_dim: int = 64, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w))
        self.embed_head = nn.Linear(4 * w * 16, embed_dim)
        self.attr_head = nn.Sequential(nn.Linear(4 * w * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, n_attributes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)  # (B, 4w, 4, 4): keep the spatial layout (faces are aligned)
        h = h.flatten(1)
        return F.normalize(self.embed_head(h), dim=-1), self.attr_head(h)


class Evaluators:
    def __init__(self, net: EvaluatorNet, attribute_names: list[str], meta: dict | None = None):
        self.net = net.eval()
        self.attribute_names = list(attribute_names)
        self.meta = meta or {}
        self.resolution = int(self.meta.get("resolution", 64))

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu()
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                   antialias=True, align_corners=False)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._prep(images))[0]

    @torch.no_grad()
    def attributes(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(self._prep(images))[1])

    @torch.no_grad()
    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine identity similarity of paired images a[i], b[i]."""
        return (self.embed(a) * self.embed(b)).sum(-1)


def save_evaluators(net: EvaluatorNet, attribute_names: list[str], meta: dict, directory: str | Path = EVALUATOR_DIR) -> Path:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / WEIGHTS))
    (d / META).write_text(json.dumps({**meta, "attribute_names": list(attribute_names)}, indent=2) + "\n")
    return d


def load_evaluators(directory: str | Path | None = None) -> Evaluators:
    from safetensors.torch import load_file

    d = Path(directory) if directory is not None else EVALUATOR_DIR
    if not (d / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"evaluator weights not found at {d / WEIGHTS}; train them with `python -m jobs.train_evaluators` "
            "(see docs/TINY_WORLD.md)"
        )
    meta = json.loads((d / META).read_text())
    net = EvaluatorNet(len(meta["attribute_names"]), embed_dim=meta.get("embed_dim", 64), width=meta.get("width", 32))
    net.load_state_dict(load_file(str(d / WEIGHTS)))
    return Evaluators(net, meta["attribute_names"], meta)


def verification_accuracy(emb: torch.Tensor, labels: torch.Tensor, threshold: float | None = None) -> tuple[float, float]:
    """Accuracy of `cos > threshold` on all same/different pairs (balanced: mean of both rates).

    With threshold None the best threshold is searched (use it on training identities only).
    """
    sim = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    iu = torch.triu_indices(len(labels), len(labels), offset=1)
    s, y = sim[iu[0], iu[1]], same[iu[0], iu[1]]

    def acc(th: float) -> float:
        return 0.5 * ((s[y] > th).float().mean() + (s[~y] <= th).float().mean()).item()

    if threshold is None:
        grid = torch.linspace(-1, 1, 401).tolist()
        threshold = max(grid, key=acc)
    return acc(threshold), float(threshold)
