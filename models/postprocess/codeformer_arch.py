"""A CodeFormer-compatible face restorer, written for rayhorde from the published layout.

CodeFormer's code and weights carry a non-commercial licence (S-Lab License 1.0): nothing of
its code is used here; this module only reproduces the parameter names and shapes that
``codeformer.pth`` (``{"params_ema": state_dict}``) needs for a strict load, and the
documented computation:

- ``encoder.blocks.N``: a VQGAN encoder (3x3 stem; per level two residual blocks
  ``norm1/conv1/norm2/conv2`` (+ ``conv_out`` when the width changes), a strided
  ``Downsample``; attention blocks ``norm/q/k/v/proj_out`` at 16x16; GroupNorm(32) and a 3x3
  conv to the 256-d latent), 512 px -> 16x16x256.
- ``quantize.embedding``: the 1024 x 256 codebook.
- a transformer that predicts code indices from the encoder's features: ``position_emb``
  (256 x 512), ``feat_emb`` (256 -> 512), ``ft_layers.N`` (9 pre-norm layers, 8 heads,
  MLP 1024, GELU), ``idx_pred_layer`` (LayerNorm, Linear -> 1024 logits without bias).
- ``generator.blocks.N``: the VQGAN decoder from the looked-up codes (nearest upsampling).
- ``fuse_convs_dict[size]`` for 32, 64, 128, 256: controllable feature transforms
  (``encode_enc`` residual block over the concatenated encoder/decoder features, ``scale`` and
  ``shift`` conv-LeakyReLU-conv) that add ``w * (dec * scale + shift)`` to the decoder's
  features: ``w`` (fidelity, 0..1) trades quality (0) for faithfulness to the input (1).

Widths are parameters so tests can build a narrow network with the same key layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Feature-map size -> encoder block index whose output feeds the fusion at that size, and
# generator block index after which the fusion is applied (512 px, ch_mult of length 6).
ENCODER_TAPS = {512: 2, 256: 5, 128: 8, 64: 11, 32: 14, 16: 18}
GENERATOR_TAPS = {16: 6, 32: 9, 64: 12, 128: 15, 256: 18, 512: 21}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class VQResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.conv_out = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_out(x) if self.conv_out is not None else x)


class VQAttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)  # b, hw, c
        k = self.k(y).flatten(2).transpose(1, 2)
        v = self.v(y).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQEncoder(nn.Module):
    def __init__(self, nf: int, emb_dim: int, ch_mult: Sequence[int], res_blocks: int,
                 resolution: int, attn_resolutions: Sequence[int], groups: int):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1)]
        res, cin = resolution, nf
        for i, mult in enumerate(ch_mult):
            cout = nf * mult
            for _ in range(res_blocks):
                blocks.append(VQResBlock(cin, cout, groups))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(VQAttnBlock(cin, groups))
            if i != len(ch_mult) - 1:
                blocks.append(Downsample(cin))
                res //= 2
        blocks += [VQResBlock(cin, cin, groups), VQAttnBlock(cin, groups),
                   VQResBlock(cin, cin, groups), _norm(cin, groups),
                   nn.Conv2d(cin, emb_dim, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)


class VQGenerator(nn.Module):
    def __init__(self, nf: int, emb_dim: int, ch_mult: Sequence[int], res_blocks: int,
                 resolution: int, attn_resolutions: Sequence[int], groups: int):
        super().__init__()
        cin = nf * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        blocks: list[nn.Module] = [nn.Conv2d(emb_dim, cin, 3, 1, 1),
                                   VQResBlock(cin, cin, groups), VQAttnBlock(cin, groups),
                                   VQResBlock(cin, cin, groups)]
        for i in reversed(range(len(ch_mult))):
            cout = nf * ch_mult[i]
            for _ in range(res_blocks):
                blocks.append(VQResBlock(cin, cout, groups))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(VQAttnBlock(cin, groups))
            if i != 0:
                blocks.append(Upsample(cin))
                res *= 2
        blocks += [_norm(cin, groups), nn.Conv2d(cin, 3, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)

    def lookup(self, indices: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """indices (N, HW) -> features (N, C, H, W); ``shape`` is (N, H, W, C)."""
        return self.embedding(indices).view(shape).permute(0, 3, 1, 2).contiguous()


class TransformerLayer(nn.Module):
    """Pre-norm self-attention + GELU MLP; positions are added to queries and keys only."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.0)
        self.linear1 = nn.Linear(dim, mlp)
        self.linear2 = nn.Linear(mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x: (L, N, C)
        y = self.norm1(x)
        qk = y + pos
        x = x + self.self_attn(qk, qk, value=y, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.encode_enc = VQResBlock(2 * channels, channels, groups)

        def branch() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, padding=1))
        self.scale = branch()
        self.shift = branch()

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(h) + self.shift(h))


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give ``content`` the per-channel mean and standard deviation of ``style``."""
    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.flatten(2)
        return (flat.mean(-1)[..., None, None],
                (flat.var(-1) + eps).sqrt()[..., None, None])
    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    def __init__(self, nf: int = 64, ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
                 res_blocks: int = 2, resolution: int = 512, attn_resolutions=(16,),
                 codebook_size: int = 1024, emb_dim: int = 256, dim_embd: int = 512,
                 n_head: int = 8, n_layers: int = 9, connect_list=(32, 64, 128, 256),
                 norm_groups: int = 32):
        super().__init__()
        self.emb_dim = emb_dim
        self.latent_side = resolution // 2 ** (len(ch_mult) - 1)
        self.connect_list = tuple(int(s) for s in connect_list)
        self.encoder = VQEncoder(nf, emb_dim, ch_mult, res_blocks, resolution,
                                 attn_resolutions, norm_groups)
        self.quantize = Codebook(codebook_size, emb_dim)
        self.generator = VQGenerator(nf, emb_dim, ch_mult, res_blocks, resolution,
                                     attn_resolutions, norm_groups)
        self.position_emb = nn.Parameter(torch.zeros(self.latent_side ** 2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*[TransformerLayer(dim_embd, n_head, dim_embd * 2)
                                         for _ in range(n_layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd),
                                            nn.Linear(dim_embd, codebook_size, bias=False))
        # width at each feature-map size (the encoder's levels, 512 px first)
        widths = {resolution // 2 ** i: nf * m for i, m in enumerate(ch_mult)}
        self.fuse_convs_dict = nn.ModuleDict(
            {str(s): FuseSFT(widths[s], norm_groups) for s in self.connect_list})

    def forward(self, x: torch.Tensor, w: float = 0.5, adain: bool = True) -> torch.Tensor:
        """Restore (N, 3, 512, 512) RGB in [-1, 1]; ``w`` is the fidelity weight (0..1)."""
        enc_taps = {ENCODER_TAPS[s] for s in self.connect_list}
        enc_feats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in enc_taps:
                enc_feats[x.shape[-1]] = x
        lq = x  # N, emb_dim, 16, 16
        n = lq.shape[0]
        pos = self.position_emb.unsqueeze(1).expand(-1, n, -1)
        h = self.feat_emb(lq.flatten(2).permute(2, 0, 1))  # HW, N, C
        for layer in self.ft_layers:
            h = layer(h, pos)
        logits = self.idx_pred_layer(h).permute(1, 0, 2)  # N, HW, codebook
        idx = logits.argmax(dim=2)
        side = self.latent_side
        quant = self.quantize.lookup(idx, (n, side, side, self.emb_dim))
        if adain:
            quant = _adain(quant, lq)
        gen_taps = {GENERATOR_TAPS[s] for s in self.connect_list}
        x = quant
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in gen_taps and w > 0:
                size = x.shape[-1]
                x = self.fuse_convs_dict[str(size)](enc_feats[size], x, w)
        return x


def codeformer_v01(**overrides) -> CodeFormer:
    """The published configuration (``codeformer.pth``, v0.1.0)."""
    return CodeFormer(**overrides)


def codeformer_tiny() -> CodeFormer:
    # widths 4..32, GroupNorm of min(32, nf) = 4 groups and 8 heads (what
    # facefix.codeformer_from_state_dict assumes); the same blocks, so the same key layout
    return CodeFormer(nf=4, codebook_size=64, emb_dim=8, dim_embd=16, n_head=8, n_layers=9,
                      norm_groups=4)
