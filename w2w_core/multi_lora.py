"""Many LoRAs in one forward pass of the frozen base UNet.

Each adapted module of the layout is temporarily replaced by a module holding K stacked
LoRAs (A (K, r, in), B (K, out, r); for a convolution peft's conv LoRA, A a conv with the
base's kernel and B a 1x1 conv). The batch is model-major: with m samples per model,
samples k*m .. k*m+m-1 see LoRA k. `copies` stacked such batches are allowed, because
classifier-free guidance runs the unconditional and the conditional halves of one batch
as [all K*m unconditional; all K*m conditional].

The batched trainer uses this to train K identities per step; rendering uses it to draw
K models per call (`MultiLoraSlot`), which on a CPU is about 3x faster per image than one
model per call at the tiny world's size (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import torch

from w2w_core.layout import LayoutMismatchError, LoraLayout


def _hold(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """A trainer's factors are Parameters; a slot's are (non-persistent) buffers, so that
    torch.func.functional_call can substitute them (a differentiable inversion, `MultiLoraSlot.functional_params`)."""
    if isinstance(tensor, torch.nn.Parameter):
        setattr(module, name, tensor)
    else:
        module.register_buffer(name, tensor, persistent=False)


class MultiLoraLinear(torch.nn.Module):
    """y = base(x) + scaling * B_k A_k x for the samples of model k (model-major batch)."""

    def __init__(self, base_layer: torch.nn.Linear, A: torch.nn.Parameter, B: torch.nn.Parameter, scaling: float,
                 copies: int = 1):
        super().__init__()
        self.base_layer = base_layer
        _hold(self, "A", A)  # (K, r, in)
        _hold(self, "B", B)  # (K, out, r)
        self.scaling = float(scaling)
        self.copies = int(copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        K, C = self.A.shape[0], self.copies
        xs = x.to(self.A.dtype if not torch.is_autocast_enabled() else x.dtype)
        # (C*K*m, ..., in) -> (K, C*m*seq, in); with C = 1 both reshapes are views
        xs = xs.reshape(C, K, -1, x.shape[-1]).transpose(0, 1).reshape(K, -1, x.shape[-1])
        h = torch.bmm(xs, self.A.transpose(1, 2))  # (K, rows, r)
        delta = torch.bmm(h, self.B.transpose(1, 2))  # (K, rows, out)
        delta = delta.reshape(K, C, -1, delta.shape[-1]).transpose(0, 1)
        return result + (delta * self.scaling).reshape(result.shape).to(result.dtype)


class MultiLoraConv2d(torch.nn.Module):
    """peft's conv LoRA for K models at once: y = base(x) + scaling * B_k(A_k(x)).

    The model-major batch (C*K*m, c, H, W) is folded into channels (C*m, K*c, H, W), so A
    and B each run as ONE grouped convolution with K groups.
    """

    def __init__(self, base_layer: torch.nn.Conv2d, A: torch.nn.Parameter, B: torch.nn.Parameter, scaling: float,
                 copies: int = 1):
        super().__init__()
        self.base_layer = base_layer
        _hold(self, "A", A)  # (K, r, in, kh, kw)
        _hold(self, "B", B)  # (K, out, r, 1, 1)
        self.scaling = float(scaling)
        self.copies = int(copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        K, r, c = self.A.shape[:3]
        C, out = self.copies, self.B.shape[1]
        xs = x.to(self.A.dtype if not torch.is_autocast_enabled() else x.dtype)
        m = xs.shape[0] // (C * K)
        xs = xs.reshape(C, K, m, c, *xs.shape[2:]).transpose(1, 2).reshape(C * m, K * c, *xs.shape[2:])
        conv = self.base_layer
        h = torch.nn.functional.conv2d(xs, self.A.reshape(K * r, c, *self.A.shape[3:]), None, conv.stride, conv.padding, 1, K)
        d = torch.nn.functional.conv2d(h, self.B.reshape(K * out, r, 1, 1), None, 1, 0, 1, K)  # (C*m, K*out, H', W')
        d = d.reshape(C, m, K, out, *d.shape[2:]).transpose(1, 2).reshape(result.shape)
        return result + (d * self.scaling).to(result.dtype)


def multi_lora(base_layer: torch.nn.Module, A, B, scaling: float, copies: int = 1) -> torch.nn.Module:
    if isinstance(base_layer, torch.nn.Conv2d):
        return MultiLoraConv2d(base_layer, A, B, scaling, copies)
    return MultiLoraLinear(base_layer, A, B, scaling, copies)


def swap_module(unet: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = unet.get_submodule(parent_name) if parent_name else unet
    setattr(parent, child, module)


def module_shapes(layout: LoraLayout) -> dict[str, tuple[int, int]]:
    """module -> (in_features, out_features) read from the layout's A/B shapes."""
    shapes: dict[str, list[int]] = {}
    for key, shape in layout.entries:
        module = key.split(".lora_")[0]
        entry = shapes.setdefault(module, [0, 0])
        if ".lora_A." in key:
            entry[0] = shape[1]
        elif ".lora_B." in key:
            entry[1] = shape[0]
    return {m: (i, o) for m, (i, o) in shapes.items()}


