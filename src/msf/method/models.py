"""The per-scale network: a DiT (Peebles & Xie, 2023) that also sees its prior.

Read top to bottom: embedders, the adaLN-Zero block, the final layer, the DiT.
It follows facebookresearch/DiT's ``models.py`` (same layers, same
initialisation, so parameter counts match it) with three differences:

* the output is a velocity with as many channels as the component (rectified
  flow has no learned variance, so no ``learn_sigma`` channels);
* scale k > 0 concatenates its prior to the noisy input along channels before
  patchify (``prior_channels``);
* attention is ``scaled_dot_product_attention`` (fused kernels, no N x N copy).

Time ``t`` is msf's, in [0, 1] (1 = noise); it is multiplied by 1000 before the
sinusoidal embedding so the frequencies match DiT's. Weights trained in SiT's or DDPM's
time are read in msf's by the subclasses in :mod:`msf.interfaces.convert`.

The architecture comes from the scale's :class:`msf.config.ScaleConfig`: depth, width, heads,
patch and MLP ratio as DiT's; ``gelu="tanh"``, the GELU approximation DiT and SiT were trained
with; and four later DiT-family options (LightningDiT's set), off by default so that the paper's
presets build the network above bit for bit: ``qk_norm`` (RMSNorm on each head's queries and keys,
learned scale), ``norm="rmsnorm"`` (the blocks' parameter-free norms), ``mlp="swiglu"`` (a gated
feed-forward with 2/3 of the hidden width, so about the same parameters) and ``pos_embed="rope"``
(2-D rotary embedding of queries and keys instead of the added sin-cos table; ``"sincos+rope"``
keeps both). A scale trained with MeanFlow (``objective="meanflow"``, :mod:`msf.method.meanflow`)
predicts the average velocity over ``[r, t]``: its network embeds the interval ``t - r`` as a second
time, added to the first; a ``flow`` network has no such input, its parameters unchanged. Likewise a
residual scale trained with conditioning augmentation (``augmented_prior``, ``model.prior_aug_max > 0``)
embeds the level of the noise on its prior, added to the time's; without it the network is unchanged.

``Linear``, ``norm_input`` and ``attention`` come from :mod:`msf.speed`: an
``nn.Linear``, the identity and SDPA as far as results go (up to bf16 rounding), faster on
the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from msf.config import ScaleConfig
from msf.speed import Linear, attention, norm_input

# the values of the ScaleConfig fields that choose among the network's options
OPTIONS = {"gelu": ("exact", "tanh"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
           "pos_embed": ("sincos", "rope", "sincos+rope"), "objective": ("flow", "meanflow")}

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal features, then a 2-layer MLP."""

    def __init__(self, width: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale  # what t is multiplied by before the sinusoids
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width)
        )

    @staticmethod
    def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        # fp32 at least (float64 stays float64: the JVP tests compare with finite differences)
        args = t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        freq = self.sinusoidal(t * self.scale, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Index ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


def rope_2d(head_dim: int, grid: int, theta: float = 10000.0) -> Tensor:
    """Angles of a 2-D rotary position embedding for a ``grid x grid`` token grid, (2, N, head_dim):
    cos and sin. The first half of each head rotates by the row, the second by the column, each
    half in ``head_dim / 4`` frequency pairs (the axial RoPE of EVA-02 and LightningDiT)."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    ay, ax = gy.reshape(-1, 1) * freqs, gx.reshape(-1, 1) * freqs
    angles = torch.cat([ay, ay, ax, ax], dim=1)
    return torch.stack([angles.cos(), angles.sin()]).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate (B, heads, N, head_dim) queries or keys: in each half, channel i pairs with i + d/4."""
    q = x.shape[-1] // 4
    x1, x2, x3, x4 = x.split(q, dim=-1)
    rotated = torch.cat([-x2, x1, -x4, x3], dim=-1)
    cos, sin = rope.to(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        if qk_norm:
            self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
            self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.qk_norm = qk_norm

    def forward(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm:  # scales cast to q's dtype: an fp32 scale takes bf16 q off the fused kernel
            q = F.rms_norm(q, q.shape[-1:], self.q_norm.weight.to(q.dtype), self.q_norm.eps)
            k = F.rms_norm(k, k.shape[-1:], self.k_norm.weight.to(k.dtype), self.k_norm.eps)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """Gated feed-forward: ``w3(silu(x W1) * x W2)``, W1 and W2 in one product (as LightningDiT)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = Linear(width, 2 * hidden)
        self.w3 = Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def block_norm(kind: str, width: int) -> nn.Module:
    """The parameter-free norm before attention, feed-forward and output (adaLN scales it)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        # Exact GELU by default, not DiT's tanh approximation: equal to ~1e-3, 5x faster on CPU.
        # Imported DiT / SiT weights keep the tanh they were trained with (approximate="tanh").
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = embed(t) + embed(y)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, approximate: str = "none",
                 qk_norm: bool = False, norm: str = "layernorm", mlp: str = "gelu"):
        super().__init__()
        self.norm1 = block_norm(norm, width)
        self.attn = Attention(width, heads, qk_norm)
        self.norm2 = block_norm(norm, width)
        hidden = int(width * mlp_ratio)
        self.mlp = SwiGLU(width, int(2 / 3 * hidden)) if mlp == "swiglu" else Mlp(width, hidden, approximate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, rope: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)
        )
        h = modulate(self.norm1(norm_input(x)), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, rope)
        h = modulate(self.norm2(norm_input(x)), shift_mlp, scale_mlp)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(h)
        return x


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = block_norm(norm, width)
        self.linear = Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(norm_input(x)), shift, scale))


