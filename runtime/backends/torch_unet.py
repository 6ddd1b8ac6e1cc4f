"""The bundled class-conditional ε-prediction UNet (PyTorch).

Small enough to run a denoiser evaluation in a few milliseconds on two CPU cores, shaped like the
DDPM/ADM UNet: residual blocks with GroupNorm and SiLU, time + class embedding added in every
block, self-attention at the coarsest resolutions. Inputs follow the bundle's ONNX contract:
``x_t [B,3,H,W] float32``, ``timestep [B] int64``, ``class_id [B] int64`` → ``eps [B,3,H,W]``.

Here because the PyTorch backend (torch_backend.py) runs it; training/train_denoiser.py trains it.
It imports torch, which the base install lacks: runtime code imports it only inside functions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters; stored in the bundle so the network can be rebuilt."""

    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 1
    num_classes: int = 8
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 3)
    blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)
    embed_dim: int = 128
    groups: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        d = dict(d)
        for key in ("channel_mult", "attention_levels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al.; as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, embed_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(embed_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class ClassConditionalUNet(nn.Module):
    """ε_θ(x_t, t, c): predicts the noise added to a cell image, given its class."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = [config.base_channels * m for m in config.channel_mult]
        e, g = config.embed_dim, config.groups
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.class_embed = nn.Embedding(config.num_classes, e)
        patch_channels = config.in_channels * config.patch_size**2
        self.conv_in = nn.Conv2d(patch_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for level, c in enumerate(ch):
            for _ in range(config.blocks_per_level):
                blocks = nn.ModuleList([ResBlock(cur, c, e, g)])
                if level in config.attention_levels:
                    blocks.append(SelfAttention(c, g))
                self.down.append(blocks)
                cur = c
                skips.append(cur)
            if level < len(ch) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, e, g), SelfAttention(cur, g), ResBlock(cur, cur, e, g)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            c = ch[level]
            for _ in range(config.blocks_per_level + 1):
                blocks = nn.ModuleList([ResBlock(cur + skips.pop(), c, e, g)])
                if level in config.attention_levels:
                    blocks.append(SelfAttention(c, g))
                self.up.append(blocks)
                cur = c
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))

        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, patch_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, class_id: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(timestep, self.config.embed_dim)) + self.class_embed(class_id)
        p = self.config.patch_size
        h = self.conv_in(F.pixel_unshuffle(x_t, p) if p > 1 else x_t)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, p) if p > 1 else out

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h