def check_layout_modules(layout: LoraLayout, unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's linears and 2-d convolutions named by the layout, shapes checked; LayoutMismatchError if not.

    A convolution's LoRA is peft's: A is a conv with the base's kernel, stride and padding
    (rank output channels), B a 1x1 conv; only dilation 1 and groups 1 are supported, as in
    every SD1.5 UNet convolution."""
    named = dict(unet.named_modules())
    shapes = module_shapes(layout)
    missing = [m for m in layout.modules if m not in named]
    if missing:
        raise LayoutMismatchError(
            f"the LoRA layout does not match this UNet: {len(missing)} of {len(layout.modules)} adapted modules "
            f"are missing (e.g. {missing[:3]}). Was the layout built for a different base model?"
        )
    out = {}
    for m in layout.modules:
        mod = named[m]
        base_layer = getattr(mod, "base_layer", mod)
        a_shape = tuple(layout.shapes[f"{m}.lora_A.weight"])
        if isinstance(base_layer, torch.nn.Linear):
            have, kernel_ok = (base_layer.in_features, base_layer.out_features), len(a_shape) == 2
        elif isinstance(base_layer, torch.nn.Conv2d):
            if base_layer.groups != 1 or tuple(base_layer.dilation) != (1, 1):
                raise LayoutMismatchError(
                    f"layout module '{m}' is a Conv2d with groups={base_layer.groups}, dilation={base_layer.dilation}; "
                    "LoRA on convolutions supports groups 1 and dilation 1 only"
                )
            have = (base_layer.in_channels, base_layer.out_channels)
            kernel_ok = a_shape[2:] == tuple(base_layer.kernel_size)
        else:
            raise LayoutMismatchError(f"layout module '{m}' is a {type(base_layer).__name__}, not a Linear or Conv2d")
        if have != shapes[m] or not kernel_ok:
            raise LayoutMismatchError(
                f"layout module '{m}' expects (in, out)={shapes[m]} and lora_A {a_shape}, the UNet's "
                f"{type(base_layer).__name__} has {have}; the layout belongs to a different base model"
            )
        out[m] = mod
    adapted_here = {n for n, mod in named.items()
                    if n.split(".")[-1] in layout.targets and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    extra = sorted(adapted_here - set(layout.modules))
    if extra:
        raise LayoutMismatchError(
            f"the UNet has {len(extra)} target linears the layout does not cover (e.g. {extra[:3]}); "
            "the layout belongs to a different base model"
        )
    return out


class MultiLoraSlot:
    """K LoRAs (flat vectors) on `base.unet` at once, for rendering K models in one call.

    The UNet must carry no peft adapter on the layout's modules (e.g. a `LoraSlot`): the
    multi-LoRA modules replace them while the slot is open. `copies=2` for renders with
    classifier-free guidance (see the module docstring)."""

    def __init__(self, base, layout: LoraLayout, models: int, copies: int = 1):
        self.base, self.layout, self.models = base, layout, int(models)
        unet = base.unet
        self.originals = check_layout_modules(layout, unet)
        wrapped = [m for m, mod in self.originals.items() if hasattr(mod, "base_layer")]
        if wrapped:
            raise RuntimeError(f"the UNet already carries a LoRA adapter on {wrapped[0]!r}; rendering many models and "
                               "inversion need the bare base UNet: close the LoraSlot (or unload the LoRA) first")
        device = next(unet.parameters()).device
        self.params: dict[str, torch.Tensor] = {}
        for m in layout.modules:
            A = torch.zeros(self.models, *layout.shapes[f"{m}.lora_A.weight"], device=device)
            B = torch.zeros(self.models, *layout.shapes[f"{m}.lora_B.weight"], device=device)
            self.params[f"{m}.lora_A.weight"], self.params[f"{m}.lora_B.weight"] = A, B
            swap_module(unet, m, multi_lora(self.originals[m], A, B, layout.scaling, copies))

    @torch.no_grad()
    def set(self, vectors: torch.Tensor) -> None:
        """vectors (K, D) in the layout: model k's LoRA into slot k."""
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.shape != (self.models, self.layout.numel):
            raise ValueError(f"expected ({self.models}, {self.layout.numel}) vectors, got {tuple(vectors.shape)}")
        for key, shape in self.layout.entries:
            start, stop = self.layout.offsets[key]
            self.params[key].copy_(vectors[:, start:stop].reshape(self.models, *shape))

    def functional_params(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable {buffer name: tensor} slices of `vectors` (K, D) for torch.func.functional_call
        on the UNet: gradients reach the vectors (what a batched inversion optimises), nothing else."""
        if vectors.shape != (self.models, self.layout.numel):
            raise ValueError(f"expected ({self.models}, {self.layout.numel}) vectors, got {tuple(vectors.shape)}")
        out = {}
        for key, shape in self.layout.entries:
            start, stop = self.layout.offsets[key]
            module, factor = key.split(".lora_")[0], key.split(".lora_")[1][0]  # 'x.to_q.lora_A.weight' -> x.to_q, A
            out[f"{module}.{factor}"] = vectors[:, start:stop].reshape(self.models, *shape)
        return out

    def remove(self) -> None:
        for m, original in self.originals.items():
            swap_module(self.base.unet, m, original)

    def __enter__(self) -> "MultiLoraSlot":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
