"""Multi-scale residual factorization (MSF §3.2-3.3; docs/design.md §1).

A target ``z`` of size ``N x N`` is split into K components ``c_0 .. c_{K-1}`` of
sizes ``n_0 < ... < n_{K-1} = N`` so that ``sum_k up(c_k, N) == z``. ``c_0`` is the
base (low resolution), the others are residuals.

One pair of resize functions, ``up`` and ``down``, is used by training
(factorize, priors) and by sampling (compose): a mismatch between the two would
make the sampler build priors the networks never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def up(a: Tensor, n: int) -> Tensor:
    """Bilinear resize of ``a`` (B, C, h, w) to ``n x n``; identity when already that size."""
    if a.shape[-1] == n and a.shape[-2] == n:
        return a
    return F.interpolate(a, size=(n, n), mode="bilinear", align_corners=False)


def down(a: Tensor, n: int) -> Tensor:
    """Antialiased bilinear resize of ``a`` (B, C, h, w) to ``n x n``."""
    if a.shape[-1] == n and a.shape[-2] == n:
        return a
    return F.interpolate(a, size=(n, n), mode="bilinear", align_corners=False, antialias=True)


def resize_image(x: Tensor, size: int) -> Tensor:
    """Downsample an image batch in [-1, 1] to ``size`` (antialiased bicubic, like PIL)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(-1.0, 1.0)


def check_sizes(sizes: Sequence[int], what: str = "sizes") -> list[int]:
    """Validate a coarse-to-fine size list: non-empty, positive, strictly increasing."""
    sizes = [int(s) for s in sizes]
    if not sizes:
        raise ValueError(f"{what}: need at least one scale, got []")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"{what}: every size must be positive, got {sizes}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{what} must be strictly increasing (coarse to fine), got {sizes}")
    return sizes


def factorize(
    z: Tensor,
    latent_sizes: Sequence[int],
    base: Tensor | None = None,
) -> list[Tensor]:
    """Algorithm 1: split ``z`` (B, C, N, N) into components ``[c_0, ..., c_{K-1}]``.

    ``base`` is ``c_0`` when given (the ``image`` base mode: the encoding of the
    downsampled image); otherwise ``c_0 = down(z, n_0)`` (the ``latent`` base mode).
    """
    sizes = check_sizes(latent_sizes, "latent sizes")
    n_full = sizes[-1]
    if z.dim() != 4 or z.shape[-1] != n_full or z.shape[-2] != n_full:
        raise ValueError(
            f"target must be (B, C, {n_full}, {n_full}) for latent sizes {sizes}, "
            f"got {tuple(z.shape)}"
        )
    if len(sizes) == 1:
        return [z]
    c0 = down(z, sizes[0]) if base is None else base
    if tuple(c0.shape) != (z.shape[0], z.shape[1], sizes[0], sizes[0]):
        raise ValueError(
            f"base must be (B, C, {sizes[0]}, {sizes[0]}) = {(z.shape[0], z.shape[1])} + "
            f"({sizes[0]}, {sizes[0]}), got {tuple(c0.shape)}"
        )
    components = [c0]
    residual = z - up(c0, n_full)
    for n in sizes[1:-1]:
        c = down(residual, n)
        components.append(c)
        residual = residual - up(c, n_full)
    components.append(residual)
    return components


def input_priors(components: Sequence[Tensor]) -> list[Tensor | None]:
    """Algorithm 2: the prior of scale k is what scales 0..k-1 have built, at size ``n_k``."""
    n_full = components[-1].shape[-1]
    acc = torch.zeros_like(components[-1])
    priors: list[Tensor | None] = []
    for k, c in enumerate(components):
        priors.append(None if k == 0 else down(acc, c.shape[-1]))
        acc = acc + up(c, n_full)
    return priors


def compose(components: Sequence[Tensor]) -> Tensor:
    """The accumulator after the last scale: ``sum_k up(c_k, N)`` (inverse of ``factorize``)."""
    n_full = components[-1].shape[-1]
    acc = torch.zeros_like(components[-1])
    for c in components:
        acc = acc + up(c, n_full)
    return acc


def accumulate_sample(
    generate: Callable[[int, Tensor | None], Tensor],
    latent_sizes: Sequence[int],
    like: Tensor,
) -> list[Tensor]:
    """Algorithm 3's outer loop: generate each component given the prior built so far.

    ``generate(k, prior_k)`` returns ``c_k``; ``like`` is a tensor of the full-size
    accumulator's shape, dtype and device. Returns the components; ``compose`` them
    (or use the running sum) to get the target.
    """
    sizes = check_sizes(latent_sizes, "latent sizes")
    acc = torch.zeros_like(like)
    components = []
    for k, n in enumerate(sizes):
        prior = None if k == 0 else down(acc, n)
        c = generate(k, prior)
        components.append(c)
        acc = acc + up(c, sizes[-1])
    return components
