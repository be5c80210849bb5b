"""Generate images from LoRA vectors, and lay them out as labelled PNG grids.

One peft adapter slot is attached to the base UNet once; each vector is written into it
in place, so rendering many models does not re-wrap the UNet per model.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from w2w_core.layout import LoraLayout
from w2w_core.model import BaseModel

SLOT = "w2w"
# Classifier-free guidance used for renders unless told otherwise (the tiny base model was
# pretrained with caption dropout and needs guidance to draw crisp faces, as SD1.5 does).
DEFAULT_GUIDANCE = 4.0
# Images per pipeline call when rendering many models (generate_models): on the 2-core CPU a batch of 16
# renders about 3x faster per image than one image per call (benchmarks/render_batching.py).
IMAGES_PER_CALL = 16


class LoraSlot:
    """A LoRA adapter attached to `base.unet` whose weights are set from flat vectors."""

    def __init__(self, base: BaseModel, layout: LoraLayout, adapter_name: str = SLOT):
        self.base, self.layout, self.adapter_name = base, layout, adapter_name
        unet = base.unet
        if adapter_name in getattr(unet, "peft_config", {}):
            raise RuntimeError(f"the UNet already carries an adapter named {adapter_name!r}")
        unet.add_adapter(layout.peft_config(), adapter_name=adapter_name)
        # Adapter params live in fp32 even when the base is bf16/fp16.
        for name, param in unet.named_parameters():
            if f".{adapter_name}." in name:
                param.data = param.data.float()
                param.requires_grad_(False)
        self.param_names = {key: _param_name(key, adapter_name) for key in layout.keys}
        self.set(torch.zeros(layout.numel))

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        params = dict(self.base.unet.named_parameters())
        for key, tensor in self.layout.unflatten(torch.as_tensor(vector, dtype=torch.float32)).items():
            params[self.param_names[key]].copy_(tensor)

    def functional_params(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable {param name: tensor} views of `vector` for torch.func.functional_call."""
        out = {}
        for key, shape in self.layout.entries:
            start, stop = self.layout.offsets[key]
            out[self.param_names[key]] = vector[start:stop].view(shape)
        return out

    def remove(self) -> None:
        self.base.unet.delete_adapters(self.adapter_name)
        if not getattr(self.base.unet, "peft_config", None):
            self.base.unet.unload_lora()

    def __enter__(self) -> "LoraSlot":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _param_name(key: str, adapter_name: str) -> str:
    # peft key 'x.to_q.lora_A.weight' -> module parameter 'x.to_q.lora_A.<adapter>.weight'
    head, tail = key.rsplit(".", 1)
    return f"{head}.{adapter_name}.{tail}"


@torch.no_grad()
def generate(
    base: BaseModel,
    prompts: Sequence[str],
    seed: int | Sequence[int] = 0,
    steps: int = 25,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_prompt: str | None = None,
    output_type: str = "pil",
    step_callback: Callable[[int], None] | None = None,
):
    """Render one image per prompt with whatever LoRA the UNet currently carries.

    `seed` is one seed shared by every prompt (rows of a grid then differ only by the
    model or prompt) or one seed per prompt. output_type "pt" gives (B, 3, H, W) in [-1, 1].
    `step_callback(i)` runs after denoising step i (e.g. to switch weights, see generate_gated).
    """
    seeds = [int(seed)] * len(prompts) if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    pipe = base.pipeline()
    size = base.resolution
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (base.unet.config.in_channels, size // factor, size // factor)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    result = pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt is not None else None,
        height=size,
        width=size,
        latents=latents.to(base.device, base.unet.dtype),
        output_type="pt" if output_type == "pt" else "pil",
        **({"callback_on_step_end": _step_end(step_callback)} if step_callback is not None else {}),
    )
    if output_type == "pt":
        return result.images * 2 - 1
    return list(result.images)


def _step_end(step_callback: Callable[[int], None]):
    def callback(pipe, i, t, callback_kwargs):
        step_callback(int(i))
        return callback_kwargs

    return callback


def edit_switch_step(edit_start: float, steps: int) -> int:
    """How many of `steps` denoising steps run with the unedited model before the edit applies.

    `edit_start` is the fraction of the denoising (from pure noise) left to the unedited
    weights: 0 edits every step; 0.3 lets the original model lay out the first 30% (the
    coarse layout, which carries identity) and applies the edit to the later, detail steps.
    """
    edit_start = float(edit_start)
    if not 0.0 <= edit_start < 1.0:
        raise ValueError(f"edit_start must be in [0, 1), got {edit_start}")
    return int(round(edit_start * int(steps)))


def _gate(edit_start: float, steps: int, use_original: Callable[[], None], use_edited: Callable[[], None]):
    """Put the weights the first step needs in place; return the step callback that switches to the
    edit after `edit_start` of the steps (None when every step is edited)."""
    k = edit_switch_step(edit_start, steps)
    if k == 0:
        use_edited()
        return None
    use_original()

    def switch(i: int) -> None:
        if i + 1 == k:
            use_edited()

    return switch


@torch.no_grad()
def generate_gated(base: BaseModel, slot: "LoraSlot", original: torch.Tensor, edited: torch.Tensor,
                   edit_start: float, prompts: Sequence[str], seed: int | Sequence[int] = 0, steps: int = 25, **kwargs):
    """Render with the unedited weights for the first `edit_start` of the steps, then the edited ones
    (the paper's timestep-gated edits). edit_start=0 is an ordinary render of `edited`."""
    switch = _gate(edit_start, steps, lambda: slot.set(original), lambda: slot.set(edited))
    return generate(base, prompts, seed=seed, steps=steps, step_callback=switch, **kwargs)


