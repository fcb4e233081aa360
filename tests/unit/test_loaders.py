"""models/loaders.py through the real loading paths: the tiny models are written to disk
(save_pretrained, and original-format single files by models/ldm_export.py) and loaded back
by from_pretrained / from_single_file, which must give the very same images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deployments.diffusion.deployment import CascadeGenerator
from deployments.diffusion.deployment import SD15Generator
from deployments.diffusion.deployment import SDXLGenerator
from models import ldm_export
from models.catalog import ModelEntry
from models.loaders import load_pipeline, torch_dtype
from models.tiny import build_tiny_cascade, build_tiny_sd15, build_tiny_sdxl

# diffusers' schedulers trip numpy 2's __array__/__array_wrap__ deprecations on every step.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

GENERATORS = {"stable_diffusion_1": SD15Generator, "stable_diffusion_xl": SDXLGenerator,
              "stable_cascade": CascadeGenerator}
JOB = dict(prompt="a photo of a cat", negative_prompt="ugly", width=128, height=128, steps=3, cfg_scale=6.0,
           sampler_name="k_euler", karras=False, clip_skip=2, seeds=[5, 6])


def entry(family: str, **weights) -> ModelEntry:
    return ModelEntry.model_validate({"name": "m", "family": family, "weights": weights})


def images(family: str, pipes) -> list[np.ndarray]:
    gen = GENERATORS[family]([], device="cpu")
    return [np.asarray(im) for im in gen.generate(pipes, {"model": "m", **JOB})]


def assert_same_images(family: str, original, loaded):
    """Same weights (checked apart, exactly) must give the same image. A freshly loaded module
    can lay its tensors out differently in memory, which may change the order of float
    additions in a kernel and so move a pixel by one level after rounding to 8 bits; anything
    more than that is a real difference."""
    for a, b in zip(images(family, original), images(family, loaded), strict=True):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def config_only_copy(src: Path, dst: Path, drop: tuple[str, ...] = ("*.safetensors", "*.bin")) -> Path:
    """The diffusers folder without its weights: whatever the pipeline then holds can only
    have come from the single file (diffusers would otherwise quietly take the folder's)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    sd15, sdxl, (prior, decoder) = build_tiny_sd15(), build_tiny_sdxl(), build_tiny_cascade()
    sd15.save_pretrained(root / "sd15")
    sdxl.save_pretrained(root / "sdxl")
    prior.save_pretrained(root / "cascade" / "prior")
    decoder.save_pretrained(root / "cascade" / "decoder")
    return {"root": root, "sd15": sd15, "sdxl": sdxl, "cascade": (prior, decoder)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family, name", [("stable_diffusion_1", "tiny-sd15"),
                                          ("stable_diffusion_xl", "tiny-sdxl"),
                                          ("stable_cascade", "tiny-cascade")])
