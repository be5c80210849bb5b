"""Read the published weights2weights release files safely, mapping columns BY MODULE NAME.

Files (REFERENCE.md section 2): `weight_dimensions.pt` (ordered dict kohya key -> [(numel,), shape]
in release order: down, mid, up blocks; per module lora_down (A) then lora_up (B)), `mean.pt`,
`std.pt` ((1, D) or (D,)), `V.pt` (D x K), `proj_1000pc.pt` (N x K'), `identity_df.pt`
(attribute labels; here a dict of column -> list/tensor). Everything is read with
`torch.load(..., weights_only=True)`: no pickle code ever runs.

The release order is not ours (peft: down, up, mid), so `release_permutation` builds the
index map ours[i] = release[perm[i]] from the key names and checks every size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from w2w_core.layout import LayoutMismatchError, LoraLayout, module_of

KOHYA_PREFIX = "lora_unet_"
ID_COLUMNS = ("identity", "file", "name", "id", "folder")


def peft_to_kohya(key: str) -> str:
    """'down_blocks.0...attn1.to_q.lora_A.weight' -> 'lora_unet_down_blocks_0_..._attn1_to_q.lora_down.weight'."""
    module = module_of(key)
    part = key[len(module) + 1 :]  # lora_A.weight
    kind = {"lora_A": "lora_down", "lora_B": "lora_up"}[part.split(".")[0]]
    return f"{KOHYA_PREFIX}{module.replace('.', '_')}.{kind}.weight"


def _load(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"release file not found: {path}")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _numel(entry) -> int:
    first = entry[0]
    if isinstance(first, (tuple, list, torch.Size)):
        return int(first[0])
    return int(first)


def release_permutation(weight_dimensions: Mapping, layout: LoraLayout) -> torch.Tensor:
    """Index tensor perm (D,) with ours = release[..., perm]; raises if names or sizes disagree."""
    starts, start = {}, 0
    for key, entry in weight_dimensions.items():
        n = _numel(entry)
        starts[key] = (start, n)
        start += n
    if start != layout.numel:
        raise LayoutMismatchError(f"release vectors have {start} values, our layout has {layout.numel}")
    parts = []
    missing = []
    for key, shape in layout.entries:
        kohya = peft_to_kohya(key)
        if kohya not in starts:
            missing.append(kohya)
            continue
        s, n = starts[kohya]
        ours_n = 1
        for x in shape:
            ours_n *= int(x)
        if n != ours_n:
            raise LayoutMismatchError(f"release tensor {kohya} has {n} values, our {key} has shape {shape}")
        parts.append(torch.arange(s, s + n))
    if missing:
        raise LayoutMismatchError(f"{len(missing)} layout tensors are not in the release (e.g. {missing[:3]})")
    return torch.cat(parts)


def read_identity_table(obj) -> tuple[list[str] | None, dict[str, torch.Tensor]]:
    """dict of column -> list/tensor -> (identities or None, {attribute: 0/1 float tensor})."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            "identity table must load as a dict of columns with weights_only=True "
            f"(got {type(obj).__name__}); convert a pandas DataFrame with df.to_dict('list')"
        )
    identities, labels = None, {}
    for name, col in obj.items():
        values = col.tolist() if hasattr(col, "tolist") else list(col)
        if name.lower() in ID_COLUMNS or (values and isinstance(values[0], str)):
            if identities is None:
                identities = [str(v) for v in values]
            continue
        t = torch.tensor(values, dtype=torch.float32)
        uniq = torch.unique(t)
        if uniq.numel() <= 2:
            labels[name] = (t > (0 if uniq.min() < 0 else 0.5)).float()
    return identities, labels


def load_release(
    directory,
    layout: LoraLayout,
    components: int | None = None,
    proj_file: str = "proj_1000pc.pt",
    identity_file: str = "identity_df.pt",
    fit_directions: bool = True,
    disentangle: Mapping | None = None,
):
    """Release folder -> WeightSpace in our layout order (components = the first K columns of V)."""
    import numpy as np

    from w2w_core import directions as D
    from w2w_core.space import WeightSpace

    directory = Path(directory)
    dims = _load(directory / "weight_dimensions.pt")
    perm = release_permutation(dims, layout)
    mean = _load(directory / "mean.pt").reshape(-1).float()[perm]
    std = _load(directory / "std.pt").reshape(-1).float()[perm]
    v = _load(directory / "V.pt").float()
    if v.shape[0] != layout.numel:
        raise LayoutMismatchError(f"V.pt has shape {tuple(v.shape)}, expected ({layout.numel}, K)")
    proj = _load(directory / proj_file).float()
    k = min(v.shape[1], proj.shape[1]) if components is None else int(components)
    if k > min(v.shape[1], proj.shape[1]):
        raise ValueError(f"K={k} but the release has {v.shape[1]} components and {proj.shape[1]} projections")
    comps = v[perm, :k].T.contiguous()
    coeffs = proj[:, :k]
    identities, labels = None, {}
    if (directory / identity_file).is_file():
        identities, labels = read_identity_table(_load(directory / identity_file))
    dirs, strengths = {}, {}
    if fit_directions and labels:
        c = coeffs.double().numpy()
        raw = {n: D.fit_lstsq(c, y.numpy()) for n, y in labels.items() if torch.unique(y).numel() == 2}
        dirs = D.debias(raw, disentangle or {})
        strengths = {n: D.calibrated_strength(c, d) for n, d in dirs.items()}
        dirs = {n: torch.from_numpy(np.asarray(d, dtype=np.float32)) for n, d in dirs.items()}
    std_safe = torch.where(std == 0, torch.ones_like(std), std)
    return WeightSpace(
        layout,
        mean,
        std_safe,
        comps,
        coeffs,
        identities=identities,
        directions=dirs,
        strengths=strengths,
        labels=labels,
        meta={"source": "release", "directory": str(directory), "k": k},
    )
