"""Autoencoders: the map between images and the space the scales generate in.

Every autoencoder takes images in [-1, 1] (B, 3, H, W) and returns *scaled*
latents (multiplied by ``scaling_factor``), so the rest of the library never
sees the raw latent. ``factor`` is the spatial downsampling (8 for SD's VAE, 1
in pixel space). The SD VAE (diffusers' ``AutoencoderKL``) plugs in here through
the same interface.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from importlib import resources
from pathlib import Path

import torch
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


class SDAutoencoder(Autoencoder):
    """Stable Diffusion's VAE (or any diffusers ``AutoencoderKL``): f = 8, 4 channels.

    ``encode`` returns ``(posterior - shift) * scaling_factor`` with the posterior's
    mean (default: deterministic, what a latent cache should store) or a sample of it
    (``sample_posterior``, as DiT's training script does). ``decode`` inverts that and
    runs in chunks of ``decode_batch`` latents to bound memory.
    """

    def __init__(self, vae, cfg: AutoencoderConfig, decode_batch: int = 32):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        vc = vae.config
        self.channels = int(vc.latent_channels)
        self.factor = 2 ** (len(vc.block_out_channels) - 1)
        self.scaling_factor = float(vc.scaling_factor)
        self.shift_factor = float(getattr(vc, "shift_factor", None) or 0.0)
        self.sample_posterior = cfg.sample_posterior
        self.decode_batch = decode_batch
        self.dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.vae.to(self.dtype)
        where = f"autoencoder at {cfg.path!r}"
        if (self.channels, self.factor) != (cfg.channels, cfg.factor):
            raise ValueError(
                f"{where} has {self.channels} latent channels and factor {self.factor}; the config "
                f"says model.autoencoder.channels={cfg.channels}, factor={cfg.factor}"
            )
        if abs(self.scaling_factor - cfg.scaling_factor) > 1e-6:
            raise ValueError(
                f"{where} has scaling_factor {self.scaling_factor}; the config says "
                f"{cfg.scaling_factor}: set model.autoencoder.scaling_factor={self.scaling_factor}"
            )

    def _own_precision(self, x: Tensor):
        """``model.autoencoder.dtype`` holds inside a bf16 autocast region too (training's forward):
        an fp32 VAE runs in fp32."""
        return torch.autocast(x.device.type, enabled=False) if self.dtype == torch.float32 else nullcontext()

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the VAE expects images (B, 3, H, W), got {tuple(x.shape)}")
        with self._own_precision(x):
            posterior = self.vae.encode(x.to(self.dtype)).latent_dist
            z = posterior.sample() if self.sample_posterior else posterior.mean
        return (z.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        z = z / self.scaling_factor + self.shift_factor
        with self._own_precision(z):
            out = [self.vae.decode(chunk.to(self.dtype)).sample.float()
                   for chunk in z.split(self.decode_batch)]
        return torch.cat(out).clamp(-1.0, 1.0)


def shipped_autoencoders() -> Path:
    """The autoencoders shipped inside the package: ``model.autoencoder.path`` takes their names."""
    return Path(str(resources.files("msf") / "autoencoders"))


def load_sd_vae(cfg: AutoencoderConfig) -> SDAutoencoder:
    """Load ``AutoencoderKL`` from a local folder, a shipped one by name or, on a machine with network,
    a hub id."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(
            "model.autoencoder.kind='sd-vae' needs diffusers: pip install 'msf[vae]'"
        ) from None
    if not cfg.path:
        raise ValueError("model.autoencoder.path: give a local folder or a hub id for the VAE")
    local = Path(cfg.path).expanduser()
    if not local.exists() and (shipped_autoencoders() / cfg.path / "config.json").is_file():
        local = shipped_autoencoders() / cfg.path
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(local))
        except (OSError, ValueError) as e:
            raise ValueError(f"{local}: could not load the VAE ({e})") from None
        return SDAutoencoder(vae, cfg)
    try:  # the local Hugging Face cache first: no network when the VAE was fetched before
        return SDAutoencoder(AutoencoderKL.from_pretrained(cfg.path, local_files_only=True), cfg)
    except (OSError, ValueError):
        pass
    try:
        if _hub_offline():
            raise OSError("HF_HUB_OFFLINE is set")
        vae = AutoencoderKL.from_pretrained(cfg.path)
    except Exception as e:  # offline, unknown id, gated repo: all end here
        raise ValueError(
            f"could not load the VAE {cfg.path!r} from the Hugging Face hub or its cache "
            f"({type(e).__name__}). Offline? On a machine with network run\n"
            f"  python -c \"from diffusers import AutoencoderKL; "
            f"AutoencoderKL.from_pretrained('{cfg.path}').save_pretrained('vae')\"\n"
            f"copy the folder here and pass model.autoencoder.path=/path/to/vae"
        ) from None
    return SDAutoencoder(vae, cfg)


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """Build the autoencoder a config names: ``identity`` (pixel space) or ``sd-vae``."""
    if cfg.kind == "identity":
        return IdentityAutoencoder(channels=cfg.channels, scaling_factor=cfg.scaling_factor)
    if cfg.kind == "sd-vae":
        return load_sd_vae(cfg)
    raise ValueError(f"autoencoder.kind: unknown kind {cfg.kind!r}; available: 'identity', 'sd-vae'")
