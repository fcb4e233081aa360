"""Layer Diffuse (`params.transparent`, models/layer_diffuse*.py) on the tiny SD 1.5 / SDXL
pipelines, through the real file path (safetensors written under the published names, loaded
back strictly), plus the full-size key layouts checked against lists derived from the published
files' layout.

Where the full-size layouts come from (the weights themselves cannot be downloaded here):
- Transparent decoder (`vae_transparent_decoder.safetensors`,
  `layer_sd15_vae_transparent_decoder.safetensors`): the reference loaders (lllyasviel's
  sd-forge-layerdiffuse, Apache-2.0, and the ComfyUI / diffusers ports) build "UNet1024" with
  `in_channels=3, out_channels=4`, widths 32, 32, 64, 128, 256, 512, 512, 2 layers per block,
  self-attention in the last three levels and the mid block, GroupNorm(4), head size 8, a 1x1
  `latent_conv_in` 4 -> 64, no time embedding, and load the files with `strict=True`; an
  independent Swift port (Draw Things) reads the same keys one by one by name. The horde facts
  give ~104 M parameters.
- SD 1.5 attention (`layer_sd15_transparent_attn.safetensors`): the reference loader builds 32
  attention-sharing units (frames=1, no control) as `hookers.layers.{i}` over the attentions in
  the order input_blocks 1,2,4,5,7,8 / output_blocks 3-11 / middle_block (attn1, attn2) and loads
  the file with `strict=True`; each unit has rank-256 `to_{q,k,v,out}_lora.0.{down,up}.weight`
  and `temporal_{i,q,k,v,o}` Linears + a `temporal_n` LayerNorm at the attention's width.
- SDXL conv (`layer_xl_transparent_conv.safetensors`): `diffusion_model.<LDM key>::diff::0`
  offsets for "all layers that are not q,k,v of any attention layers" (release notes); the
  example key conversions below are those a published converter of these files checks.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from models.layer_diffuse import (
    SD15,
    SDXL,
    SD15AttentionInjection,
    SDXLConvInjection,
    build_tiny_transparent,
    generate_transparent,
    load_layer_diffuse,
    save_layer_diffuse,
    sd15_attention_layout,
    sd15_attention_targets,
    sdxl_conv_layout,
)
from models.layer_diffuse_decoder import FULL, TransparentVAEDecoder, count_parameters
from models.tiny import build_tiny_sd15, build_tiny_sdxl

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

BUILDERS = {SD15: build_tiny_sd15, SDXL: build_tiny_sdxl}
KW = dict(prompt="a red cat", num_inference_steps=3, width=128, height=128)


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    pipe = BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=[SD15, SDXL])
def family(request):
    return request.param


@pytest.fixture
def files_on_disk(family, tmp_path):
    pipe = tiny(family)
    injection, decoder = build_tiny_transparent(family, pipe.unet, seed=0)
    return save_layer_diffuse(tmp_path, family, injection, decoder)


def seeded(**kw):
    return {**KW, **kw, "generator": torch.Generator().manual_seed(7)}


# ---- the tiny pipelines end to end ---------------------------------------------------------


def test_transparent_images_are_rgba_with_a_real_alpha(family, files_on_disk):
    pipe = tiny(family)
    files = load_layer_diffuse(*files_on_disk, family, pipe.unet)
    images = generate_transparent(pipe, family, files, **seeded(num_images_per_prompt=2))
    assert len(images) == 2
    for image in images:
        assert image.mode == "RGBA" and image.size == (128, 128)
        alpha = np.asarray(image)[..., 3]
        assert alpha.min() < alpha.max(), "alpha channel is constant"
    # The single-pass decode (no test-time augmentation) is RGBA too.
    one = generate_transparent(pipe, family, files, augment=False, **seeded())
    assert one[0].mode == "RGBA" and np.ptp(np.asarray(one[0])[..., 3]) > 0


def test_every_key_of_the_file_is_used(family, files_on_disk):
    pipe = tiny(family)
    files = load_layer_diffuse(*files_on_disk, family, pipe.unet)
    assert files.injection.consumed_keys == set(load_file(str(files_on_disk[0])))
    assert not files.injection.active


def test_injection_changes_the_unet_and_removal_restores_it_exactly(family, files_on_disk):
    pipe = tiny(family)
    files = load_layer_diffuse(*files_on_disk, family, pipe.unet)
    plain = pipe(**seeded(), output_type="latent").images
    plain_img = pipe(**seeded(), output_type="np").images
    with files.injection:
        injected = pipe(**seeded(), output_type="latent").images
    assert (injected - plain).abs().max() > 1e-3
    assert torch.equal(pipe(**seeded(), output_type="latent").images, plain)
    # A transparent job in between leaves the shared pipeline as it was, weights included.
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    generate_transparent(pipe, family, files, augment=False, **seeded())
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    assert np.array_equal(pipe(**seeded(), output_type="np").images, plain_img)


def test_sizes_must_be_multiples_of_64(family, files_on_disk):
    pipe = tiny(family)
    files = load_layer_diffuse(*files_on_disk, family, pipe.unet)
    with pytest.raises(ValueError, match="width=96 height=128"):
        generate_transparent(pipe, family, files, **{**KW, "width": 96})
    assert not files.injection.active


# ---- strict loading ------------------------------------------------------------------------


def _rewrite(path, change):
    sd = load_file(str(path))
    change(sd)
    save_file(sd, str(path))


EXTRA = {SD15: "hookers.layers.30.to_q_lora.0.mid.weight", SDXL: "diffusion_model.input_blocks.9.0.weight::diff::0"}
# Keys of layers the published files never touch or this UNet lacks: refused as unexpected too.
FOREIGN = {
    SD15: "hookers.layers.0.temporal_o.bias",  # unit 0 sits in input_blocks.1, absent from the tiny UNet
    SDXL: "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight::diff::0",  # q/k/v
}


@pytest.mark.parametrize("kind", ["extra", "foreign"])
def test_unexpected_injection_key_is_refused_by_name(family, files_on_disk, kind):
    key = (EXTRA if kind == "extra" else FOREIGN)[family]
    _rewrite(files_on_disk[0], lambda sd: sd.__setitem__(key, torch.zeros(4)))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        load_layer_diffuse(*files_on_disk, family, tiny(family).unet)


def test_missing_injection_key_is_refused_by_name(family, files_on_disk):
    key = sorted(load_file(str(files_on_disk[0])))[-1]
    _rewrite(files_on_disk[0], lambda sd: sd.pop(key))
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        load_layer_diffuse(*files_on_disk, family, tiny(family).unet)


def test_misshapen_injection_key_is_refused_by_name(family, files_on_disk):
    key = sorted(load_file(str(files_on_disk[0])))[0]
    _rewrite(files_on_disk[0], lambda sd: sd.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_layer_diffuse(*files_on_disk, family, tiny(family).unet)


def test_decoder_file_is_loaded_strictly(files_on_disk, family):
    unet = tiny(family).unet
    _rewrite(files_on_disk[1], lambda sd: sd.pop("down_blocks.5.attentions.1.to_out.0.bias"))
    with pytest.raises(KeyError, match=r"down_blocks\.5\.attentions\.1\.to_out\.0\.bias"):
        load_layer_diffuse(*files_on_disk, family, unet)
    _rewrite(files_on_disk[1], lambda sd: sd.__setitem__("down_blocks.5.attentions.1.to_out.0.bias", torch.zeros(16)))
    _rewrite(files_on_disk[1], lambda sd: sd.__setitem__("mid_block.extra.weight", torch.zeros(1)))
    with pytest.raises(KeyError, match=r"mid_block\.extra\.weight"):
        load_layer_diffuse(*files_on_disk, family, unet)


# ---- full-size layouts ---------------------------------------------------------------------


def published_decoder_layout() -> dict[str, tuple[int, ...]]:
    """(key -> shape) of the published transparent decoder, written out from the layout rules in
    the module docstring (not from our module): diffusers-style resnets (norm1, conv1, norm2,
    conv2, a 1x1 conv_shortcut when the width changes), attentions (group_norm, to_q, to_k,
    to_v, to_out.0 Linears with bias), conv down/upsamplers; up level i has 3 resnets whose
    inputs concatenate the skip features of the mirrored down level."""
    w = (32, 32, 64, 128, 256, 512, 512)
    n = len(w)
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, 1)

    def attention(name, c):
        norm(f"{name}.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            out[f"{name}.{proj}.weight"], out[f"{name}.{proj}.bias"] = (c, c), (c,)

    conv("conv_in", w[0], 3, 3)
    conv("latent_conv_in", w[2], 4, 1)
    skips = [w[0]]
    for i in range(n):
        cin = w[i - 1] if i else w[0]
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else w[i], w[i])
            if i >= n - 3:
                attention(f"down_blocks.{i}.attentions.{j}", w[i])
            skips.append(w[i])
        if i < n - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", w[i], w[i], 3)
            skips.append(w[i])
    resnet("mid_block.resnets.0", w[-1], w[-1])
    attention("mid_block.attentions.0", w[-1])
    resnet("mid_block.resnets.1", w[-1], w[-1])
    prev = w[-1]
    for i, c in enumerate(reversed(w)):
        for j in range(3):
            resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else c) + skips.pop(), c)
            if i < 3:
                attention(f"up_blocks.{i}.attentions.{j}", c)
        if i < n - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        prev = c
    norm("conv_norm_out", w[0])
    conv("conv_out", 4, w[0], 3)
    return out


def test_full_size_decoder_matches_the_published_layout():
    with torch.device("meta"):
        decoder = TransparentVAEDecoder(FULL)
    ours = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    published = published_decoder_layout()
    assert sorted(set(ours) ^ set(published)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}
    assert len(ours) == 538
    n = count_parameters(decoder)
    assert n == sum(int(np.prod(s)) for s in published.values()) == 104_104_804  # "~104 M"


def _sd15_unet_on_meta() -> UNet2DConditionModel:
    with torch.device("meta"):  # diffusers' defaults are SD 1.5's but for the 768-wide text
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)


def test_full_size_sd15_attention_layout():
    unet = _sd15_unet_on_meta()
    widths = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 6 + [640] * 6 + [320] * 6 + [1280] * 2
    published = {}
    for i, c in enumerate(widths):
        ctx = c if i % 2 == 0 else 768  # attn1 is self-attention, attn2 reads the text
        for proj, cin in (("to_q", c), ("to_k", ctx), ("to_v", ctx), ("to_out", c)):
            published[f"hookers.layers.{i}.{proj}_lora.0.down.weight"] = (256, cin)
            published[f"hookers.layers.{i}.{proj}_lora.0.up.weight"] = (c, 256)
        for lin in ("i", "q", "k", "v", "o"):
            published[f"hookers.layers.{i}.temporal_{lin}.weight"] = (c, c)
            published[f"hookers.layers.{i}.temporal_{lin}.bias"] = (c,)
        published[f"hookers.layers.{i}.temporal_n.weight"] = (c,)
        published[f"hookers.layers.{i}.temporal_n.bias"] = (c,)
    assert sd15_attention_layout(unet) == published
    assert len(published) == 640
    targets = sd15_attention_targets(unet)
    assert targets[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert targets[12] == "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert targets[31] == "mid_block.attentions.0.transformer_blocks.0.attn2"


def test_full_size_sdxl_conv_layout():
    with torch.device("meta"):
        unet = UNet2DConditionModel(  # SDXL base's UNet config
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    required, optional = sdxl_conv_layout(unet)
    assert required["diffusion_model.input_blocks.0.0.weight::diff::0"] == "conv_in.weight"
    assert required["diffusion_model.input_blocks.3.0.op.bias::diff::0"] == "down_blocks.0.downsamplers.0.conv.bias"
    assert required["diffusion_model.middle_block.2.out_layers.3.weight::diff::0"] == "mid_block.resnets.1.conv2.weight"
    assert required["diffusion_model.output_blocks.2.2.conv.weight::diff::0"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert required["diffusion_model.out.2.bias::diff::0"] == "conv_out.bias"
    attn = "diffusion_model.input_blocks.4.1.transformer_blocks.1"
    assert f"{attn}.attn2.to_out.0.weight::diff::0" in required and f"{attn}.ff.net.2.bias::diff::0" in required
    assert not [k for k in required if any(f".{p}.weight::" in k for p in ("to_q", "to_k", "to_v"))]
    assert set(optional.values()) == {n for n, _ in unet.named_parameters() if n.startswith(("time_embedding", "add_embedding"))}
    n_qkv = sum(1 for n, _ in unet.named_parameters() if n.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight")))
    assert len(required) + len(optional) + n_qkv == len(list(unet.parameters()))


# ---- direct API ----------------------------------------------------------------------------


def test_injections_are_reentrant_safe_and_removable_twice(family):
    pipe = tiny(family)
    sd, _ = build_tiny_transparent(family, pipe.unet, seed=1)
    cls = SD15AttentionInjection if family == SD15 else SDXLConvInjection
    inj = cls(pipe.unet, sd)
    with inj:
        with pytest.raises(RuntimeError, match="already applied"):
            inj.apply()
    inj.remove()  # no-op when not applied
    assert not inj.active
