"""SD1.5-family checkpoints on disk, randomly initialised, for tests of the real-model path.

    components = sd15_components()                     # SD1.5 architecture, small channels
    model_dir  = write_diffusers_dir(components, d)    # (a) diffusers save_pretrained folder
    ckpt       = write_single_file(components, f)      # (b) one .safetensors, original LDM keys
    configs    = write_config_dir(model_dir, d2)       # the configs alone (no weights)
    # -> ModelConfig(path=ckpt, config_dir=configs) or ModelConfig(path=model_dir)

`sd15_checkpoints(root)` does all of it and returns the paths. The UNet keeps every SD1.5
structural choice (4 levels, 2 layers per block, CrossAttn down x3 + Down, Up + CrossAttn up x3,
cross_attention_dim 768, attention_head_dim 8); only `block_out_channels` shrinks by default
(SMALL_CHANNELS) so a test runs in seconds on a CPU. Pass `block_out_channels=SD15_CHANNELS`
for the genuine 859.5M-parameter UNet (~30 s to initialise on 2 CPU cores, 3.4 GB fp32).

The single file is written in the original (CompVis LDM / A1111) key layout that community
SD1.5 checkpoints such as realistic-vision-v51 use: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (CLIP text encoder). diffusers
0.42 ships only the LDM -> diffusers direction (`loaders/single_file_utils.py`); the inverse
below follows diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` and reuses
the library's own DIFFUSERS_TO_LDM_MAPPING for top-level keys. Loading it back through
`from_single_file` and comparing every tensor (tests/test_sd15_path.py) checks the mapping.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from w2w_core.model import SD15_UNET, clip_text_encoder, save_components, tiny_tokenizer

SD15_CHANNELS = (320, 640, 1280, 1280)
SMALL_CHANNELS = (32, 64, 128, 128)
CROSS_ATTENTION_DIM = 768
TEXT_MAX_TOKENS = 77  # CLIP's context length, as in SD1.5

SMALL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),  # SD1.5: (128, 256, 512, 512)
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
SMALL_TEXT = dict(  # CLIP ViT-L/14 text tower: hidden 768, 12 heads, 3072 MLP; 2 of its 12 layers
    hidden_size=CROSS_ATTENTION_DIM,
    intermediate_size=3072,
    num_hidden_layers=2,
    num_attention_heads=12,
    max_position_embeddings=TEXT_MAX_TOKENS,
    projection_dim=768,
    hidden_act="quick_gelu",
)


def sd15_unet_config(block_out_channels=SMALL_CHANNELS) -> dict:
    return dict(SD15_UNET, block_out_channels=tuple(block_out_channels))


def sd15_lora_numel(block_out_channels=SD15_CHANNELS, cross_attention_dim=CROSS_ATTENTION_DIM, rank=1) -> int:
    """Rank-r LoRA size on to_q/to_v of the SD1.5 UNet's 16 transformer blocks, by arithmetic.

    Per block of width C: attn1 to_q, to_v and attn2 to_q are C -> C (A: r*C, B: C*r), attn2
    to_v is cross_attention_dim -> C. Blocks: down 2 per level at C0..C2, up 3 per level at
    C2..C0, mid 1 at C3. SD1.5: 5*(7*320+768) + 5*(7*640+768) + 6*(7*1280+768) = 99,648.
    """
    c0, c1, c2, c3 = block_out_channels
    per_block = lambda c: rank * (7 * c + cross_attention_dim)  # noqa: E731
    return 5 * per_block(c0) + 5 * per_block(c1) + 5 * per_block(c2) + per_block(c3)


def sd15_components(seed: int = 0, block_out_channels=SMALL_CHANNELS) -> dict:
    """Randomly initialised SD1.5-architecture components (float32)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()  # word-level, built in code (no download); CLIP's 77-token context
    tokenizer.model_max_length = TEXT_MAX_TOKENS
    return dict(
        unet=UNet2DConditionModel(**sd15_unet_config(block_out_channels)),
        vae=AutoencoderKL(**SMALL_VAE),
        text_encoder=clip_text_encoder(tokenizer, **SMALL_TEXT),
        tokenizer=tokenizer,
        # SD1.5's shipped scheduler config
        scheduler=PNDMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
    )


