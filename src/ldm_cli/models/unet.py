"""ConvNeXt U-Net that predicts v from a noisy latent z_t and its timestep t.

The U-Net shape follows Ho et al. (2020, "Denoising Diffusion Probabilistic Models"):
an encoder that halves the resolution level by level, a middle, and a decoder that
doubles it back, concatenating the encoder's activations of the same resolution. Each
stage is made of ConvNeXt blocks (Liu et al. 2022, "A ConvNet for the 2020s"), and every
block is conditioned on t by adaptive normalisation (adaLN, Peebles & Xie 2023,
"Scalable Diffusion Models with Transformers"): the block's norm output is scaled and
shifted by amounts computed from an embedding of t.

Layout (ch_i = base_channels·channel_mults[i], L = number of levels):

    conv_in 3×3 (latent_channels → ch_0; 2·latent_channels with self-conditioning, below)
    encoder level i:  blocks_per_level × ConvNeXtBlock(ch_i) [→ SelfAttention if i ∈ attention_levels]
                      save skip_i; LevelDownsample(ch_i → ch_{i+1}) unless i = L−1
    middle:           ConvNeXtBlock → [SelfAttention if L−1 ∈ attention_levels] → ConvNeXtBlock
    decoder level i (deepest first):
                      LevelUpsample(ch_{i+1} → ch_i) unless i = L−1
                      concat skip_i, 1×1 conv (2·ch_i → ch_i)
                      blocks_per_level × ConvNeXtBlock(ch_i) [→ SelfAttention if i ∈ attention_levels]
    LayerNorm → conv_out 3×3 (ch_0 → latent_channels)

Self-conditioning (Chen, Zhang & Hinton 2023, "Analog Bits", §3; docs/MATH.md, §3): with
`self_condition`, conv_in also takes a previous estimate ẑ0 of the clean latent, stacked
on z_t, so v̂ = UNet(z_t, t, ẑ0). Training feeds zeros half the time and otherwise the
network's own (gradient-free) estimate from a first pass; sampling feeds the ẑ0 of the
step before (zeros at the first step).

Channel changes happen in the resampling convs (as ConvNeXt's own downsampling layers
do), so no separate 1×1 projection is needed inside a level.

forward() has no data-dependent Python control flow: which levels have attention is
decided once in __init__ (levels without it hold nn.Identity), so the module traces
into one graph under torch.compile(fullgraph=True) and runs in channels_last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ldm_cli.config import UNetConfig


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017; used for t by Ho et al. 2020).

    With half = dim // 2 and frequencies ω_k = max_period^(−k/half), k = 0 … half−1:

        emb(t) = [sin(t·ω_0), …, sin(t·ω_{half−1}), cos(t·ω_0), …, cos(t·ω_{half−1})]

    and one zero appended when `dim` is odd. `t` has shape (B,), integer or float
    (fractional timesteps are fine); the result is float32 of shape (B, dim).
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    frequencies = torch.exp(-math.log(max_period) * k / half)
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t → sinusoidal features (base_channels) → Linear → SiLU → Linear (cond_dim = 4·base),
    the conditioning vector every block reads (Ho et al. 2020)."""

    def __init__(self, frequency_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # a bf16 copy of the model computes in bf16


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel of an (B, C, H, W) tensor, as in ConvNeXt.

    It normalises a channels-last view (free when the tensor is in channels_last)."""

    def __init__(self, channels: int, affine: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) with adaLN timestep conditioning (Peebles & Xie 2023).

        h = depthwise 7×7 conv(x)
        h = LayerNorm(h)·(1 + scale(c)) + shift(c)      c = timestep conditioning vector
        h = Linear(mlp_ratio·C → C)(GELU(Linear(C → mlp_ratio·C)(h)))
        out = x + dropout(γ ⊙ h)                        γ: per-channel layer scale

    γ starts at `layer_scale_init` (1e-6 by default, as in ConvNeXt) so that a deep stack
    starts close to the identity; CaiT (Touvron et al. 2021, §3) starts networks of up to
    18 blocks at 0.1, as the quickstart config does. The scale/shift projection keeps PyTorch's default
    (non-zero) initialisation, unlike DiT's adaLN-Zero: zeroing it would make the
    gradient of the timestep MLP exactly zero at the first step.
    """

    def __init__(self, channels: int, cond_dim: int, mlp_ratio: int, layer_scale_init: float, dropout: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * channels))
        self.expand = nn.Linear(channels, mlp_ratio * channels)
        self.contract = nn.Linear(mlp_ratio * channels, channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C): Linear acts on channels
        scale, shift = self.modulation(cond)[:, None, None, :].chunk(2, dim=-1)
        h = torch.addcmul(shift, self.norm(h), 1 + scale)  # norm(h)·(1 + scale) + shift, one pass
        h = self.contract(F.gelu(self.expand(h)))
        # x + dropout(γ ⊙ h) in one pass (dropout commutes with the per-channel γ)
        return torch.addcmul(x, self.dropout(h).permute(0, 3, 1, 2), self.layer_scale[:, None, None])


