"""Autoencoders: the map between images and the space the scales generate in.

Every autoencoder takes images in [-1, 1] (B, 3, H, W) and returns *scaled*
latents (multiplied by ``scaling_factor``), so the rest of the library never
sees the raw latent. ``factor`` is the spatial downsampling (8 for SD's VAE, 1
in pixel space). The SD VAE (diffusers' ``AutoencoderKL``) plugs in here through
the same interface.
"""

from __future__ import annotations

from torch import Tensor, nn

from msf.config import AutoencoderConfig


class Autoencoder(nn.Module):
    """Interface: ``encode`` images -> scaled latents, ``decode`` scaled latents -> images."""

    channels: int
    factor: int
    scaling_factor: float

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def latent_size(self, image_size: int) -> int:
        if image_size % self.factor:
            raise ValueError(
                f"image size {image_size} is not divisible by the autoencoder's "
                f"downsampling factor {self.factor}"
            )
        return image_size // self.factor


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the target is the RGB image itself (f = 1, 3 channels)."""

    def __init__(self, channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        self.channels = channels
        self.factor = 1
        self.scaling_factor = scaling_factor

    def encode(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"identity autoencoder expects images (B, {self.channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return x * self.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        return (z / self.scaling_factor).clamp(-1.0, 1.0)


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """Build the autoencoder a config names (``identity`` now; ``sd-vae`` in its own module)."""
    if cfg.kind == "identity":
        return IdentityAutoencoder(channels=cfg.channels, scaling_factor=cfg.scaling_factor)
    if cfg.kind == "sd-vae":
        raise ValueError(
            "autoencoder.kind='sd-vae' (diffusers' AutoencoderKL) is not built into this "
            "version yet; `msf info` works for its presets, training and sampling need 'identity'"
        )
    raise ValueError(f"autoencoder.kind: unknown kind {cfg.kind!r}; available: 'identity'")