# ------------------------------------------------------------------ diffusers -> LDM keys
def _unet_layer_map() -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) for the SD1.5 UNet's blocks."""
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


UNET_RESNET_MAP = [  # (ldm, diffusers) inside a ResBlock
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    layer_map = _unet_layer_map()
    out = {}
    for key, value in state.items():
        new = top.get(key, key)
        if key not in top:
            if "resnets" in new:
                for ldm, hf in UNET_RESNET_MAP:
                    new = new.replace(hf, ldm)
            for ldm, hf in layer_map:
                if new.startswith(hf):
                    new = ldm + new[len(hf):]
                    break
        out["model.diffusion_model." + new] = value
    return out


VAE_ATTN_MAP = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_to_ldm(state: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = {}
    for key, value in state.items():
        new = top.get(key)
        if new is None:
            new = key
            new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
            new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
            new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                         lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.block.", new)
            new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                         lambda m: f"decoder.up.{n_levels - 1 - int(m.group(1))}.upsample.", new)
            new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
            new = new.replace("conv_shortcut", "nin_shortcut")
            if ".mid_block.attentions.0." in new:
                new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
                for hf, ldm in VAE_ATTN_MAP:
                    new = new.replace(hf, ldm)
                if value.ndim == 2:  # LDM stores the VAE attention projections as 1x1 convs
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def to_ldm_state_dict(components: dict) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original single-file (LDM) layout."""
    n_levels = len(components["vae"].config.block_out_channels)
    state = {}
    state.update(unet_to_ldm(components["unet"].state_dict()))
    state.update(vae_to_ldm(components["vae"].state_dict(), n_levels))
    for key, value in components["text_encoder"].state_dict().items():
        # original checkpoints carry transformers-4 CLIP keys (text_model.embeddings..., ...);
        # transformers 5 dropped the text_model. level from CLIPTextModel's state dict
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


# ------------------------------------------------------------------ on disk
def write_diffusers_dir(components: dict, directory: str | Path) -> Path:
    return save_components(components, directory)


def write_single_file(components: dict, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """One .safetensors checkpoint in LDM layout (community SD1.5 files are usually fp16)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_ldm_state_dict(components).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def write_config_dir(model_dir: str | Path, directory: str | Path) -> Path:
    """Copy a diffusers folder's configs, tokenizer and scheduler, but no weights."""
    model_dir, directory = Path(model_dir), Path(directory)
    for f in model_dir.rglob("*"):
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            target = directory / f.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    return directory


@dataclass
class SD15Checkpoints:
    components: dict       # the float32 originals
    diffusers_dir: Path    # (a) save_pretrained layout
    single_file: Path      # (b) LDM-layout .safetensors (fp16)
    config_dir: Path       # configs only, for model.config_dir
    block_out_channels: tuple

    def overrides(self, single_file: bool) -> list[str]:
        """Dotlist overrides that point conf/sd15.yaml at this checkpoint (CPU)."""
        if single_file:
            return [f"model.path={self.single_file}", f"model.config_dir={self.config_dir}", "model.device=cpu"]
        return [f"model.path={self.diffusers_dir}", "model.device=cpu"]


def sd15_checkpoints(root: str | Path, seed: int = 0, block_out_channels=SMALL_CHANNELS) -> SD15Checkpoints:
    root = Path(root)
    components = sd15_components(seed, block_out_channels)
    model_dir = write_diffusers_dir(components, root / "diffusers")
    ckpt = write_single_file(components, root / "single" / "sd15-random.safetensors")
    configs = write_config_dir(model_dir, root / "configs")
    return SD15Checkpoints(components, model_dir, ckpt, configs, tuple(block_out_channels))