def sincos_pos_embed_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding for a ``grid x grid`` token grid (as DiT/MAE)."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: Tensor, dim: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # DiT's meshgrid order: first half embeds the column (w) coordinate, second the row (h).
    emb = torch.cat([embed_1d(gx, width // 2), embed_1d(gy, width // 2)], dim=1)
    return emb.float()


class DiT(nn.Module):
    """One scale's diffusion transformer: ``v = net(x_t, t, y, prior)``, in msf's time.

    ``scale`` gives the architecture (depth, width, heads, patch, MLP ratio and the options of the
    module docstring; its image size and sampler settings are not the network's). The rest is
    the model's: ``input_size``, the component's spatial size ``n_k``; ``channels``, its channel
    count; ``num_classes`` (the null class is one more); ``prior_channels``, the prior's extra
    input channels (0 at the base scale or without the prior); ``augmented_prior``, whether the network
    takes the level of the noise on its prior (conditioning augmentation).
    """

    time_scale = 1000.0  # msf's t in [0, 1] times 1000: DiT's embedding frequencies

    def __init__(self, scale: ScaleConfig, input_size: int, channels: int, num_classes: int,
                 prior_channels: int = 0, augmented_prior: bool = False):
        super().__init__()
        width, heads, patch_size = scale.width, scale.heads, scale.patch_size
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch {patch_size}")
        for name, allowed in OPTIONS.items():
            if getattr(scale, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(scale, name)!r}")
        if "rope" in scale.pos_embed and (width // heads) % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {width // heads}")
        self.input_size = input_size
        self.channels = channels
        self.prior_channels = prior_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid = input_size // patch_size

        self.x_embedder = nn.Conv2d(
            channels + prior_channels, width, kernel_size=patch_size, stride=patch_size
        )
        self.t_embedder = TimestepEmbedder(width, scale=self.time_scale)
        self.objective = scale.objective
        if self.objective == "meanflow":  # the interval t - r, MeanFlow's second time
            self.interval_embedder = TimestepEmbedder(width, scale=self.time_scale)
        self.augmented_prior = augmented_prior
        if augmented_prior:  # the prior's noise level, in [0, ~1] as times are: the same frequencies
            self.level_embedder = TimestepEmbedder(width, scale=1000.0)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(width, self.grid)[None] if "sincos" in scale.pos_embed else None,
            persistent=False,
        )
        rope = rope_2d(width // heads, self.grid) if "rope" in scale.pos_embed else None
        self.register_buffer("rope", rope, persistent=False)
        approximate = "tanh" if scale.gelu == "tanh" else "none"
        self.blocks = nn.ModuleList([
            DiTBlock(width, heads, scale.mlp_ratio, approximate, scale.qk_norm, scale.norm, scale.mlp)
            for _ in range(scale.depth)
        ])
        self.final_layer = FinalLayer(width, patch_size, channels, scale.norm)
        self.grad_checkpointing = False  # recompute each block's activations in backward
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.objective == "meanflow":
            nn.init.normal_(self.interval_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.interval_embedder.mlp[2].weight, std=0.02)
        if self.augmented_prior:
            nn.init.normal_(self.level_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.level_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        B, p, c, g = x.shape[0], self.patch_size, self.channels, self.grid
        x = x.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, prior: Tensor | None = None,
                tokens_at: int | None = None, r: Tensor | None = None,
                level: Tensor | float | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The velocity; for a ``meanflow`` network the average velocity over ``[r, t]`` (``r = t``: the
        velocity). With ``tokens_at=d``, also the tokens after block d (1-based), for REPA. ``level``: the
        std of the noise on ``prior``, per sample or one for all, for an ``augmented_prior`` network only."""
        if (r is None) != (self.objective == "flow"):
            raise ValueError(f"this scale's network (objective {self.objective!r}) "
                             + ("takes the start r of its interval, got None" if r is None else
                                "predicts the velocity at t and takes no r"))
        if (level is None) == self.augmented_prior:
            raise ValueError("this scale's network " + (
                "was trained on priors noised at a level it is told (model.prior_aug_max): give level"
                if level is None else "was trained without conditioning augmentation and takes no level"))
        if self.prior_channels:
            if prior is None:
                raise ValueError("this scale's network needs its prior, got None")
            x = torch.cat([x, prior.to(x.dtype)], dim=1)
        x = x.to(self.x_embedder.weight.dtype)  # the sampler's fp32 state into bf16 weights
        # contiguous: else the residual stream keeps the conv's (B, D, N) layout through
        # every block, and each LayerNorm and Linear copies it (10% of an XL forward)
        x = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous()
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        if r is not None:
            c = c + self.interval_embedder(t - r)
        if level is not None:
            c = c + self.level_embedder(torch.as_tensor(level, device=t.device).expand(t.shape[0]))
        tokens = None
        for i, block in enumerate(self.blocks, 1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, self.rope, use_reentrant=False)
            else:
                x = block(x, c, self.rope)
            if i == tokens_at:
                tokens = x
        out = self.unpatchify(self.final_layer(x, c))
        return out if tokens_at is None else (out, tokens)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted as DiT's ``models.py`` does: its fixed position embedding included."""
    n = sum(p.numel() for p in model.parameters())
    pos = getattr(model, "pos_embed", None)
    return n + (pos.numel() if pos is not None else 0)
