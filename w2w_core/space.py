"""WeightSpace: the linear subspace of identity LoRAs, as a researcher uses it.

    space = WeightSpace.load("runs/tiny")          # reads runs/tiny/subspace/* + manifest.parquet
    w = space.sample(4, seed=0)                    # (4, D) new identities
    w2 = space.edit(w[0], {"beard": 1.0})          # +1 calibrated sigma of "beard"
    pipe = space.pipeline(w2)                      # diffusers pipeline with that LoRA loaded

Depends on torch, safetensors, pyarrow (manifest) and w2w_core only: no Dask, no Ray.
Vectors are torch tensors (numpy arrays are accepted) in the store's LoRA layout order.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from w2w_core.layout import LORA_FORMATS, LoraLayout

SUBSPACE_DIR = "subspace"
PCA_FILE = "pca.safetensors"
PCA_META = "pca.json"
DIRECTIONS_FILE = "directions.safetensors"
DIRECTIONS_META = "directions.json"
MANIFEST = "manifest.parquet"


class WeightSpace:
    """mean (D), std (D), components (K x D, orthonormal rows), training coefficients (N x K)."""

    def __init__(
        self,
        layout: LoraLayout,
        mean,
        std,
        components,
        coefficients,
        identities: list[str] | None = None,
        singular_values=None,
        explained_variance_ratio=None,
        directions: Mapping[str, torch.Tensor] | None = None,
        strengths: Mapping[str, float] | None = None,
        labels: Mapping[str, torch.Tensor] | None = None,
        config: dict | None = None,
        meta: dict | None = None,
        rows=None,
        edit_components: int | None = None,
    ):
        f = lambda a: torch.as_tensor(a).to(torch.float32)  # noqa: E731
        self.layout = layout
        self.mean = f(mean).reshape(-1)
        self.std = f(std).reshape(-1)
        self.components = f(components)
        self.coefficients = f(coefficients)
        k, d = self.components.shape
        if d != layout.numel or self.mean.numel() != d or self.std.numel() != d:
            raise ValueError(
                f"subspace shapes do not fit the layout: components {tuple(self.components.shape)}, "
                f"mean {tuple(self.mean.shape)}, std {tuple(self.std.shape)}, layout numel {layout.numel}"
            )
        if self.coefficients.ndim != 2 or self.coefficients.shape[1] != k:
            raise ValueError(f"coefficients {tuple(self.coefficients.shape)} do not match K={k}")
        n = self.coefficients.shape[0]
        self.identities = list(identities) if identities is not None else [str(i) for i in range(n)]
        # Store row of each training model (aligned with `coefficients`, `identities`, `labels`).
        self.rows = [int(r) for r in rows] if rows is not None else list(range(n))
        self.singular_values = None if singular_values is None else f(singular_values)
        self.explained_variance_ratio = None if explained_variance_ratio is None else f(explained_variance_ratio)
        self.directions = {k_: f(v) for k_, v in (directions or {}).items()}
        self.strengths = {k_: float(v) for k_, v in (strengths or {}).items()}
        self.labels = dict(labels or {})
        self.config = config or {}
        self.meta = meta or {}
        # Leading PCs that directions and sampling use (`w2w directions --components`); inversion uses all K.
        self.edit_k = min(int(edit_components), k) if edit_components else k
        self.coef_mean = self.coefficients.mean(dim=0)
        self.coef_std = self.coefficients.std(dim=0) if n > 1 else torch.ones(k)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, out: str | os.PathLike) -> "WeightSpace":
        """Read `<out>/subspace/` (written by `w2w pca` / `w2w directions`) and `<out>/manifest.parquet`.

        `out` is a local path or an fsspec URL (s3://..., file://...), like `build.out`."""
        import fsspec
        import pyarrow.parquet as pq
        from safetensors.torch import load as load_safetensors

        fs, root = fsspec.core.url_to_fs(str(out))
        root = root.rstrip("/")
        sub = f"{root}/{SUBSPACE_DIR}"
        if not (fs.isfile(f"{sub}/{PCA_META}") and fs.isfile(f"{sub}/{PCA_FILE}")):
            raise FileNotFoundError(f"no subspace at {out}/{SUBSPACE_DIR} (expected {PCA_FILE} and {PCA_META}); "
                                    f"run `w2w pca {out}` first")
        meta = json.loads(fs.cat_file(f"{sub}/{PCA_META}"))
        t = load_safetensors(fs.cat_file(f"{sub}/{PCA_FILE}"))
        layout = LoraLayout.from_json(meta["layout"])
        rows = t["rows"].tolist()
        identities, labels = None, {}
        manifest = f"{root}/{MANIFEST}"
        if fs.isfile(manifest):
            table = pq.read_table(manifest, filesystem=fs)
            by_row = {int(r): i for i, r in enumerate(table.column("row").to_pylist())}
            idx = [by_row[r] for r in rows]
            ids = table.column("identity").to_pylist()
            identities = [ids[i] for i in idx]
            for name in meta.get("attributes") or []:
                if name in table.column_names:
                    col = table.column(name).to_pylist()
                    labels[name] = torch.tensor([col[i] for i in idx], dtype=torch.float32)
        directions, strengths, edit_components = {}, {}, None
        if fs.isfile(f"{sub}/{DIRECTIONS_META}"):
            edit_components = json.loads(fs.cat_file(f"{sub}/{DIRECTIONS_META}")).get("edit_components")
        if fs.isfile(f"{sub}/{DIRECTIONS_FILE}"):
            d = load_safetensors(fs.cat_file(f"{sub}/{DIRECTIONS_FILE}"))
            for key, value in d.items():
                kind, name = key.split(".", 1)
                if kind == "direction":
                    directions[name] = value
                elif kind == "strength":
                    strengths[name] = float(value)
            # the file's key order is arbitrary (safetensors' header is a hash map): use the manifest's order
            manifest_order = meta.get("attributes") or []
            order = [a for a in manifest_order if a in directions] + sorted(set(directions) - set(manifest_order))
            directions = {a: directions[a] for a in order}
        return cls(
            layout,
            t["mean"],
            t["std"],
            t["components"],
            t["coefficients"],
            identities=identities,
            singular_values=t.get("singular_values"),
            explained_variance_ratio=t.get("explained_variance_ratio"),
            directions=directions,
            strengths=strengths,
            labels=labels,
            config=meta.get("config") or {},
            meta=meta,
            rows=rows,
            edit_components=edit_components,
        )

    @classmethod
    def from_release(cls, directory, layout: LoraLayout, **kwargs) -> "WeightSpace":
        """Build a space from the published release files (see w2w_core.release)."""
        from w2w_core.release import load_release

        return load_release(directory, layout, **kwargs)

    # ------------------------------------------------------------------ geometry
    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def numel(self) -> int:
        return int(self.components.shape[1])

    @property
    def attribute_names(self) -> list[str]:
        return list(self.directions) if self.directions else list(self.labels)

    def _vec(self, vec) -> torch.Tensor:
        v = torch.as_tensor(vec).to(torch.float32)
        if v.shape[-1] != self.numel:
            raise ValueError(f"vector of shape {tuple(v.shape)} does not fit this space: expected (..., {self.numel})")
        return v

    def project(self, vec) -> torch.Tensor:
        """(..., D) weights -> (..., K) coefficients: ((w - mean) / std) @ components^T."""
        return ((self._vec(vec) - self.mean) / self.std) @ self.components.T

    def reconstruct(self, coeffs) -> torch.Tensor:
        """(..., k<=K) coefficients -> (..., D) weights: mean + std * (coeffs @ components[:k])."""
        c = torch.as_tensor(coeffs).to(torch.float32)
        k = c.shape[-1]
        if k > self.k:
            raise ValueError(f"{k} coefficients given but the space has K={self.k} components")
        return self.mean + self.std * (c @ self.components[:k])

    def sample(self, n: int, seed: int | None = 0, k: int | None = None) -> torch.Tensor:
        """(n, D) new models: each of the first k PC coefficients ~ Normal(mean, std of the training
        coefficients), the rest 0 (the training models' mean); k defaults to the PCs the directions use (`edit_k`)."""
        k = self.edit_k if k is None else int(k)
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        z = torch.randn(int(n), k, generator=g)
        return self.reconstruct(self.coef_mean[:k] + self.coef_std[:k] * z)

    def direction_vector(self, name: str) -> torch.Tensor:
        """Weight-space delta of +1 calibrated sigma along attribute `name` (D,)."""
        self._check_attribute(name)
        return self.std * ((self.strengths.get(name, 1.0) * self.directions[name]) @ self.components)

    def edit(self, vec, edits: Mapping[str, float]) -> torch.Tensor:
        """w + sum_a alpha_a * sigma_a * direction_a (in weight space; the off-subspace residual is kept).

        `edits` maps attribute -> strength in units of the calibrated sigma; edits compose by addition.
        The projection of the result moves by exactly sum alpha_a sigma_a d_a.
        """
        v = self._vec(vec)
        delta = torch.zeros(self.k)
        for name, alpha in edits.items():
            self._check_attribute(name)
            delta = delta + float(alpha) * self.strengths.get(name, 1.0) * self.directions[name]
        return v + self.std * (delta @ self.components)

    def attribute_score(self, vec, name: str) -> torch.Tensor:
        """Projection of a model onto the unit direction of `name` (in PC units)."""
        self._check_attribute(name)
        return self.project(vec) @ self.directions[name]

    def nearest(self, vec, k: int = 5) -> list[tuple[str, float]]:
        """The k training identities closest to `vec` in the leading PCs identities are sampled and edited
        in (`edit_k`; Euclidean), with distances. A sample has no say beyond them, where the training
        models' own remainders would otherwise pick its neighbour."""
        e = self.edit_k
        c = self.project(vec).reshape(-1)[:e]
        d = torch.linalg.vector_norm(self.coefficients[:, :e] - c, dim=1)
        k = min(int(k), d.numel())
        vals, idx = torch.topk(d, k, largest=False)
        return [(self.identities[int(i)], float(v)) for v, i in zip(vals, idx)]

    def _check_attribute(self, name: str) -> None:
        if name not in self.directions:
            valid = ", ".join(sorted(self.directions)) or "(none: run `w2w directions OUT` first)"
            raise ValueError(f"unknown attribute {name!r}; valid attributes: {valid}")

    # ------------------------------------------------------------------ LoRA export
    def to_lora(self, vec) -> dict[str, torch.Tensor]:
        """(D,) weights -> peft state dict (keys of the layout)."""
        return self.layout.unflatten(self._vec(vec).reshape(-1))

    def save_lora(self, vec, directory, format: str = "diffusers") -> Path:
        """Write the model as a LoRA file in `directory` and return the file's path.

        `diffusers`: `pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights(directory)`
        (alpha in diffusers' adapter metadata). `kohya`: `<directory name>.safetensors` with
        `lora_unet_*` keys and a per-module alpha, the format A1111, ComfyUI and kohya's scripts
        read (diffusers loads it too); other tools ignore diffusers' metadata and would lose alpha.
        """
        vec = self._vec(vec).reshape(-1)
        if format == "diffusers":
            return self.layout.save_diffusers(vec, directory)
        if format == "kohya":
            return self.layout.save_kohya(vec, directory)
        raise ValueError(f"unknown LoRA format {format!r}; valid formats: {', '.join(LORA_FORMATS)}")

    def model_config(self):
        """The base model config the store was built with (its `config.model` section)."""
        from w2w_core.config import ModelConfig

        model = dict((self.config or {}).get("model") or {})
        known = set(ModelConfig.__dataclass_fields__)
        return ModelConfig(**{k: v for k, v in model.items() if k in known})

    def pipeline(self, vec, model_cfg=None, base=None, adapter_name: str = "w2w", *, original=None,
                 edit_start: float = 0.0):
        """A ready StableDiffusionPipeline (base from `model_cfg`, default: the store's) with this LoRA loaded.

        Timestep-gated edits (the paper's option): with `original` (the unedited model) and
        `edit_start` > 0, the returned pipeline denoises the first `edit_start` fraction of the
        steps with `original` and the rest with `vec` (w2w_core.render.GatedEditPipeline).
        """
        from w2w_core.model import load_base_model
        from w2w_core.render import GatedEditPipeline, edit_switch_step

        edit_switch_step(edit_start, 1)  # validates the fraction before loading anything
        if base is None:
            base = load_base_model(model_cfg if model_cfg is not None else self.model_config())
        pipe = base.pipeline()
        with tempfile.TemporaryDirectory() as tmp:
            self.save_lora(vec, tmp)
            pipe.load_lora_weights(tmp, adapter_name=adapter_name)
        if original is None or edit_start == 0:
            return pipe
        with tempfile.TemporaryDirectory() as tmp:
            self.save_lora(original, tmp)
            pipe.load_lora_weights(tmp, adapter_name=f"{adapter_name}_unedited")
        return GatedEditPipeline(pipe, f"{adapter_name}_unedited", adapter_name, edit_start)

    def base_model(self, model_cfg=None):
        """The frozen base model the store was built with (or `model_cfg`), loaded once per call."""
        from w2w_core.model import load_base_model

        return load_base_model(model_cfg if model_cfg is not None else self.model_config())

    def invert(self, image, *, base=None, preset: str = "in", prompt: str = "sks person", **overrides):
        """One image -> InversionResult (coefficients + LoRA vector) by optimising PC coefficients.

        `image` is a path, a PIL image or a (3, H, W) tensor in [-1, 1]. `preset` is "in"
        (10,000-PC style, lr 0.1, 400 steps) or "out" (1,000 PCs, lr 1.0, 800 steps); keyword
        overrides (n_components, steps, lr, lr_schedule, weight_decay, mask, seed, progress) win over it.
        The number of PCs is capped by what the space has.
        """
        from w2w_core.invert import invert
        from w2w_core.render import load_image

        settings = self._inversion_settings(preset, overrides)  # a bad preset fails before the model loads
        base = base if base is not None else self.base_model()
        if not isinstance(image, torch.Tensor):
            image = load_image(image, base.resolution)
        return invert(base, self.layout, self.mean, self.std, self.components, image, prompt=prompt, **settings)

    def invert_batch(self, images: torch.Tensor, *, base=None, preset: str = "in", prompt: str = "sks person",
                     **overrides):
        """Several images (N, 3, H, W) in [-1, 1] -> one InversionResult each, fitted together in one batch
        (w2w_core.invert.invert_batch: each fit is the one `invert` makes alone, faster per image).
        Settings as `invert`, with `masks` (N, H, W) instead of `mask`."""
        from w2w_core.invert import invert_batch

        settings = self._inversion_settings(preset, overrides)
        base = base if base is not None else self.base_model()
        return invert_batch(base, self.layout, self.mean, self.std, self.components, images, prompt=prompt, **settings)

    @staticmethod
    def _inversion_settings(preset: str, overrides: dict) -> dict:
        """The preset's settings (components -> n_components), then the overrides that are not None."""
        from w2w_core.invert import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"unknown inversion preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        settings = dict(PRESETS[preset])
        settings["n_components"] = settings.pop("components")
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return settings

    def __repr__(self) -> str:
        return (
            f"WeightSpace(K={self.k}, D={self.numel}, models={self.coefficients.shape[0]}, "
            f"attributes={self.attribute_names})"
        )
