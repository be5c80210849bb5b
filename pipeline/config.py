"""The root config: one typed object, built once from YAML + dotlist overrides, passed down.

Schema = the dataclasses below (omegaconf structured configs). Unknown keys, wrong
types and values outside a field's choices fail with a message naming the key.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from w2w_core.config import LoraConfig, ModelConfig


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and how to fix it."""


@dataclass
class TrainConfig:
    """DreamBooth-LoRA per identity (REFERENCE.md section 1)."""

    steps: int = 800
    lr: float = 1e-4
    # diffusers' learning-rate schedules (diffusers.optimization.get_scheduler), stepped once per
    # training step; the published recipe is constant. linear/cosine decay to 0 at `steps`.
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Instance images per step for one identity (the published recipe: 1).
    batch_size: int = 1
    # Per-identity gradient-norm clip; 0 disables it.
    max_grad_norm: float = 1.0
    instance_prompt: str = "sks person"
    class_prompt: str = "person"
    # Prior preservation: class images generated once by the base model, reused by every identity.
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    class_image_steps: int = 25
    # Identities trained together in one forward/backward of the frozen base (batched trainer).
    identities_per_batch: int = 16
    # Every identity starts from the same lora_A (seeded by `seed` alone), so the weight space
    # holds what training learned rather than each model's random initialisation.
    shared_init: bool = True
    # false: lora_A stays at its (shared) init and only lora_B trains (LoRA-FA). Every model's update
    # B @ A is then linear in its row of the store, so the weight space has no factorisation freedom
    # (B A = (B M)(M^-1 A)) for the PCA to spend variance on. Needs shared_init.
    train_lora_a: bool = True
    mixed_precision: str = "no"  # no | bf16 | fp16
    # torch.compile the UNet for the batched trainer's steps (on one H100 at the SD1.5 shape: 1.51x
    # the samples/s after a one-off compilation; docs/BENCHMARKS.md). Off for the tiny CPU world.
    compile: bool = False
    seed: int = 0


@dataclass
class DataConfig:
    # Identity source: a folder with one sub-folder of images per identity + attributes.parquet.
    source: str = ""
    # Images used per identity (the first N in sorted order); the published recipe uses 10.
    images_per_identity: int = 10
    # Use only the first N identities of the source (0 = all).
    limit: int = 0
    # Image files (or identity folders) that are symlinks pointing outside data.source are refused
    # (the identity is quarantined) unless this is true: a source must not read arbitrary files.
    follow_symlinks: bool = False
    # Images with more pixels than this (width x height, read from the header before decoding)
    # quarantine their identity instead of being decoded: a decompression bomb costs no memory.
    max_image_pixels: int = 64_000_000


@dataclass
class BuildConfig:
    out: str = "runs/tiny"
    rows_per_shard: int = 64
    # Long-lived trainer actors; 0 = one per GPU, or one per CPU slot on CPU-only clusters.
    workers: int = 0
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    # "" starts a local Ray cluster; "auto" or "ray://host:port" connects to an existing one.
    ray_address: str = ""
    # batched: multi-LoRA trainer; reference: peft, one identity at a time;
    # synthetic: deterministic vectors instantly (orchestration tests at scale).
    trainer: str = "batched"
    max_restarts: int = 3
    max_task_retries: int = 3
    # Seconds between the driver's heartbeats in <out>/lease/ (liveness in `w2w status`, the build
    # lease): a heartbeat older than max(4 x this, 10 s) means the driver is gone.
    heartbeat_s: float = 5.0
    # --- synthetic trainer only (orchestration tests and the scale simulation) ---
    # Seconds each shard sleeps, to make a build slow enough to interrupt in fault tests.
    synthetic_delay_s: float = 0.0
    # "" = layout of the configured base model (loaded); "tiny" / "sd15" = that UNet's layout
    # computed without loading any weights (no base model needed at all).
    synthetic_layout: str = ""
    # > 0: plan this many virtual identities (ids v000000..., no images) instead of data.source.
    synthetic_identities: int = 0


@dataclass
class SubspaceConfig:
    # PCs kept (capped at models - 1); inversion fits in all of them.
    components: int = 1000
    # Leading PCs that attribute directions and sampling use; 0 = all `components`. The published recipe
    # inverts in 10,000 PCs and samples / edits in 1,000: inversion needs many PCs, while least-squares
    # directions overfit in them (docs/QUALITY_SCALING.md, "Past the demo").
    edit_components: int = 0
    method: str = "gram"  # gram | randomized
    # Rows per Dask block when streaming the store.
    block_rows: int = 256
    power_iterations: int = 2
    seed: int = 0


