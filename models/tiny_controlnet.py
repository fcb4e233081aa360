"""Tiny random-weight ControlNets for the tiny pipelines of `models/tiny.py`.

A ControlNet is built the way real ones start training: `ControlNetModel.from_unet` copies the
base UNet's encoder (conv_in, time and, for SDXL, the text/time add-embedding, down and mid
blocks), so its config matches the UNet it steers, and adds the new parts: the conditioning
embedding (control image -> latent-sized features) and one 1x1 "zero convolution" per residual.
Those zero convolutions start at exactly zero in real training, which would make an untrained
ControlNet do nothing at any strength; here they get small seeded random values instead (and
the conditioning embedding a variance-preserving init), so that the control image and the
ControlNet's strength visibly change a tiny model's image.

The conditioning embedding is narrower than the real models' (16, 32, 96, 256): it runs at the
full image resolution on every step, and on one CPU core the real widths would cost more than
the tiny UNet itself. It keeps their four levels (three 2x downsamplings: image -> latent size).

`BUILTIN_CONTROLNETS` maps the catalog's builtin ControlNet names to builders taking the base
pipeline's UNet; each name has its own seed, so the same name always builds the same tensors
for the same UNet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

COND_EMBEDDING_CHANNELS = (8, 16, 16, 16)
ZERO_CONV_STD = 0.2  # the zero convolutions' weights (biases stay 0)
COND_OUT_GAIN = 2.0  # the conditioning embedding's last conv (zero-initialised in training)


def _is_sdxl(unet: UNet2DConditionModel) -> bool:
    return unet.config.addition_embed_type == "text_time"


def build_tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0,
                          family: str | None = None) -> ControlNetModel:
    """A ControlNet for `unet` with seeded random weights in its new parts (the copied encoder
    weights are the UNet's, as `from_unet` makes them). `family` ("sd15" / "sdxl"), when
    given, must match the UNet: a ControlNet of one family cannot steer the other's UNet."""
    if family is not None and family != ("sdxl" if _is_sdxl(unet) else "sd15"):
        raise ValueError(f"a {family} ControlNet needs a {family} UNet "
                         f"(this UNet's addition_embed_type is {unet.config.addition_embed_type!r})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # from_unet's default init of the new layers draws from here
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_EMBEDDING_CHANNELS)
    g = torch.Generator("cpu").manual_seed(seed + 1)

    def init(conv: torch.nn.Conv2d, std: float) -> None:
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)

    with torch.no_grad():
        # The conditioning embedding: He init (variance-preserving through its SiLUs), where
        # torch's default init would shrink the control image ~3x per layer to nothing; its
        # last conv so that the embedding is about as large as the latents' conv_in features
        # it is added to. Then the image, not just the ControlNet's presence, matters.
        emb = cn.controlnet_cond_embedding
        for conv in (emb.conv_in, *emb.blocks):
            init(conv, (2.0 / conv.weight[0].numel()) ** 0.5)
        init(emb.conv_out, COND_OUT_GAIN / emb.conv_out.weight[0].numel() ** 0.5)
        for conv in (*cn.controlnet_down_blocks, cn.controlnet_mid_block):
            init(conv, ZERO_CONV_STD)
    if cn.dtype != unet.dtype or cn.device != unet.device:
        cn.to(dtype=unet.dtype, device=unet.device)
    return cn.eval()


def _builder(seed: int, family: str) -> Callable[[UNet2DConditionModel], ControlNetModel]:
    return functools.partial(build_tiny_controlnet, seed=seed, family=family)


# WeightsSource.path for a builtin ControlNet -> builder(base pipeline's unet).
BUILTIN_CONTROLNETS: dict[str, Callable[[UNet2DConditionModel], ControlNetModel]] = {
    "tiny-controlnet-sd15": _builder(100, "sd15"),
    "tiny-controlnet-sdxl": _builder(200, "sdxl"),
    "tiny-qr-monster-sd15": _builder(300, "sd15"),
    "tiny-qr-monster-sdxl": _builder(400, "sdxl"),
}
