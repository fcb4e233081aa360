"""A GFPGANv1Clean-compatible face restorer, written for rayhorde.

The published ``GFPGANv1.4.pth`` holds ``{"params_ema": state_dict}`` for TencentARC's
``GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, num_mlp=8,
input_is_latent=True, different_w=True, narrow=1, sft_half=True)``. This module rebuilds that
network from its published layout (parameter names and shapes) so that the file loads with
``strict=True``:

- a U-Net encoder: ``conv_body_first`` (1x1), ``conv_body_down.N`` (residual blocks that halve
  the size: ``conv1``, ``conv2``, bias-free ``skip``), ``final_conv``, then ``final_linear``
  from the 4x4 features to one 512-d latent per decoder layer (``different_w``);
- the U-Net decoder: ``conv_body_up.N`` (residual blocks that double the size), ``toRGB.N``
  (only trained as an auxiliary output), and per level the SFT condition branches
  ``condition_scale.N`` / ``condition_shift.N`` (conv, LeakyReLU, conv);
- ``stylegan_decoder``: a StyleGAN2 generator without custom CUDA ops ("clean"): ``style_mlp``
  (unused when latents are given), ``constant_input``, ``style_conv1``, ``to_rgb1``,
  ``style_convs.N`` / ``to_rgbs.N`` (modulated convolutions with demodulation, bilinear
  upsampling, a noise weight and a bias) and the stored noise buffers ``noises.noiseN``. The SFT
  conditions scale and shift half of the channels after each level's first (upsampling) conv.

The network maps an RGB face crop in [-1, 1] (N, 3, 512, 512) to a restored crop in [-1, 1].
Widths are parameters so tests can build a narrow network with the same key layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Decoder widths of the published 512 px, channel-multiplier-2 model, by feature-map size.
GFPGAN_V14_CHANNELS: dict[int, int] = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256,
                                       256: 128, 512: 64}


def stylegan_channels(channel_multiplier: int = 2, narrow: float = 1.0,
                      out_size: int = 512) -> dict[int, int]:
    """StyleGAN2 decoder widths by feature-map size (4 .. out_size)."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
            128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
            512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {s: int(c * narrow) for s, c in base.items() if s <= out_size}


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resize2(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class ResizeResBlock(nn.Module):
    """conv1 -> resize -> conv2, plus a resized 1x1 ``skip`` (the U-Net's blocks)."""

    def __init__(self, cin: int, cout: int, factor: float):
        super().__init__()
        self.factor = factor
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _resize2(_lrelu(self.conv1(x)), self.factor)
        h = _lrelu(self.conv2(h))
        return h + self.skip(_resize2(x, self.factor))


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: per-sample weights scaled by a style vector."""

    def __init__(self, cin: int, cout: int, kernel: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, eps: float = 1e-8):
        super().__init__()
        self.cin, self.cout, self.kernel = cin, cout, kernel
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.modulation = nn.Linear(style_dim, cin, bias=True)
        self.weight = nn.Parameter(torch.randn(1, cout, cin, kernel, kernel)
                                   / math.sqrt(cin * kernel * kernel))
        with torch.no_grad():
            nn.init.kaiming_normal_(self.modulation.weight, a=0, mode="fan_in",
                                    nonlinearity="linear")
            self.modulation.bias.fill_(1.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        w = self.weight * self.modulation(style).view(b, 1, c, 1, 1)
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4)) + self.eps).view(b, self.cout, 1, 1, 1)
        if self.upsample:
            x = _resize2(x, 2)
        h, wd = x.shape[-2:]
        out = F.conv2d(x.reshape(1, b * c, h, wd),
                       w.reshape(b * self.cout, c, self.kernel, self.kernel),
                       padding=self.kernel // 2, groups=b)
        return out.view(b, self.cout, *out.shape[-2:])


class StyleConv(nn.Module):
    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(cin, cout, 3, style_dim, True, upsample)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2.0)
        if noise is None:
            b, _, h, w = out.shape
            noise = out.new_empty(b, 1, h, w).normal_()
        return _lrelu(out + self.weight * noise + self.bias)


class ToRGB(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            out = out + (_resize2(skip, 2) if self.upsample else skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.repeat(batch, 1, 1, 1)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 generator ("clean") whose first conv of each level takes SFT conditions."""

    def __init__(self, channels: Mapping[int, int], out_size: int = 512, style_dim: int = 512,
                 num_mlp: int = 8, sft_half: bool = True):
        super().__init__()
        self.style_dim, self.sft_half = style_dim, sft_half
        self.log_size = int(math.log2(out_size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2
        mlp: list[nn.Module] = [PixelNorm()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)
        self.constant_input = ConstantInput(channels[4])
        self.style_conv1 = StyleConv(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGB(channels[4], style_dim, upsample=False)
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, res, res))
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        cin = channels[4]
        for i in range(3, self.log_size + 1):
            cout = channels[2 ** i]
            self.style_convs.append(StyleConv(cin, cout, style_dim, upsample=True))
            self.style_convs.append(StyleConv(cout, cout, style_dim))
            self.to_rgbs.append(ToRGB(cout, style_dim, upsample=True))
            cin = cout

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor],
                randomize_noise: bool = False) -> torch.Tensor:
        """``latent``: (N, num_latent, style_dim) W+ codes; conditions: [scale, shift] per level."""
        if randomize_noise:
            noise: list[torch.Tensor | None] = [None] * self.num_layers
        else:
            noise = [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        out = self.constant_input(latent.shape[0])
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for level, to_rgb in enumerate(self.to_rgbs):
            conv_a, conv_b = self.style_convs[2 * level], self.style_convs[2 * level + 1]
            out = conv_a(out, latent[:, i], noise[2 * level + 1])
            if i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]
                if self.sft_half:
                    keep, mod = torch.split(out, out.shape[1] // 2, dim=1)
                    out = torch.cat([keep, mod * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = conv_b(out, latent[:, i + 1], noise[2 * level + 2])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1 "clean" (v1.3 / v1.4 layout). ``channels`` are the decoder widths by size;
    the U-Net uses half of them (``unet_ratio``)."""

    def __init__(self, out_size: int = 512, style_dim: int = 512,
                 channels: Mapping[int, int] | None = None, num_mlp: int = 8,
                 different_w: bool = True, sft_half: bool = True, unet_ratio: float = 0.5):
        super().__init__()
        channels = dict(channels or stylegan_channels(2, 1.0, out_size))
        unet = {s: int(c * unet_ratio) for s, c in channels.items()}
        self.out_size, self.style_dim, self.different_w = out_size, style_dim, different_w
        self.log_size = int(math.log2(out_size))
        self.conv_body_first = nn.Conv2d(3, unet[out_size], 1)
        self.conv_body_down = nn.ModuleList()
        cin = unet[out_size]
        for i in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResizeResBlock(cin, unet[2 ** (i - 1)], 0.5))
            cin = unet[2 ** (i - 1)]
        self.final_conv = nn.Conv2d(cin, unet[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        cin = unet[4]
        for i in range(3, self.log_size + 1):
            self.conv_body_up.append(ResizeResBlock(cin, unet[2 ** i], 2.0))
            cin = unet[2 ** i]
        self.toRGB = nn.ModuleList(nn.Conv2d(unet[2 ** i], 3, 1)
                                   for i in range(3, self.log_size + 1))
        n_latent = (self.log_size * 2 - 2) if different_w else 1
        self.final_linear = nn.Linear(unet[4] * 16, n_latent * style_dim)
        self.stylegan_decoder = StyleGAN2DecoderSFT(channels, out_size, style_dim, num_mlp,
                                                    sft_half)
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for i in range(3, self.log_size + 1):
            c = unet[2 ** i]
            sft_out = c if sft_half else 2 * c
            for branch in (self.condition_scale, self.condition_shift):
                branch.append(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2),
                                            nn.Conv2d(c, sft_out, 3, 1, 1)))

    def forward(self, x: torch.Tensor, randomize_noise: bool = False) -> torch.Tensor:
        """Restore (N, 3, S, S) RGB in [-1, 1]; returns the decoder's image (unclamped).

        ``randomize_noise=False`` uses the stored noise buffers (deterministic output)."""
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = _lrelu(self.final_conv(feat))
        latent = self.final_linear(feat.flatten(1))
        if self.different_w:
            latent = latent.view(latent.shape[0], -1, self.style_dim)
        else:  # one W for every layer, through the mapping network
            latent = self.stylegan_decoder.style_mlp(latent)
            latent = latent.unsqueeze(1).repeat(1, self.stylegan_decoder.num_latent, 1)
        conditions = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[i])
            conditions.append(self.condition_scale[i](feat))
            conditions.append(self.condition_shift[i](feat))
        return self.stylegan_decoder(latent, conditions, randomize_noise=randomize_noise)


def gfpgan_v14(**overrides) -> GFPGANv1Clean:
    """The published GFPGAN v1.4 configuration (``GFPGANv1.4.pth``)."""
    kwargs = dict(out_size=512, style_dim=512, channels=GFPGAN_V14_CHANNELS, num_mlp=8,
                  different_w=True, sft_half=True)
    kwargs.update(overrides)
    return GFPGANv1Clean(**kwargs)


# Narrow widths with the v1.4 key layout (each level's width even, for the SFT half split).
TINY_CHANNELS: dict[int, int] = {4: 16, 8: 16, 16: 16, 32: 16, 64: 8, 128: 8, 256: 4, 512: 4}


def gfpgan_tiny() -> GFPGANv1Clean:
    return GFPGANv1Clean(out_size=512, style_dim=16, channels=TINY_CHANNELS, num_mlp=8,
                         different_w=True, sft_half=True)
