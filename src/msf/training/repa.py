"""Representation alignment (REPA; Yu et al., 2025), an option of training.

An auxiliary loss that pulls the tokens after one early block of each scale's network, through a
small MLP (the *projector*), towards the patch features of a frozen pretrained image encoder
(DINOv2 in the paper), token by token:

    loss_k = eq. 5 + weight * mean over tokens of (1 - cos(projector(h_k), f_k))

``h_k`` are scale k's tokens after block ``depth_k``; ``f_k`` the encoder's patch features of the
clean training image, average-pooled to scale k's token grid (MSF's scales have grids of different
sizes; every scale aligns to the same image). The projector trains with the network and is not
part of the model: the model directory holds the networks alone, the checkpoint also the projectors.

The encoder is a timm model, from a local folder (timm's ``save_for_hf`` layout: ``config.json``
and ``model.safetensors``) or a hub id on a machine with network. Never align to a network a
metric uses (the Inception of FID, the classifier of class accuracy): that flatters the score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msf.config import ConfigError
from msf.method.models import DiT

if TYPE_CHECKING:
    from msf.config import Config


class Encoder(nn.Module):
    """A frozen timm image encoder: ``(B, 3, H, W)`` images in [-1, 1] -> ``(B, N, dim)`` patch
    features (class and register tokens dropped), at the encoder's own input size."""

    def __init__(self, model: nn.Module, source: str):
        super().__init__()
        import timm.data

        self.model = model.eval().requires_grad_(False)
        self.source = source
        data = timm.data.resolve_data_config({}, model=model)
        self.image_size = tuple(data["input_size"][1:])
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1), persistent=False)
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.dim = int(model.num_features)

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        feats = self.model.forward_features((x - self.mean) / self.std)
        if feats.dim() == 4:  # a convolutional encoder: (B, C, H, W)
            return feats.flatten(2).transpose(1, 2)
        return feats[:, self.prefix:]


def load_encoder(source: str) -> Encoder:
    """A timm encoder from a local folder or a hub id (``org/name``), with its weights; the error
    names the folder or id when it cannot be had."""
    try:
        import timm
    except ImportError:
        raise ConfigError("train.repa_encoder needs timm: pip install 'msf[repa]'") from None
    path = Path(source).expanduser()
    if path.exists():
        config = path / "config.json"
        try:
            arch = json.loads(config.read_text()).get("architecture")
        except (OSError, ValueError) as e:
            raise ConfigError(f"train.repa_encoder={source}: {config} is not a timm config ({e})") from None
        if not arch:
            raise ConfigError(f"train.repa_encoder={source}: {config} names no 'architecture' (a timm "
                              "model saved with timm.models.save_for_hf)")
        name = f"local-dir:{path.resolve()}"
    else:
        name = source if source.startswith("hf-hub:") else f"hf-hub:{source}"
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # the hub offline, a missing repo, a bad weight file: say which source
        raise ConfigError(f"train.repa_encoder={source}: cannot load a timm encoder ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return Encoder(model, source)


class Projector(nn.Module):
    """REPA's projection: 3 linear layers with SiLU, from the network's width to the encoder's."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h)


class AlignedNet(nn.Module):
    """A scale's network with its projector: ``(v, projector(tokens after block depth))``.

    What the training step calls for a scale with REPA, so that DDP and ``torch.compile`` see the
    network and its projector as one module."""

    def __init__(self, net: nn.Module, projector: Projector, depth: int):
        super().__init__()
        self.net, self.projector, self.depth = net, projector, depth

    def forward(self, x: Tensor, t: Tensor, y: Tensor, prior: Tensor | None = None,
                **times: Tensor) -> tuple[Tensor, Tensor]:  # times: a MeanFlow network's r
        v, h = self.net(x, t, y, prior, tokens_at=self.depth, **times)
        return v, self.projector(h)


def default_depth(depth: int) -> int:
    """A third of the blocks, rounded up (REPA aligns block 8 of SiT-XL's 28)."""
    return max(1, math.ceil(depth / 3))


def pooled(features: Tensor, grid: int) -> Tensor:
    """(B, N, D) features on a square grid -> (B, grid * grid, D), average-pooled (or upsampled)."""
    B, N, D = features.shape
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"the encoder's {N} patch features are not a square grid")
    x = features.transpose(1, 2).reshape(B, D, g, g)
    x = F.adaptive_avg_pool2d(x, grid) if grid <= g else F.interpolate(x, size=grid, mode="bilinear")
    return x.flatten(2).transpose(1, 2)


def alignment_loss(z: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens and images of ``1 - cos(z, target)`` (REPA's negative cosine, offset to 0)."""
    return (1 - F.cosine_similarity(z.float(), target.float(), dim=-1)).mean()


# --------------------------------------------------------------------------- wiring into training


def depth_for(cfg: Config, k: int) -> int:
    """The block whose tokens scale k aligns (``train.repa_depth``, or a third of the blocks; 0: none)."""
    d = cfg.train.repa_depth
    return default_depth(cfg.model.scales[k].depth) if d is None else d[k]


def encoder_and_projectors(cfg: Config, networks: Sequence[nn.Module], scales: list[int], device: torch.device
                           ) -> tuple[Encoder, dict[int, Projector]]:
    """REPA's frozen encoder, and a projector for each trained scale with a block to align."""
    encoder = load_encoder(cfg.train.repa_encoder).to(device)
    projectors = {}
    for k in scales:
        if not depth_for(cfg, k):
            continue
        if not isinstance(networks[k], DiT):
            raise ConfigError(f"train.repa_encoder: scale {k}'s network is not msf's DiT, which REPA reads "
                              "its tokens from; set train.repa_depth to 0 for that scale")
        projectors[k] = Projector(cfg.model.scales[k].width, cfg.train.repa_projector, encoder.dim).to(device)
    return encoder, projectors


def with_projector(net: nn.Module, projector: Projector | None, cfg: Config, k: int) -> nn.Module:
    """What the training step calls for scale k: the network, with its projector when the scale aligns."""
    return net if projector is None else AlignedNet(net, projector, depth_for(cfg, k))


def alignment_terms(encoder: Encoder | None, images: Tensor | None, grids: dict[int, int], weight: float
                    ) -> dict[int, Callable[[Tensor], Tensor]] | None:
    """Per aligned scale (``grids``: its token grid), REPA's weighted term as a function of its projected
    tokens; None without REPA. The encoder reads the batch's images once for all scales."""
    if encoder is None:
        return None
    feats = encoder(images)

    def term(grid: int) -> Callable[[Tensor], Tensor]:
        target = pooled(feats, grid)
        return lambda z: weight * alignment_loss(z, target)

    return {k: term(g) for k, g in grids.items()}