@dataclass
class W2WConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)


# Fields whose value must be one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine"),
    "build.trainer": ("batched", "reference", "synthetic"),
    "build.synthetic_layout": ("", "tiny", "sd15"),
    "subspace.method": ("gram", "randomized"),
}
POSITIVE: tuple[str, ...] = (
    "model.resolution",
    "lora.rank",
    "train.steps",
    "train.batch_size",
    "train.identities_per_batch",
    "data.images_per_identity",
    "data.max_image_pixels",
    "build.rows_per_shard",
    "build.heartbeat_s",
    "subspace.components",
    "subspace.block_rows",
)
NON_NEGATIVE: tuple[str, ...] = (
    "train.lr",
    "train.lr_warmup_steps",
    "train.weight_decay",
    "subspace.edit_components",
    "train.max_grad_norm",
    "train.prior_loss_weight",
    "train.num_class_images",
    "data.limit",
    "build.workers",
    "build.gpus_per_worker",
    "build.cpus_per_worker",
    "build.synthetic_delay_s",
    "build.synthetic_identities",
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> W2WConfig:
    """YAML file (optional) + dotlist overrides -> validated W2WConfig dataclass."""
    schema = OmegaConf.structured(W2WConfig)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (try conf/tiny.yaml or conf/sd15.yaml)")
        layers.append(("file " + str(path), lambda: OmegaConf.load(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=50)")
        layers.append(("override " + item, lambda item=item: OmegaConf.from_dotlist([item])))
    merged = schema
    for origin, make in layers:
        try:
            merged = OmegaConf.merge(merged, make())
        except OmegaConfBaseException as err:
            raise ConfigError(_explain(err, origin)) from None
    cfg: W2WConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: W2WConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: W2WConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(data: dict) -> W2WConfig:
    """Rebuild a config saved with `to_dict` (e.g. from a store's attributes)."""
    merged = OmegaConf.merge(OmegaConf.structured(W2WConfig), OmegaConf.create(data))
    return OmegaConf.to_object(merged)


def validate(cfg: W2WConfig) -> None:
    for dotted, choices in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"{dotted}={value!r} is not valid; choose one of: {', '.join(choices)}")
    for dotted in POSITIVE:
        if _get(cfg, dotted) <= 0:
            raise ConfigError(f"{dotted} must be > 0, got {_get(cfg, dotted)!r}")
    for dotted in NON_NEGATIVE:
        if _get(cfg, dotted) < 0:
            raise ConfigError(f"{dotted} must be >= 0, got {_get(cfg, dotted)!r}")
    if not cfg.lora.targets:
        raise ConfigError("lora.targets is empty; the published recipe uses [to_q, to_v]")
    if not cfg.train.train_lora_a and not cfg.train.shared_init:
        raise ConfigError("train.train_lora_a=false keeps each model's lora_A at its init, so it needs train.shared_init=true "
                          "(one A for every model); otherwise the store's rows differ by their random A")
    warmup, schedule = cfg.train.lr_warmup_steps, cfg.train.lr_scheduler
    if warmup > 0 and schedule == "constant":
        raise ConfigError(f"train.lr_warmup_steps={warmup} has no effect with train.lr_scheduler=constant; "
                          "use constant_with_warmup, linear or cosine, or set lr_warmup_steps=0")
    if warmup >= cfg.train.steps:
        raise ConfigError(f"train.lr_warmup_steps={warmup} must be below train.steps={cfg.train.steps}")


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _valid_keys(full_key: str) -> list[str]:
    """Valid field names at the level of `full_key` (e.g. 'train.stepz' -> TrainConfig's fields)."""
    obj = W2WConfig
    for part in full_key.split(".")[:-1]:
        match = {f.name: f for f in fields(obj)}.get(part)
        if match is None:
            break
        default = match.default_factory() if match.default_factory is not None else match.default  # type: ignore[misc]
        if not is_dataclass(default):
            break
        obj = type(default)
    return [f.name for f in fields(obj)]


def _explain(err: OmegaConfBaseException, origin: str) -> str:
    full_key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(full_key)
        leaf = full_key.split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{full_key}' (from {origin}). Valid keys here: {', '.join(valid)}.{hint}"
    if isinstance(err, ValidationError):
        return f"bad value for config key '{full_key}' (from {origin}): {err.msg}"
    return f"config error at '{full_key}' (from {origin}): {getattr(err, 'msg', err)}"
