"""msf: MSF, multi-scale latent factorization for diffusion (Jiang et al., 2025), in PyTorch."""

from msf.config import Config, ModelConfig, ScaleConfig, TrainConfig, apply_overrides, preset
from msf.factorize import compose, down, factorize, input_priors, up
from msf.models import DiT
from msf.pipeline import MSFPipeline

__all__ = [
    "Config", "ModelConfig", "ScaleConfig", "TrainConfig", "apply_overrides", "preset",
    "compose", "down", "factorize", "input_priors", "up", "DiT", "MSFPipeline",
]
__version__ = "0.1.0"
