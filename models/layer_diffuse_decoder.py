"""Layer Diffuse's transparent VAE decoder: the normal VAE's RGB decode plus the latent in, RGBA out.

Why a second decoder: Layer Diffuse (Zhang & Agrawala, "Transparent Image Layer Diffusion using
Latent Transparency", arXiv 2402.17113) trains the diffusion model to produce latents whose
ordinary VAE decode is a plausible RGB image, while a separate network reads transparency back
out of that decode and the latent. The published weights (`vae_transparent_decoder.safetensors`
for SDXL, `layer_sd15_vae_transparent_decoder.safetensors` for SD 1.5, both in
`LayerDiffusion/layerdiffusion-v1`) are the state dict of a pixel-space UNet built from diffusers'
standard 2D blocks, so this module is assembled from the same diffusers blocks in the same order:
its `state_dict()` then has exactly the files' key names and shapes and the files load with
`strict=True`.

Published layout (the "UNet1024" of the reference loaders, `in_channels=3, out_channels=4`):
- `conv_in` 3 -> 32 (3x3); `latent_conv_in` 4 -> 64 (1x1), added to the features entering down
  level 3 (the 1/8 scale, where the latent grid lives);
- seven down levels of 2 resnets, widths 32, 32, 64, 128, 256, 512, 512, the last three with a
  self-attention after each resnet (head size 8), a strided-conv downsampler on all but the last
  (so image sides must be multiples of 2^6 = 64);
- a mid block (resnet, attention, resnet) at 512; seven mirrored up levels of 3 resnets (the
  first three with attention), nearest+conv upsamplers; GroupNorm(4) + SiLU + `conv_out` 32 -> 4.
- No time embedding (the resnets are built with `temb_channels=None`). About 104 M parameters.
Output channel 0 is alpha, channels 1-3 the (un-premultiplied) foreground colour, all in [0, 1].

The published decode runs the net on 8 flipped/rotated copies of its inputs (test-time
augmentation), undoes each transform and takes the per-pixel median; `augment=False` runs a
single pass (tests, or a faster and slightly noisier decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from PIL import Image
from torch import nn

LATENT_LEVEL = 3  # the latent joins the features entering this down level (1/8 scale)
SIZE_MULTIPLE = 64  # six 2x downsamplers


@dataclass(frozen=True)
class DecoderConfig:
    """Widths of the transparent decoder. The defaults are the published (full-size) network;
    `TINY` keeps the same levels, block types and layer counts (hence the same key names) at a
    few channels wide."""

    block_out_channels: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 512)
    attn_levels: int = 3  # how many of the deepest levels carry self-attention
    layers_per_block: int = 2
    norm_num_groups: int = 4
    attention_head_dim: int = 8
    in_channels: int = 3  # RGB from the normal VAE decode, in [0, 1]
    out_channels: int = 4  # alpha, then RGB
    latent_channels: int = 4


FULL = DecoderConfig()
TINY = DecoderConfig(block_out_channels=(4, 4, 8, 8, 8, 16, 16))


class TransparentVAEDecoder(nn.Module):
    """Pixel-space UNet with the key layout of the published transparent decoder.

    `forward(pixels, latent)` takes the normal VAE decode in [-1, 1] (what `vae.decode` returns)
    and the unscaled latent it came from (`latents / scaling_factor`), and returns RGBA in
    [0, 1] (single pass). `decode(...)` adds the published 8-way test-time augmentation."""

    def __init__(self, config: DecoderConfig = FULL):
        super().__init__()
        self.config = config
        ch, n = config.block_out_channels, len(config.block_out_channels)
        common = dict(
            temb_channels=None,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=config.norm_num_groups,
            attention_head_dim=config.attention_head_dim,
            resnet_time_scale_shift="default",
            dropout=0.0,
        )
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.latent_conv_in = nn.Conv2d(config.latent_channels, ch[LATENT_LEVEL - 1], kernel_size=1)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            attn = i >= n - config.attn_levels
            self.down_blocks.append(
                get_down_block(
                    "AttnDownBlock2D" if attn else "DownBlock2D",
                    num_layers=config.layers_per_block,
                    in_channels=ch[max(i - 1, 0)],
                    out_channels=ch[i],
                    add_downsample=i < n - 1,
                    downsample_padding=1,
                    downsample_type="conv",
                    **common,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=ch[-1],
            temb_channels=None,
            dropout=0.0,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            output_scale_factor=1.0,
            resnet_time_scale_shift="default",
            attention_head_dim=config.attention_head_dim,
            resnet_groups=config.norm_num_groups,
            attn_groups=None,
            add_attention=True,
        )
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        for i in range(n):
            attn = i < config.attn_levels
            self.up_blocks.append(
                get_up_block(
                    "AttnUpBlock2D" if attn else "UpBlock2D",
                    num_layers=config.layers_per_block + 1,
                    in_channels=rev[min(i + 1, n - 1)],
                    out_channels=rev[i],
                    prev_output_channel=rev[max(i - 1, 0)],
                    add_upsample=i < n - 1,
                    upsample_type="conv",
                    **common,
                )
            )
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, kernel_size=3, padding=1)

    def estimate(self, pixel01: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The raw network: RGB in [0, 1] + unscaled latent -> (alpha, R, G, B), unclipped."""
        sample = self.conv_in(pixel01)
        skips = [sample]
        for i, block in enumerate(self.down_blocks):
            if i == LATENT_LEVEL:
                sample = sample + self.latent_conv_in(latent)
            sample, res = block(hidden_states=sample, temb=None)
            skips.extend(res)
        sample = self.mid_block(sample, None)
        for block in self.up_blocks:
            k = len(block.resnets)
            sample = block(sample, tuple(skips[-k:]), None)
            del skips[-k:]
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))

    def forward(self, pixels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Single pass: VAE decode in [-1, 1] + unscaled latent -> RGBA in [0, 1]."""
        return _to_rgba(self.estimate(_to01(pixels), latent).clamp(0, 1))

    @torch.no_grad()
    def decode(self, pixels: torch.Tensor, latent: torch.Tensor, augment: bool = True) -> torch.Tensor:
        """RGBA in [0, 1] the published way: the median over the 8 flips/quarter turns of the
        inputs (each output clipped to [0, 1] and transformed back), or one pass."""
        h, w = pixels.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"transparent decode needs height and width multiples of 64, got {h}x{w}")
        p = next(self.parameters())
        pixel01, latent = _to01(pixels).to(p.device, p.dtype), latent.to(p.device, p.dtype)
        if not augment:
            return _to_rgba(self.estimate(pixel01, latent).clamp(0, 1))
        outs = []
        for flip in (False, True):
            for quarter in range(4):
                x, z = pixel01, latent
                if flip:
                    x, z = x.flip(3), z.flip(3)
                x, z = x.rot90(quarter, (2, 3)).contiguous(), z.rot90(quarter, (2, 3)).contiguous()
                y = self.estimate(x, z).clamp(0, 1)
                y = y.rot90(-quarter, (2, 3))
                outs.append(y.flip(3) if flip else y)
        # torch.median takes the lower of the two middle values for an even count, as published.
        return _to_rgba(torch.stack(outs).median(dim=0).values)


def _to01(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * 0.5 + 0.5).clamp(0, 1)


def _to_rgba(y: torch.Tensor) -> torch.Tensor:
    return torch.cat([y[:, 1:4], y[:, :1]], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_decoder(state_dict: dict[str, torch.Tensor], config: DecoderConfig | None = None) -> TransparentVAEDecoder:
    """Build a decoder for a published (or tiny) state dict. The width comes from the file
    (`conv_in.weight` and the per-level resnet convs), so full and tiny files load through the
    same call; any missing, extra or misshapen key is refused with its name."""
    if config is None:
        config = _config_from_state_dict(state_dict)
    with torch.device("meta"):
        decoder = TransparentVAEDecoder(config)
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, "transparent decoder")
    decoder = decoder.to_empty(device="cpu")
    decoder.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return decoder.eval()


def _config_from_state_dict(sd: dict[str, torch.Tensor]) -> DecoderConfig:
    widths = []
    i = 0
    while f"down_blocks.{i}.resnets.0.conv1.weight" in sd:
        widths.append(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]))
        i += 1
    if not widths or "conv_in.weight" not in sd:
        raise KeyError("transparent decoder: no conv_in.weight / down_blocks.N.resnets.0.conv1.weight keys")
    attn_levels = sum(1 for j in range(len(widths)) if f"down_blocks.{j}.attentions.0.to_q.weight" in sd)
    return DecoderConfig(block_out_channels=tuple(widths), attn_levels=attn_levels)


def check_keys(expected: dict[str, tuple], given: dict[str, tuple], what: str) -> None:
    """Raise KeyError naming every missing and unexpected key, or ValueError naming every key
    whose shape differs: a file that does not match exactly is refused, never half-applied."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise KeyError(f"{what}: missing keys {name_keys(missing)}; unexpected keys {name_keys(extra)}")
    bad = [f"{k}: file {given[k]} != model {expected[k]}" for k in sorted(expected) if given[k] != expected[k]]
    if bad:
        raise ValueError(f"{what}: shape mismatch for {name_keys(bad)}")


def name_keys(keys: list[str], limit: int = 20) -> str:
    if len(keys) <= limit:
        return repr(keys)
    return f"{keys[:limit]!r} and {len(keys) - limit} more"


def to_pil_rgba(rgba: torch.Tensor) -> list[Image.Image]:
    """[B, 4, H, W] in [0, 1] -> PIL RGBA images."""
    arr = (rgba.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGBA") for a in arr]


@torch.no_grad()
def decode_rgba(pipe, decoder: TransparentVAEDecoder, latents: torch.Tensor, augment: bool = True) -> list[Image.Image]:
    """Pipeline latents (as `output_type="latent"` returns them, i.e. scaled) -> RGBA images:
    the pipeline's own VAE decode first, then the transparent decoder on that decode and the
    unscaled latent (the published decoders were trained on exactly this pair)."""
    vae = pipe.vae
    z = latents
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:  # SDXL-style VAEs that publish latent statistics
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(z)
        z = z * std_t / vae.config.scaling_factor + mean_t
    else:
        z = z / vae.config.scaling_factor
    # fp16 SDXL VAEs overflow unless upcast, as the SDXL pipeline itself does for its decode.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        pixels = vae.decode(z.to(vae.device, dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return to_pil_rgba(decoder.decode(pixels, z, augment=augment))
