"""Tiny random-weight pipelines built entirely in code, for tests and the embedded demo.

The shapes follow the real models where it matters to the serving code (VAE downscale 8 for
SD 1.5 / SDXL, two text encoders for SDXL with the second one projecting, Stable Cascade's
16-channel stage C latents at 1/42.67 and stage B's 4-channel latents at 10.67x those), but
every width is cut down so a 512x512, 30-step image takes about a second on one CPU core.
Weights come from seeded torch init, as diffusers' own fast tests do, so the same seed always
builds the same model. Nothing is downloaded: the tokenizer is a small byte-level BPE whose
vocabulary holds all 256 byte symbols, so any prompt text tokenizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDPMWuerstchenScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel  # not exported at top level
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

MAX_TOKENS = 77  # CLIP's context length; the pipelines pad/truncate every prompt to it

# A few common prompt words become whole tokens; everything else falls back to byte symbols.
_WORDS = (
    "a an the of and in on with by at to photo portrait painting landscape city night day "
    "red blue green cat dog horse woman man tree house sky sun mountain river forest castle "
    "dragon flower astronaut riding high quality detailed art style"
).split()


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the ByteLevel pre-tokenizer's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges, lowest rank first, as the tokenizer will."""
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP-style byte-level BPE: 256 byte symbols, the same with the end-of-word marker,
    merges that make each of `_WORDS` one token, then the two special tokens last (as in CLIP's
    own vocabulary)."""
    symbols = _bytes_to_unicode()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        # Finish off whatever the merges so far leave of the word, left to right. New merges
        # rank after all earlier ones, so words done before keep their single token.
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)}, merges=list(ranks), model_max_length=MAX_TOKENS
    )


def _text_config(tok: CLIPTokenizer, hidden: int, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        projection_dim=projection or hidden,
        num_hidden_layers=5,  # enough layers for clip_skip 1..5 to mean something
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        # The real CLIP ids (not the legacy eos=2), so the pooled output is taken at the EOS token.
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module under its own seed without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


# The VAEs' latent scaling: chosen, as for the real models (0.18215 for SD 1.5), so that the
# scaled latents of images have about unit variance (these random VAEs' raw latents have a
# standard deviation near 0.2). With the real models' factors the tiny latents would be far
# smaller than the noise, and no img2img strength could stay near its source.
TINY_VAE_SCALING = 5.0


def _vae(seed: int, scaling_factor: float = TINY_VAE_SCALING) -> AutoencoderKL:
    # Four levels = three 2x resamplings = downscale 8, like the real SD VAE; 4-8 channels wide
    # (the full-resolution level dominates decoding time, so it gets the fewest).
    vae = _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=512,
            scaling_factor=scaling_factor,
            force_upcast=False,
            # A 4096-token self-attention at 64x64 latents would cost more than the whole UNet.
            mid_block_add_attention=False,
        ),
    )
    # A trained VAE's posterior is nearly deterministic (its log-variance very negative); a
    # random one's is not, and img2img's sample from it would bury the source in noise.
    with torch.no_grad():
        logvar = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[logvar] = 0.0  # the last layer before the posterior's split
        vae.quant_conv.bias[logvar] = -20.0
    return vae


def _sd_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    tok = build_tokenizer()
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(_text_config(tok, 32)))
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            # Cross-attention only in the mid block, at 1/4 scale (16x16 tokens for 512px): per
            # UNet call, module overhead rivals the arithmetic on a CPU, and 30 steps x 2 (cfg)
            # calls must stay well under a second. (The single-file layout of attention in
            # down/up blocks is tested on a fuller UNet in tests/unit/test_loaders.py.)
            down_block_types=("DownBlock2D",) * 3,
            up_block_types=("UpBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            cross_attention_dim=32,
            attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
        ),
    )
    scheduler = PNDMScheduler(**_sd_scheduler_config(), skip_prk_steps=True, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_sd15_inpainting(seed: int = 0) -> StableDiffusionPipeline:
    """Tiny SD 1.5 inpainting checkpoint: the same pipeline with a 9-channel UNet input (noisy
    latents, the mask, the masked source's latents), as the real inpainting checkpoints have."""
    pipe = build_tiny_sd15(seed)
    config = dict(pipe.unet.config, in_channels=9)
    pipe.unet = _seeded(seed + 5, lambda: UNet2DConditionModel.from_config(config))
    pipe.register_modules(unet=pipe.unet)
    return pipe


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    tok = build_tokenizer()
    # Different widths for the two encoders (like 768 / 1280 in SDXL): the single-file loader
    # tells the two CLIP models apart by the width of their position embeddings.
    te1, te2 = 32, 48
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(_text_config(tok, te1)))
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(_text_config(tok, te2)))
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D",) * 3,  # mid-block attention only, as for SD 1.5
            up_block_types=("UpBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=2,
            use_linear_projection=True,
            transformer_layers_per_block=1,
            cross_attention_dim=te1 + te2,  # SDXL concatenates both encoders' hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + te2,  # 6 size/crop ids + pooled text
        ),
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_sd_scheduler_config()),
        image_encoder=None,
        feature_extractor=None,
    )