def test_builtin(family, name):
    pipes = load_pipeline(entry(family, kind="builtin", path=name))
    assert isinstance(pipes, tuple) == (family == "stable_cascade")
    with pytest.raises(ValueError, match="not a"):
        other = "tiny-sdxl" if name == "tiny-sd15" else "tiny-sd15"
        load_pipeline(entry(family, kind="builtin", path=other))
    with pytest.raises(ValueError, match="no builtin"):
        load_pipeline(entry("stable_diffusion_1", kind="builtin", path="tiny-nothing"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family, key", [("stable_diffusion_1", "sd15"), ("stable_diffusion_xl", "sdxl")])
def test_pretrained_round_trip(saved, family, key):
    loaded = load_pipeline(entry(family, kind="pretrained", path=str(saved["root"] / key)))
    assert type(loaded) is type(saved[key])
    for name in ("unet", "vae", "text_encoder"):
        assert weights_equal(getattr(saved[key], name), getattr(loaded, name)), name
    assert_same_images(family, saved[key], loaded)


@pytest.mark.timeout(120)
def test_pretrained_round_trip_cascade(saved):
    root = saved["root"] / "cascade"
    loaded = load_pipeline(entry("stable_cascade", kind="pretrained", path=str(root / "prior"),
                                 decoder_path=str(root / "decoder")))
    prior, decoder = saved["cascade"]
    assert weights_equal(prior.prior, loaded[0].prior) and weights_equal(decoder.decoder, loaded[1].decoder)
    assert weights_equal(decoder.vqgan, loaded[1].vqgan)
    assert_same_images("stable_cascade", saved["cascade"], loaded)


@pytest.mark.timeout(120)
def test_single_file_sd15(saved, tmp_path):
    ckpt = ldm_export.export_sd15(saved["sd15"], tmp_path / "tiny-sd15.safetensors")
    keys = load_file(str(ckpt)).keys()
    # The original-format names real SD 1.x checkpoints have (and diffusers detects them by).
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
            "first_stage_model.decoder.up.0.block.0.norm1.weight",
            "first_stage_model.encoder.mid.block_1.conv1.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"} <= set(keys)
    assert not any("down_blocks" in k or "resnets" in k for k in keys)
    config = config_only_copy(saved["root"] / "sd15", tmp_path / "config")
    loaded = load_pipeline(entry("stable_diffusion_1", kind="single_file", path=str(ckpt), config=str(config)))
    for name in ("unet", "vae", "text_encoder"):
        assert weights_equal(getattr(saved["sd15"], name), getattr(loaded, name)), name
    assert_same_images("stable_diffusion_1", saved["sd15"], loaded)


@pytest.mark.timeout(120)
def test_single_file_sdxl(saved, tmp_path):
    ckpt = ldm_export.export_sdxl(saved["sdxl"], tmp_path / "tiny-sdxl.safetensors")
    keys = load_file(str(ckpt)).keys()
    assert {"model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"} <= set(keys)
    config = config_only_copy(saved["root"] / "sdxl", tmp_path / "config")
    loaded = load_pipeline(entry("stable_diffusion_xl", kind="single_file", path=str(ckpt), config=str(config)))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert weights_equal(getattr(saved["sdxl"], name), getattr(loaded, name)), name
    assert_same_images("stable_diffusion_xl", saved["sdxl"], loaded)


@pytest.mark.timeout(120)
def test_single_file_cascade(saved, tmp_path):
    prior, decoder = saved["cascade"]
    stage_c = ldm_export.export_cascade_stage(prior.prior, tmp_path / "stage_c.safetensors")
    stage_b = ldm_export.export_cascade_stage(decoder.decoder, tmp_path / "stage_b.safetensors")
    assert "clip_txt_mapper.weight" in load_file(str(stage_c))
    b_keys = load_file(str(stage_b)).keys()
    assert "clip_mapper.weight" in b_keys and not any(".to_q." in k for k in b_keys)
    # Stage files hold only the UNets: the rest comes from the config folders, minus the UNets.
    config = tmp_path / "config"
    config_only_copy(saved["root"] / "cascade", config, drop=())
    for stage in ("prior", "decoder"):
        for f in (config / stage / stage).glob("*.safetensors"):
            f.unlink()
    loaded = load_pipeline(entry("stable_cascade", kind="single_file", path=str(stage_c),
                                 decoder_path=str(stage_b), config=str(config)))
    assert weights_equal(prior.prior, loaded[0].prior) and weights_equal(decoder.decoder, loaded[1].decoder)
    assert_same_images("stable_cascade", saved["cascade"], loaded)
    with pytest.raises(ValueError, match="prior/ and decoder/"):
        load_pipeline(entry("stable_cascade", kind="single_file", path=str(stage_c),
                            decoder_path=str(stage_b), config=str(tmp_path)))


@pytest.mark.timeout(30)
def test_dtypes():
    w = entry("stable_diffusion_1", kind="pretrained", path="x", dtype="float16").weights
    assert torch_dtype(w, "cpu") is torch.float32  # no fast half kernels on CPUs
    assert torch_dtype(w, "cuda") is torch.float16
    w = entry("stable_diffusion_1", kind="pretrained", path="x", dtype="bfloat16").weights
    assert torch_dtype(w, "cpu") is torch.bfloat16


@pytest.mark.timeout(60)
def test_single_file_vae_with_mid_attention(tmp_path):
    # The tiny VAEs leave out the mid-block attention (for speed); its 1x1-conv layout in the
    # original format is checked here on a small VAE that has it.
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4).eval()
    vae.save_pretrained(tmp_path / "vae")
    sd = {"first_stage_model." + k: v for k, v in ldm_export.vae_to_ldm(vae.state_dict(), vae.config).items()}
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    path = tmp_path / "vae.safetensors"
    ldm_export.save_checkpoint(sd, path)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    loaded = AutoencoderKL.from_single_file(str(path), config=str(tmp_path), subfolder="vae")
    assert weights_equal(vae, loaded)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("xl", [False, True], ids=["sd15-layout", "sdxl-layout"])
def test_single_file_unet_with_attention_everywhere(tmp_path, xl):
    # The tiny pipelines keep attention to the mid block (for speed). The LDM numbering of
    # attention in down/up blocks (and of the upsampler behind it, at slot 2) is checked here on
    # a small UNet laid out like the real ones: 2 layers per block, attention in all but one level.
    from diffusers import UNet2DConditionModel

    kw = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56,
              use_linear_projection=True, transformer_layers_per_block=(1, 2, 2)) if xl else {}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") if xl else
        ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D") if xl else
        ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, **kw).eval()
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    sd = {"model.diffusion_model." + k: v for k, v in ldm_export.unet_to_ldm(unet.state_dict(), unet.config).items()}
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd  # upsampler after an attention
    path = ldm_export.save_checkpoint(sd, tmp_path / "unet.safetensors")
    loaded = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path), subfolder="unet")
    assert weights_equal(unet, loaded)
