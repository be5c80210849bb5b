"""Config dataclasses that the core library itself consumes.

They live here (not in `pipeline`) so that a researcher with a finished subspace
needs nothing beyond `w2w_core`; `pipeline.config` composes them into the root config.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    # A diffusers directory (save_pretrained layout), a single SD1.5 `.safetensors`
    # checkpoint, or `builtin:tiny` for the embedded tiny world committed in w2w_core/assets.
    path: str = "builtin:tiny"
    # Image size the base model is trained/sampled at (tiny: 64, SD1.5: 512).
    resolution: int = 64
    # dtype of the frozen base weights; LoRA parameters and optimizer state stay fp32.
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # SD1.5 diffusers class name when loading a single-file checkpoint.
    single_file_pipeline: str = "StableDiffusionPipeline"
    # Single-file checkpoints only: a local diffusers-format config folder (model_index.json,
    # unet/config.json, vae/config.json, text_encoder/config.json, tokenizer/, scheduler/;
    # weights not needed), e.g. the one shipped with the checkpoint or written by
    # save_pretrained. Passed to diffusers' from_single_file as `config=`. "" = use the
    # checkpoint's own folder when it holds a model_index.json, else fail naming this key.
    config_dir: str = ""
    # Single-file checkpoints only, optional: the original LDM yaml (e.g. v1-inference.yaml),
    # passed as `original_config=`; it then sets the UNet/VAE configs, config_dir the rest.
    original_config: str = ""


@dataclass
class LoraConfig:
    rank: int = 1
    alpha: float = 27.0
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