def build_tiny_cascade(seed: int = 0) -> tuple[StableCascadePriorPipeline, StableCascadeDecoderPipeline]:
    tok = build_tokenizer()
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModelWithProjection(_text_config(tok, 32)))
    prior = _seeded(
        seed,
        lambda: StableCascadeUNet(  # stage C: 16-channel latents at 1/42.67 of the image size
            in_channels=16,
            out_channels=16,
            conditioning_dim=32,
            block_out_channels=(32, 32),
            num_attention_heads=(2, 2),
            down_num_layers_per_block=(1, 1),
            up_num_layers_per_block=(1, 1),
            down_blocks_repeat_mappers=(1, 1),
            up_blocks_repeat_mappers=(1, 1),
            clip_text_in_channels=32,
            clip_text_pooled_in_channels=32,
            clip_image_in_channels=32,
            switch_level=(False,),
            dropout=(0.0, 0.0),
        ),
    )
    decoder = _seeded(
        seed + 2,
        lambda: StableCascadeUNet(  # stage B: 4-channel latents, patch 4, conditioned on stage C
            in_channels=4,
            out_channels=4,
            patch_size=4,
            conditioning_dim=32,
            block_out_channels=(16, 16, 32, 32),
            num_attention_heads=(-1, -1, 2, 2),
            down_num_layers_per_block=(1, 1, 1, 1),
            up_num_layers_per_block=(1, 1, 1, 1),
            down_blocks_repeat_mappers=(1, 1, 1, 1),
            up_blocks_repeat_mappers=(1, 1, 1, 1),
            block_types_per_layer=(
                ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
                ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
            ),
            clip_text_pooled_in_channels=32,
            effnet_in_channels=16,
            pixel_mapper_in_channels=3,
            timestep_conditioning_type=("sca",),
            switch_level=None,
            dropout=(0.0, 0.0, 0.0, 0.0),
        ),
    )
    vqgan = _seeded(
        seed + 3, lambda: PaellaVQModel(embed_dim=16, bottleneck_blocks=1, num_vq_embeddings=64)
    )
    with torch.random.fork_rng(devices=[]):
        # Paella's residual blocks start as identities (zero gammas); give them a say.
        torch.manual_seed(seed + 4)
        for name, p in vqgan.named_parameters():
            if name.endswith("gammas"):
                p.data.normal_(0.0, 0.5)
    # Stage C's image prompt encoder (remix): a CLIP vision model with projection, like the
    # real prior's ViT-L/14 (projecting to clip_image_in_channels), and its processor (center
    # crop to the model's input size).
    image_encoder = _seeded(seed + 5, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, image_size=224, patch_size=32)))
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    prior_pipe = StableCascadePriorPipeline(
        prior=prior, text_encoder=text_encoder, tokenizer=tok, scheduler=DDPMWuerstchenScheduler(),
        image_encoder=image_encoder, feature_extractor=feature_extractor,
    )
    decoder_pipe = StableCascadeDecoderPipeline(
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tok,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
    )
    return prior_pipe, decoder_pipe


# WeightsSource.path for kind == "builtin" -> builder(seed) (returns one pipeline, or for
# Stable Cascade the (prior, decoder) pair).
BUILTIN: dict[str, Callable[..., object]] = {
    "tiny-sd15": build_tiny_sd15,
    "tiny-sd15-inpainting": build_tiny_sd15_inpainting,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-cascade": build_tiny_cascade,
}
