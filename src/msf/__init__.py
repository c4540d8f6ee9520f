"""msf: MSF, multi-scale latent factorization for diffusion (Jiang et al., 2025), in PyTorch.

The package by concern: ``msf.method`` (the factorization, the flow, the solvers, the per-scale DiT, the
pipeline), ``msf.training``, ``msf.evaluation`` and ``msf.interfaces`` (CLI, app, loading, the hub);
``msf.config`` and ``msf.presets`` are shared by all. The names below are importable from ``msf`` itself.
"""

import importlib

from msf.config import Config, ModelConfig, ScaleConfig, TrainConfig, apply_overrides
from msf.method.factorize import compose, down, factorize, input_priors, up
from msf.method.models import DiT
from msf.method.pipeline import MSFPipeline
from msf.presets import preset

# Imported on first use, so that `import msf` stays light
_LAZY = {
    "train": "msf.training.train", "TrainResult": "msf.training.train",
    "load_pipeline": "msf.interfaces.load", "sample_set": "msf.evaluation.sample_set",
    "evaluate": "msf.evaluation.metrics", "run_sweep": "msf.evaluation.sweep",
    "compare": "msf.evaluation.compare", "CompareSettings": "msf.evaluation.compare",
    "save_sample_grid": "msf.interfaces.viz",
    "resolve_precision": "msf.precision",
}

__all__ = [
    "Config", "ModelConfig", "ScaleConfig", "TrainConfig", "apply_overrides", "preset",
    "compose", "down", "factorize", "input_priors", "up", "DiT", "MSFPipeline", *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msf' has no attribute {name!r}")