@torch.no_grad()
def generate_models(base: BaseModel, layout: LoraLayout, vectors, prompts: Sequence[str] | Sequence[Sequence[str]],
                    seeds: Sequence[int], steps: int = 25, guidance_scale: float = DEFAULT_GUIDANCE,
                    edited=None, edit_start: float = 0.0, images_per_call: int = IMAGES_PER_CALL,
                    progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Render K models (vectors: (K, D), or K flat vectors) -> (K, m, 3, H, W) in [-1, 1].

    Model k renders `prompts` (m prompts, or prompts[k] for model k) at `seeds` (m), with the same
    noise as `generate` gives one model alone. As many models as fit in `images_per_call` images
    share one pipeline call; `progress(done, K)` runs after each call. `edited` (K vectors): a
    timestep-gated edit, `vectors` for the first `edit_start` of the steps and `edited` after (see
    generate_gated). The UNet must carry no peft adapter (see MultiLoraSlot)."""
    vectors = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vectors])
    edited = None if edited is None else torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in edited])
    K, m = vectors.shape[0], len(seeds)
    per_model = [list(prompts)] * K if not prompts or isinstance(prompts[0], str) else [list(p) for p in prompts]
    if len(per_model) != K or any(len(p) != m for p in per_model):
        raise ValueError(f"{K} models x {m} seeds need {m} prompts, or {m} prompts per model")
    if edited is not None and edited.shape != vectors.shape:
        raise ValueError(f"edited {tuple(edited.shape)} must match vectors {tuple(vectors.shape)}")
    chunk = max(1, int(images_per_call) // max(1, m))
    out = []
    for start in range(0, K, chunk):
        part = slice(start, start + chunk)
        out.append(_generate_in_one_call(base, layout, vectors[part], per_model[part], seeds, steps, guidance_scale,
                                         None if edited is None else edited[part], edit_start))
        if progress is not None:
            progress(min(start + chunk, K), K)
    return torch.cat(out)


def _generate_in_one_call(base, layout, vectors, per_model, seeds, steps, guidance_scale, edited, edit_start):
    from w2w_core.multi_lora import MultiLoraSlot

    K, m = vectors.shape[0], len(seeds)
    # diffusers runs classifier-free guidance as one batch [unconditional; conditional]: two copies.
    copies = 2 if guidance_scale > 1 and base.unet.config.time_cond_proj_dim is None else 1
    with MultiLoraSlot(base, layout, K, copies=copies) as slot:
        if edited is None:
            slot.set(vectors)
            switch = None
        else:
            switch = _gate(edit_start, steps, lambda: slot.set(vectors), lambda: slot.set(edited))
        images = generate(base, [p for ps in per_model for p in ps], seed=list(seeds) * K, steps=steps,
                          guidance_scale=guidance_scale, output_type="pt", step_callback=switch)
    return images.reshape(K, m, *images.shape[1:])


class GatedEditPipeline:
    """A diffusers pipeline carrying an unedited and an edited adapter that switches from the first
    to the second after `edit_start` of the denoising steps; every other attribute is the pipeline's."""

    def __init__(self, pipe, original_adapter: str, edited_adapter: str, edit_start: float):
        edit_switch_step(edit_start, 1)  # validates
        self.pipe, self.original_adapter, self.edited_adapter = pipe, original_adapter, edited_adapter
        self.edit_start = float(edit_start)

    def __call__(self, *args, num_inference_steps: int = 50, **kwargs):
        if "callback_on_step_end" in kwargs:
            raise ValueError("GatedEditPipeline uses callback_on_step_end itself to switch adapters")
        switch = _gate(self.edit_start, num_inference_steps, lambda: self.pipe.set_adapters(self.original_adapter),
                       lambda: self.pipe.set_adapters(self.edited_adapter))
        if switch is not None:
            kwargs["callback_on_step_end"] = _step_end(switch)
        return self.pipe(*args, num_inference_steps=num_inference_steps, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


class ImageError(ValueError):
    """An input image cannot be read; the message names the file."""


def load_image(image, resolution: int) -> torch.Tensor:
    """A path or PIL image -> (3, resolution, resolution) in [-1, 1]; a clear error for bad files."""
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, resolution)
    from pathlib import Path

    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return pil_to_tensor(opened, resolution)
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot read image {path}: {err} (is it a valid PNG/JPEG file?)") from None


def pil_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> (3, resolution, resolution) in [-1, 1]; non-square images are centre-cropped."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 2,
) -> Image.Image:
    """Lay out images in rows, with optional text labels on the left and on top."""
    cell = rows[0][0].size[0] * scale
    left = 0 if not row_labels else max(60, 7 * max(len(label) for label in row_labels))
    top = 0 if not col_labels else 16
    width = left + cell * max(len(r) for r in rows)
    canvas = Image.new("RGB", (width, top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * cell + 2, 2), str(label)[: cell // 6], fill="black")
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + i * cell + cell // 2 - 5), str(row_labels[i]), fill="black")
        for j, image in enumerate(row):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (left + j * cell, top + i * cell))
    return canvas
