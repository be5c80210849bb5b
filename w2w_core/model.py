"""The frozen base model: load it once from a ModelConfig, encode images and prompts.

tiny and SD1.5 share every line here; only the config differs. `builtin:tiny` names the
tiny world's weights committed in w2w_core/assets/tiny (diffusers save_pretrained layout).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from w2w_core.config import ModelConfig

ASSETS = Path(__file__).parent / "assets"
BUILTIN_PREFIX = "builtin:"

# ---------------------------------------------------------------------- tiny architecture
# A latent diffusion model small enough to train and sample on a 2-core CPU, with the SD1.5
# module names LoRA targets: attention (to_q/to_k/to_v/to_out) in every down/up block.
TINY_VOCAB_WORDS = (
    "a photo of the person sks and with without , . wearing having "
    "male female man woman beard eyeglasses glasses bangs smiling young old pale_skin "
    "portrait face painting cartoon sketch in on at background red green blue "
    # the traits pretraining captions name (pipeline.data.synthfaces.trait_phrases)
    "hair eyes skin long short black brown chestnut blonde ginger grey fair light olive tan dark pale"
).split()
# the longest pretraining caption (every attribute and trait phrase) is 22 tokens with <bos>/<eos>
TINY_MAX_TOKENS = 24

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=TINY_MAX_TOKENS,
)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """Frozen diffusers components + the device/dtype they live on."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the training noise scheduler (DDPM)
    device: torch.device
    dtype: torch.dtype
    resolution: int
    fingerprint: str

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled VAE latents (posterior mean).

        The mean (not a sample) keeps cached latents deterministic; the noise added in
        training dominates the posterior's tiny variance.
        """
        images = images.to(self.device, self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def pipeline(self):
        """A ready StableDiffusionPipeline sharing these (frozen) components."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def resolve_model_path(path: str) -> Path:
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        resolved = ASSETS / name
        if not resolved.is_dir():
            raise FileNotFoundError(
                f"built-in model '{name}' not found at {resolved}; the tiny world is created by "
                "`python -m jobs.pretrain_tiny` (see docs/TINY_WORLD.md)"
            )
        return resolved
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"model.path={path!r} does not exist: give a local diffusers directory "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single .safetensors checkpoint"
        )
    return resolved


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base_model(cfg: ModelConfig, device: str | torch.device | None = None) -> BaseModel:
    """Load and freeze the base components named by `cfg` (no download, ever)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = resolve_model_path(cfg.path)
    dtype = DTYPES[cfg.dtype]
    if path.is_file():
        pipe = load_single_file_pipeline(path, cfg, dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    return from_components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        device=resolve_device(str(device) if device is not None else cfg.device),
        resolution=cfg.resolution,
        fingerprint=fingerprint_path(path),
    )


SINGLE_FILE_CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json")


def single_file_config_dir(path: Path, cfg: ModelConfig) -> Path:
    """The diffusers config folder that an offline `from_single_file` needs, or a clear error."""
    how = (
        "set model.config_dir to a local diffusers-format folder of the same architecture "
        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ with their configs; "
        "weights are not needed), e.g. the folder shipped with the checkpoint or one written by "
        "StableDiffusionPipeline.save_pretrained; nothing is downloaded"
    )
    if cfg.config_dir:
        config_dir = Path(cfg.config_dir).expanduser()
        if not config_dir.is_dir():
            raise FileNotFoundError(f"model.config_dir={cfg.config_dir!r} is not a directory: {how}")
    elif (path.parent / "model_index.json").is_file():
        config_dir = path.parent
    else:
        raise FileNotFoundError(
            f"model.path={str(path)!r} is a single-file checkpoint and loading it offline needs the "
            f"pipeline's config files: {how}"
        )
    missing = [name for name in SINGLE_FILE_CONFIG_FILES if not (config_dir / name).is_file()]
    missing += [name + "/" for name in ("tokenizer", "scheduler") if not (config_dir / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"model.config_dir {str(config_dir)!r} lacks {', '.join(missing)}: {how}")
    return config_dir


def load_single_file_pipeline(path: Path, cfg: ModelConfig, dtype: torch.dtype):
    """A single .safetensors checkpoint (original LDM/A1111 layout) -> diffusers pipeline, offline.

    diffusers 0.42 `from_single_file` converts the checkpoint's UNet, VAE and CLIP text encoder
    weights and takes every config (model_index, unet/vae/text_encoder configs, tokenizer,
    scheduler) from `config=` (a local diffusers folder); `original_config=` (an LDM yaml) is
    optional and then overrides the UNet/VAE configs.
    """
    import diffusers

    cls = getattr(diffusers, cfg.single_file_pipeline)
    kwargs = dict(
        config=str(single_file_config_dir(path, cfg)),
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if cfg.original_config:
        original = Path(cfg.original_config).expanduser()
        if not original.is_file():
            raise FileNotFoundError(
                f"model.original_config={cfg.original_config!r} does not exist: give a local LDM yaml "
                "(e.g. v1-inference.yaml) or leave it empty to use model.config_dir alone"
            )
        kwargs["original_config"] = str(original)
    return cls.from_single_file(str(path), **kwargs)


def from_components(
    unet, vae, text_encoder, tokenizer, scheduler, device, resolution: int, fingerprint: str = "random"
) -> BaseModel:
    device = torch.device(device)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        device=device,
        dtype=unet.dtype,
        resolution=resolution,
        fingerprint=fingerprint,
    )


def fingerprint_path(path: Path) -> str:
    """Hash of the model's configs and weight file sizes: cheap, and changes when the model does."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- tiny components
def tiny_tokenizer():
    """A word-level tokenizer built in code (no download), saved/loaded as tokenizer.json."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(TINY_VOCAB_WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=TINY_MAX_TOKENS,
    )


def clip_text_encoder(tokenizer, **config):
    """A randomly initialised CLIPTextModel sized by `config` whose special tokens match `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **config,
        )
    )


def tiny_components(seed: int = 0) -> dict:
    """Randomly initialised tiny components (the starting point of pretraining; also test fixtures)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    return dict(
        unet=UNet2DConditionModel(**TINY_UNET),
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=clip_text_encoder(tokenizer, **TINY_TEXT),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            clip_sample=False,
        ),
    )


def random_tiny_base(seed: int = 0, device: str = "cpu") -> BaseModel:
    return from_components(**tiny_components(seed), device=device, resolution=TINY_VAE["sample_size"])


def save_components(components: dict, directory: str | Path) -> Path:
    """Save components in diffusers' save_pretrained layout (loadable by load_base_model)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def unet_config_json(unet) -> str:
    return json.dumps(dict(unet.config), sort_keys=True, default=str)
