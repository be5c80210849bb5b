"""LoraLayout: the one mapping between a UNet's LoRA tensors and a flat weight vector.

Every model in a weights2weights space is one row vector. The layout fixes which
tensor sits where in that row, and it is derived from peft itself (never from
hand-built key strings), so a flattened row always round-trips to a state dict
that peft and diffusers load. It serialises to JSON and travels with every store.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import peft
import torch
from safetensors import safe_open
from safetensors.torch import save_file

LAYOUT_FORMAT = "w2w-lora-layout/1"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_FORMATS = ("diffusers", "kohya")  # export formats: save_diffusers, save_kohya


class LayoutMismatchError(ValueError):
    """Raised when a state dict or vector does not fit the layout (wrong keys or shapes)."""


def peft_lora_config(rank: int, alpha: float, targets: Sequence[str]) -> peft.LoraConfig:
    """The peft config of the published recipe (no dropout, no bias)."""
    return peft.LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights="gaussian",
    )


@dataclass(frozen=True)
class LoraLayout:
    """Ordered (peft state-dict key, shape) entries plus the LoRA hyper-parameters."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]
    rank: int
    alpha: float
    targets: tuple[str, ...]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_unet_config(
        cls,
        unet_config: Mapping,
        rank: int = 1,
        alpha: float = 27,
        targets: Sequence[str] = ("to_q", "to_v"),
    ) -> "LoraLayout":
        """Build the layout from a UNet2DConditionModel config without allocating weights."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(dict(unet_config))
        state = peft.get_peft_model_state_dict(peft.inject_adapter_in_model(peft_lora_config(rank, alpha, targets), unet))
        return cls._from_state(state, rank, alpha, targets)

    @classmethod
    def from_unet(
        cls, unet: torch.nn.Module, rank: int = 1, alpha: float = 27, targets: Sequence[str] = ("to_q", "to_v")
    ) -> "LoraLayout":
        """Layout of `unet` + LoRA; a UNet that already carries a peft adapter is read as it is."""
        if not hasattr(unet, "peft_config"):
            return cls.from_unet_config(unet.config, rank=rank, alpha=alpha, targets=targets)
        return cls._from_state(peft.get_peft_model_state_dict(unet), rank, alpha, targets)

    @classmethod
    def _from_state(cls, state, rank, alpha, targets) -> "LoraLayout":
        if not state:
            raise LayoutMismatchError(f"no module of the UNet matches the LoRA targets {list(targets)}")
        entries = tuple((key, tuple(int(s) for s in t.shape)) for key, t in state.items())
        return cls(entries=entries, rank=int(rank), alpha=float(alpha), targets=tuple(targets))

    # ---------------------------------------------------------------- geometry
    @cached_property
    def keys(self) -> list[str]:
        return [k for k, _ in self.entries]

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.entries)

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """key -> (start, stop) in the flat vector."""
        out, start = {}, 0
        for key, shape in self.entries:
            n = _numel(shape)
            out[key] = (start, start + n)
            start += n
        return out

    @cached_property
    def numel(self) -> int:
        return sum(_numel(s) for _, s in self.entries)

    @property
    def num_tensors(self) -> int:
        return len(self.entries)

    @property
    def scaling(self) -> float:
        """peft's multiplier on B @ A (alpha / rank)."""
        return self.alpha / self.rank

    @cached_property
    def modules(self) -> list[str]:
        """Adapted module paths in layout order (each owns one lora_A and one lora_B)."""
        seen: dict[str, None] = {}
        for key in self.keys:
            seen.setdefault(module_of(key), None)
        return list(seen)

    def peft_config(self) -> peft.LoraConfig:
        return peft_lora_config(self.rank, self.alpha, self.targets)

    # ---------------------------------------------------------------- flat <-> state dict
    def flatten(self, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """State dict (peft keys) -> 1-D float32 vector in layout order."""
        self.check_keys(state_dict.keys())
        parts = []
        for key, shape in self.entries:
            tensor = state_dict[key]
            if tuple(tensor.shape) != shape:
                raise LayoutMismatchError(f"tensor '{key}' has shape {tuple(tensor.shape)}, the layout expects {shape}")
            parts.append(tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32))
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """1-D vector -> state dict with peft keys (fresh tensors, safe to save or modify)."""
        vector = torch.as_tensor(vector)
        if vector.ndim != 1 or vector.numel() != self.numel:
            raise LayoutMismatchError(
                f"vector of shape {tuple(vector.shape)} does not fit this layout: expected ({self.numel},)"
            )
        out = {}
        for key, shape in self.entries:
            start, stop = self.offsets[key]
            out[key] = vector[start:stop].reshape(shape).clone()
        return out

    def check_keys(self, keys) -> None:
        keys = set(keys)
        expected = set(self.keys)
        if keys != expected:
            missing = sorted(expected - keys)
            unexpected = sorted(keys - expected)
            raise LayoutMismatchError(
                "state dict does not match the LoRA layout: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
                "Was it trained with a different base model, rank or target modules?"
            )

    # ---------------------------------------------------------------- single-model files
    def save(self, vector: torch.Tensor, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """One model as safetensors: peft-keyed tensors + the layout JSON in the header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"w2w_layout": self.to_json()}
        header.update({str(k): str(v) for k, v in (metadata or {}).items()})
        tmp = path.with_name(path.name + ".partial")
        save_file(self.unflatten(vector), str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    def load(self, path: str | os.PathLike) -> torch.Tensor:
        """Read a single-model safetensors file (by tensor name: peft, diffusers or kohya keys) into this layout's vector."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        if state and all(k.startswith("lora_unet_") for k in state):
            return self.flatten(self.from_kohya(state))
        state = {_strip_prefixes(k): v for k, v in state.items()}
        return self.flatten(state)

    # ---------------------------------------------------------------- diffusers export
    def to_diffusers(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """State dict in the keys diffusers' `load_lora_weights` expects (`unet.` prefix)."""
        return {f"unet.{k}": v for k, v in self.unflatten(vector).items()}

    def save_diffusers(self, vector: torch.Tensor, directory: str | os.PathLike) -> Path:
        """Write `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(directory)` loads.

        The peft adapter config (rank, alpha, targets) rides along as diffusers' LoRA
        adapter metadata, so the loader restores alpha=27 instead of defaulting to alpha=rank.
        """
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.peft_config().to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory=str(directory),
            unet_lora_layers=self.unflatten(vector),
            weight_name=DIFFUSERS_WEIGHT_NAME,
            unet_lora_adapter_metadata=_json_safe(config),
        )
        return directory / DIFFUSERS_WEIGHT_NAME

    # ---------------------------------------------------------------- kohya export
    def to_kohya(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """State dict in kohya's LoRA naming, which A1111, ComfyUI, kohya's scripts and diffusers load.

        Mapped by module name, so linear and conv modules alike (kohya's LoCon uses the same names):
        `lora_unet_<module path, '.' -> '_'>.lora_down.weight` (peft's lora_A), `.lora_up.weight`
        (lora_B) and a scalar `.alpha`. Those tools multiply up @ down by alpha / rank themselves and
        read alpha only from these scalars (not from diffusers' adapter metadata), so it rides in each.
        """
        state = self.unflatten(vector)
        out: dict[str, torch.Tensor] = {}
        for module in self.modules:
            name = kohya_name(module)
            if f"{name}.alpha" in out:
                raise LayoutMismatchError(f"modules collide under the kohya name {name!r}; kohya names cannot tell them apart")
            for peft_part, kohya_part in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
                key = f"{module}.{peft_part}.weight"
                if key not in state:
                    raise LayoutMismatchError(f"module {module!r} has no {key!r}: the kohya format needs one lora_A/lora_B pair per module")
                out[f"{name}.{kohya_part}.weight"] = state.pop(key).contiguous()
            out[f"{name}.alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        if state:
            raise LayoutMismatchError(f"the kohya format has no place for {sorted(state)[:3]} (only lora_A/lora_B pairs)")
        return out

    def save_kohya(self, vector: torch.Tensor, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """One kohya-format `.safetensors` file (see `to_kohya`); a directory gets `<its name>.safetensors`.

        The file name is what A1111 and ComfyUI list the LoRA as, hence the directory's name. kohya's
        `ss_network_*` metadata and the layout JSON ride in the header; `load` reads the file back.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / f"{path.name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": str(self.alpha),
            "w2w_layout": self.to_json(),
        }
        header.update({str(k): str(v) for k, v in (metadata or {}).items()})
        tmp = path.with_name(path.name + ".partial")
        save_file(self.to_kohya(vector), str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    def from_kohya(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """kohya-named tensors -> peft keys of this layout. A file alpha other than the layout's is
        folded into lora_B, so the model's effective weights are unchanged."""
        by_name = {kohya_name(m): m for m in self.modules}
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            name, _, part = key.partition(".")
            if name not in by_name:
                raise LayoutMismatchError(
                    f"kohya LoRA module {name!r} is not in this layout (targets {list(self.targets)}). "
                    "Was it trained with a different base model or target modules?"
                )
            if part in ("lora_down.weight", "lora_up.weight"):
                out[f"{by_name[name]}.{'lora_A' if part == 'lora_down.weight' else 'lora_B'}.weight"] = tensor
            elif part != "alpha":
                raise LayoutMismatchError(f"unexpected kohya tensor {key!r} (expected .lora_down.weight, .lora_up.weight, .alpha)")
        for name, module in by_name.items():
            alpha = state.get(f"{name}.alpha")
            key = f"{module}.lora_B.weight"
            if alpha is not None and key in out and float(alpha) != self.alpha:
                out[key] = out[key] * (float(alpha) / self.alpha)
        return out

    def merge(self, vector: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Base weights `<module>.weight` of the adapted modules -> W + alpha/rank * B @ A.

        What fusing the LoRA into the base model gives, computed from the layout alone (no peft or
        diffusers code in the path): the reference the exports are checked against. Conv modules:
        B is (out, r, 1, 1), A is (r, in, kh, kw), so B @ A reshapes to W's (out, in, kh, kw).
        """
        out = {}
        for module, delta in self.deltas(vector).items():
            w = weights[f"{module}.weight"]
            out[f"{module}.weight"] = (w.double() + delta.reshape(w.shape)).to(w.dtype)
        return out

    def deltas(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """module -> the update the LoRA adds to its weight, alpha/rank * B @ A, float64, as
        (out, in * kh * kw): the function the LoRA computes, free of the factorisation's B A = (B M)(M^-1 A)."""
        state = self.unflatten(vector)
        return {m: self.scaling * (state[f"{m}.lora_B.weight"].flatten(1).double() @ state[f"{m}.lora_A.weight"].flatten(1).double())
                for m in self.modules}

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {
            "format": LAYOUT_FORMAT,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "numel": self.numel,
            "entries": [[k, list(s)] for k, s in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoraLayout":
        if data.get("format") != LAYOUT_FORMAT:
            raise LayoutMismatchError(f"unknown layout format {data.get('format')!r}, expected {LAYOUT_FORMAT!r}")
        layout = cls(
            entries=tuple((k, tuple(int(x) for x in s)) for k, s in data["entries"]),
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            targets=tuple(data["targets"]),
        )
        if "numel" in data and int(data["numel"]) != layout.numel:
            raise LayoutMismatchError(f"layout JSON says numel={data['numel']} but its entries sum to {layout.numel}")
        return layout

    @classmethod
    def from_json(cls, text: str) -> "LoraLayout":
        return cls.from_dict(json.loads(text))

    @cached_property
    def fingerprint(self) -> str:
        """Short hash that changes whenever keys, shapes or LoRA hyper-parameters change."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def kohya_name(module: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'lora_unet_down_blocks_0_..._attn1_to_q'."""
    return "lora_unet_" + module.replace(".", "_")


def module_of(key: str) -> str:
    """'a.b.to_q.lora_A.weight' -> 'a.b.to_q'."""
    return key.split(".lora_")[0]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _strip_prefixes(key: str) -> str:
    """Accept files written by diffusers (`unet.` prefix) or with peft's adapter name."""
    if key.startswith("unet."):
        key = key[len("unet.") :]
    return key.replace(".default.", ".")


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
