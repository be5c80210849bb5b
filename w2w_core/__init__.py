"""w2w_core: the small library researchers import.

Depends only on torch, diffusers, peft and safetensors: never on ray, dask or `pipeline`.
"""
from w2w_core.config import LoraConfig, ModelConfig
from w2w_core.layout import LoraLayout
from w2w_core.space import WeightSpace

__all__ = ["LoraConfig", "LoraLayout", "ModelConfig", "WeightSpace"]