SHORT_SEQUENCE = 16  # tokens: up to here sampling writes attention out (benchmarks/cpu_speed.py)


def written_out_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d)·v over the last two dimensions (Vaswani et al. 2017, eq. 1), as
    written, the softmax in float32 at least."""
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    weights = (q @ k.transpose(-2, -1)).to(softmax_dtype) * q.shape[-1] ** -0.5
    return weights.softmax(dim=-1).to(v.dtype) @ v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d)·v: written out when no gradient is needed (sampling) for up to
    SHORT_SEQUENCE tokens, else torch's fused kernel.

    For the 16 tokens of the quickstart model, sampling with the written-out product was
    1.2–3.8× faster on the CPU than with the fused kernel, in float32 and bfloat16; for
    training (forward and backward, float32) the fused kernel was 2.3× faster, and for
    long sequences it is much faster and never holds the N×N weights in memory
    (`benchmarks/cpu_speed.py`, section 5). The two differ only by rounding.
    """
    if not q.requires_grad and q.shape[-2] <= SHORT_SEQUENCE:
        return written_out_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over all pixels, with a residual connection and
    the same per-channel layer scale as the ConvNeXt blocks (so it, too, starts near the
    identity)."""

    def __init__(self, channels: int, heads: int, layer_scale_init: float, dropout: float) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention over {channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), layer_scale_init))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x.permute(0, 2, 3, 1).reshape(b, height * width, c))
        q, k, v = self.qkv(tokens).reshape(b, height * width, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = attention(q, k, v)  # (B, heads, N, C/heads)
        h = self.out(attended.transpose(1, 2).reshape(b, height * width, c))
        h = self.dropout(self.layer_scale * h)
        return x + h.reshape(b, height, width, c).permute(0, 3, 1, 2)


class LevelDownsample(nn.Module):
    """LayerNorm, then a 2×2 stride-2 conv that halves the resolution and sets the width
    of the next level (ConvNeXt's downsampling layer)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))


class LevelUpsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv to the width of the level above."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LevelBlocks(nn.Module):
    """The blocks of one level: `depth` ConvNeXt blocks, then attention or nothing."""

    def __init__(self, channels: int, depth: int, cfg: UNetConfig, cond_dim: int, attention: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(channels, cond_dim, cfg.mlp_ratio, cfg.layer_scale_init, cfg.dropout) for _ in range(depth)
        )
        self.attention: nn.Module = (
            SelfAttention(channels, cfg.attention_heads, cfg.layer_scale_init, cfg.dropout) if attention else nn.Identity()
        )

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, cond)
        return self.attention(x)


class Middle(nn.Module):
    """ConvNeXt block → (attention if the lowest level has it) → ConvNeXt block."""

    def __init__(self, channels: int, cfg: UNetConfig, cond_dim: int, attention: bool) -> None:
        super().__init__()
        self.first = ConvNeXtBlock(channels, cond_dim, cfg.mlp_ratio, cfg.layer_scale_init, cfg.dropout)
        self.attention: nn.Module = (
            SelfAttention(channels, cfg.attention_heads, cfg.layer_scale_init, cfg.dropout) if attention else nn.Identity()
        )
        self.second = ConvNeXtBlock(channels, cond_dim, cfg.mlp_ratio, cfg.layer_scale_init, cfg.dropout)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.second(self.attention(self.first(x, cond)), cond)


class EncoderLevel(nn.Module):
    """The level's blocks, whose output is kept for the decoder, then LevelDownsample (or nothing at the
    lowest level). Returns (downsampled, skip)."""

    def __init__(self, channels: int, out_channels: int, stage: LevelBlocks, downsample: bool) -> None:
        super().__init__()
        self.stage = stage
        self.downsample: nn.Module = LevelDownsample(channels, out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.stage(x, cond)
        return self.downsample(skip), skip


class DecoderLevel(nn.Module):
    """LevelUpsample (or nothing at the lowest level), merge the skip, then the level's blocks."""

    def __init__(self, in_channels: int, channels: int, stage: LevelBlocks, upsample: bool) -> None:
        super().__init__()
        self.upsample: nn.Module = LevelUpsample(in_channels, channels) if upsample else nn.Identity()
        self.merge = nn.Conv2d(2 * channels, channels, 1)
        self.stage = stage

    def forward(self, x: Tensor, skip: Tensor, cond: Tensor) -> Tensor:
        x = self.merge(torch.cat([self.upsample(x), skip], dim=1))
        return self.stage(x, cond)


class UNet(nn.Module):
    """v-prediction network v̂ = UNet(z_t, t), or UNet(z_t, t, ẑ0) with `self_condition`, for
    latent diffusion (see the module docstring).

    Works for any latent side divisible by 2**(levels−1); `cfg.latent_size` is what
    the training code feeds it, not a limit baked into the weights.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * mult for mult in cfg.channel_mults]
        levels = len(widths)
        self.levels = levels
        for level in cfg.attention_levels:
            if widths[level] % cfg.attention_heads:
                raise ValueError(
                    f"attention at level {level}: {widths[level]} channels are not divisible by "
                    f"attention_heads = {cfg.attention_heads}"
                )
        cond_dim = 4 * cfg.base_channels
        attends = [level in cfg.attention_levels for level in range(levels)]

        self.time_embed = TimestepEmbedder(cfg.base_channels, cond_dim)
        self.self_conditioned = cfg.self_condition
        in_channels = 2 * cfg.latent_channels if cfg.self_condition else cfg.latent_channels
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        self.encoder = nn.ModuleList(
            EncoderLevel(
                channels=widths[i],
                out_channels=widths[min(i + 1, levels - 1)],
                stage=LevelBlocks(widths[i], cfg.blocks_per_level, cfg, cond_dim, attends[i]),
                downsample=i < levels - 1,
            )
            for i in range(levels)
        )
        self.middle = Middle(widths[-1], cfg, cond_dim, attends[-1])
        # decoder[j] handles level levels−1−j (deepest first)
        self.decoder = nn.ModuleList(
            DecoderLevel(
                in_channels=widths[min(i + 1, levels - 1)],
                channels=widths[i],
                stage=LevelBlocks(widths[i], cfg.blocks_per_level, cfg, cond_dim, attends[i]),
                upsample=i < levels - 1,
            )
            for i in reversed(range(levels))
        )
        self.norm_out = ChannelLayerNorm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.latent_channels, 3, padding=1)

    def forward(self, z_t: Tensor, t: Tensor, z0_self: Tensor | None = None) -> Tensor:
        """z_t: (B, latent_channels, H, W) noisy latents; t: (B,) timesteps (int or float);
        z0_self: a previous estimate of z0, shaped as z_t, for a self-conditioned network
        (None: zeros, "no estimate yet"). Returns v̂ with the shape of z_t."""
        multiple = 2 ** (self.levels - 1)
        if z_t.ndim != 4 or z_t.shape[1] != self.cfg.latent_channels or z_t.shape[-2] % multiple or z_t.shape[-1] % multiple:
            raise ValueError(
                f"UNet expects latents of shape (B, {self.cfg.latent_channels}, H, W) with H and W "
                f"multiples of {multiple}, got {tuple(z_t.shape)}"
            )
        cond = self.time_embed(t.reshape(-1).expand(z_t.shape[0]))

        h = self.conv_in(self.network_input(z_t, z0_self))
        skips: list[Tensor] = []
        for encoder_level in self.encoder:
            h, skip = encoder_level(h, cond)
            skips.append(skip)
        h = self.middle(h, cond)
        for decoder_level in self.decoder:
            h = decoder_level(h, skips.pop(), cond)
        return self.conv_out(self.norm_out(h))

    def network_input(self, z_t: Tensor, z0_self: Tensor | None) -> Tensor:
        """z_t, with the self-conditioning estimate stacked on its channels when the network takes one."""
        if not self.self_conditioned:
            if z0_self is not None:
                raise ValueError("this UNet was built without self_condition; it takes no z0 estimate")
            return z_t
        if z0_self is None:
            z0_self = torch.zeros_like(z_t)
        elif z0_self.shape != z_t.shape:
            raise ValueError(f"z0_self must have the shape of z_t {tuple(z_t.shape)}, got {tuple(z0_self.shape)}")
        return torch.cat([z_t, z0_self.to(z_t.dtype)], dim=1)
