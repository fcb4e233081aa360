"""The qr_code workflow's diffusion (deployments/diffusion/qr.py) on the tiny SD 1.5 and SDXL
pipelines with tiny ControlNets (models/tiny_controlnet.py): the split passes, the three
ControlNet applications, seeds, the scheduler loop's split points, and that every result
decodes to the requested text once models/qr.blend_until_scans has had its say."""

from __future__ import annotations

import dataclasses
import functools
import types

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from deployments.diffusion import qr as qrd
from deployments.diffusion import sd15, sdxl
from deployments.diffusion.qr import ensure_scans, qr_generate, split_steps
from deployments.jobs import ImageJob, JobRejected
from models.qr import QrLayers, QrRequest, decode, render_layers, scans
from models.samplers import SAMPLER_NAMES
from models.tiny import build_tiny_sd15, build_tiny_sdxl
from models.tiny_controlnet import BUILTIN_CONTROLNETS, build_tiny_controlnet

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

CONTENT = "https://aihorde.net"  # version 3 at error correction H: 29 modules
PROMPT, FUNCTION_PROMPT = "a castle on a mountain", "a maze"
FAMILIES = {"sd15": (sd15, build_tiny_sd15), "sdxl": (sdxl, build_tiny_sdxl)}


@functools.lru_cache(maxsize=None)
def model(family: str) -> tuple[types.ModuleType, object, ControlNetModel]:
    module, build = FAMILIES[family]
    pipe = build(0)
    pipe.set_progress_bar_config(disable=True)
    return module, pipe, BUILTIN_CONTROLNETS[f"tiny-qr-monster-{family}"](pipe.unet)


@functools.lru_cache(maxsize=None)
def layers(size: int) -> QrLayers:
    """The code's layers at `size`. At the engine's 16 px per module even a version 1 code
    (21 modules, 336 px) is larger than 256 px, so for 256 the 512 render is halved (8 px per
    module): the layers keep their geometry, only smaller."""
    req = QrRequest(content=CONTENT)
    if size >= 512:
        return render_layers(req, size, size)
    full, k = render_layers(req, 512, 512), 512 // size
    near = lambda im: im.resize((size, size), Image.Resampling.NEAREST)  # noqa: E731
    return dataclasses.replace(
        full, code=near(full.code), modules=near(full.modules), finders=near(full.finders),
        finder_mask=full.finder_mask.resize((size, size), Image.Resampling.BOX),
        box=tuple(v // k for v in full.box),
        finder_boxes=tuple(tuple(v // k for v in b) for b in full.finder_boxes))


def job(size: int, seeds=(7,), steps: int = 14, **kw) -> ImageJob:
    return ImageJob(model="tiny", prompt=PROMPT, seeds=seeds, width=size, height=size, steps=steps,
                    cfg_scale=kw.pop("cfg_scale", 7.0), sampler_name=kw.pop("sampler_name", "k_euler"),
                    **kw)


def generate(family: str, j: ImageJob, lay: QrLayers | None = None, **scales) -> list[np.ndarray]:
    module, pipe, cn = model(family)
    ims = qr_generate(module, pipe, cn, j, lay or layers(j.width), FUNCTION_PROMPT, PROMPT, "", **scales)
    assert len(ims) == len(j.seeds) and all(im.size == (j.width, j.height) and im.mode == "RGB" for im in ims)
    return [np.asarray(im, dtype=np.float32) for im in ims]


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# -- the tiny ControlNets --------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_controlnet_matches_its_unet(family):
    _, pipe, cn = model(family)
    unet = pipe.unet
    for key in ("in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                "cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "use_linear_projection"):
        assert cn.config[key] == unet.config[key], key
    if family == "sdxl":  # the text/time add-embedding carries over, weights included
        assert cn.config.addition_embed_type == "text_time" and cn.config.addition_time_embed_dim == 8
        assert cn.config.projection_class_embeddings_input_dim == 96
        assert torch.equal(cn.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)
    else:
        assert cn.config.addition_embed_type is None
    assert torch.equal(cn.conv_in.weight, unet.conv_in.weight)  # from_unet copies the encoder
    # the zero convolutions are no longer zero
    for conv in (*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out):
        assert conv.weight.abs().min() >= 0 and conv.weight.abs().mean() > 1e-3
    # seeded: the same name builds the same tensors, another name others
    again = BUILTIN_CONTROLNETS[f"tiny-qr-monster-{family}"](unet).state_dict()
    other = BUILTIN_CONTROLNETS[f"tiny-controlnet-{family}"](unet).state_dict()
    sd = cn.state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["controlnet_mid_block.weight"], other["controlnet_mid_block.weight"])
    # a ControlNet of the other family is refused
    wrong = "sd15" if family == "sdxl" else "sdxl"
    with pytest.raises(ValueError, match="UNet"):
        BUILTIN_CONTROLNETS[f"tiny-qr-monster-{wrong}"](unet)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_controlnet_survives_save_pretrained_and_from_pretrained(family, tmp_path):
    _, pipe, _ = model(family)
    cn = build_tiny_controlnet(pipe.unet, seed=11)
    cn.save_pretrained(tmp_path / "cn")
    loaded = ControlNetModel.from_pretrained(tmp_path / "cn")
    a, b = cn.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    plain = lambda c: {k: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON has no tuples
                       for k, v in c.items() if not k.startswith("_")}
    assert plain(loaded.config) == plain(cn.config)


# -- the split -------------------------------------------------------------------------------

def test_split_steps():
    assert split_steps(30) == (1, 11) and split_steps(12) == (1, 11) and split_steps(500) == (1, 11)
    # at 11 steps or fewer: 11/30 of the schedule, at least one step for each pass where possible
    assert [split_steps(s) for s in (11, 8, 6, 4, 3, 2, 1)] == \
        [(1, 4), (1, 3), (1, 2), (0, 1), (0, 1), (0, 1), (0, 1)]
    for s in range(2, 12):
        f, k = split_steps(s)
        assert 0 <= f < k < s
    with pytest.raises(ValueError):
        split_steps(0)


@pytest.mark.parametrize("sampler", ["k_euler", "k_heun", "k_dpm_2", "DDIM"])
def test_a_pass_split_and_resumed_equals_one_pass(sampler):
    """The loop's step k is the same point of the schedule whichever pass reaches it: for
    deterministic one-step samplers (and Heun / DPM2, whose steps are two model calls),
    [0, k) then [k, S) from the leftover latents is exactly [0, S). The noise added at a later
    start is the schedule's noise level there."""
    module, pipe, cn = model("sd15")
    j = job(128, seeds=(3,), steps=12, sampler_name=sampler)
    cond = qrd.encode(module, pipe, j, PROMPT, "", 1, True, (128, 128))
    control = qrd.control_tensor(layers(256).code.resize((128, 128)), "cpu", torch.float32)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(1)]
    whole = qrd.denoise(pipe, cn, j, 0, 12, cond, control, 1.5, gens, noise=noise)
    half = qrd.denoise(pipe, cn, j, 0, 5, cond, control, 1.5, gens, noise=noise)
    rest = qrd.denoise(pipe, cn, j, 5, 12, cond, control, 1.5, gens, latents=half)
    assert torch.allclose(whole, rest, atol=1e-4), (whole - rest).abs().max()
    assert (half - whole).abs().mean() > 0.1  # the stop at step 5 did keep its leftover noise
    # an empty latent noised for a start at step 5 has the noise level of step 5
    sched = qrd.make_scheduler(sampler, True, qrd.base_scheduler_config(pipe))
    sched.set_timesteps(12)
    zero_steps = qrd.denoise(pipe, cn, j, 5, 5, cond, control, 1.5, gens, noise=noise)
    if hasattr(sched, "sigmas"):
        assert torch.allclose(zero_steps, noise * sched.sigmas[5 * sched.order], rtol=1e-5)
    else:  # DDIM: sqrt(1 - alpha_bar) at step 5's timestep
        abar = sched.alphas_cumprod[sched.timesteps[5]]
        assert torch.allclose(zero_steps, noise * (1 - abar) ** 0.5, rtol=1e-5)


# -- qr_generate -----------------------------------------------------------------------------

CASES = [("sd15", 256), ("sdxl", 256), ("sd15", 512)]


@pytest.mark.parametrize("family,size", CASES)
def test_qr_generate_seeds_passes_and_scanning(family, size):
    j = job(size, seeds=(7, 8), steps=16 if size == 256 else 12)
    a7, a8 = generate(family, j)
    # one image per seed: seed 7 alone gives image 0 of the batch; seed 8 another image
    (b7,) = generate(family, job(size, seeds=(7,), steps=j.steps))
    assert diff(a7, b7) < 0.5
    assert diff(a7, a8) > 10
    # the finder pass's ControlNet (strength 6) changes the result, and mostly where the
    # finder mask pastes the finder latent
    (n7,) = generate(family, job(size, seeds=(7,), steps=j.steps), finders_scale=0)
    d = np.abs(a7 - n7).mean(-1)
    assert d.mean() > 1.0
    lay = layers(size)
    inside = np.asarray(lay.finder_mask) > 128
    assert d[inside].mean() > 3 * d[~inside].mean(), (d[inside].mean(), d[~inside].mean())
    # the ControlNet at all (three applications at 0) changes the result everywhere
    (z7,) = generate(family, job(size, seeds=(7,), steps=j.steps), modules_scale=0, finders_scale=0,
                     code_scale=0)
    assert diff(a7, z7) > 5
    # and every result, blended as needed, decodes to the requested text
    images = [Image.fromarray(a.astype(np.uint8)) for a in (a7, a8)]
    for im, (out, strength) in zip(images, ensure_scans(images, lay, CONTENT)):
        assert decode(out) == [CONTENT]
        assert (strength == 0) == scans(im, CONTENT)
        assert 0 <= strength <= 1 and out.size == im.size


def test_the_control_images_matter():
    """Not only the ControlNet's presence: other layers give another image. The whole-code
    layer alone matters too, once the final pass has steps to act (30 steps: 19 of them)."""
    lay = layers(256)
    other = render_layers(QrRequest(content="another text entirely"), 512, 512)
    near = {k: getattr(other, k).resize((256, 256), Image.Resampling.NEAREST)
            for k in ("code", "modules", "finders", "finder_mask")}
    (a,) = generate("sd15", job(256, seeds=(5,), steps=14))
    (b,) = generate("sd15", job(256, seeds=(5,), steps=14), dataclasses.replace(lay, **near))
    assert diff(a, b) > 1.0
    (a,) = generate("sd15", job(256, seeds=(5,), steps=30))
    (b,) = generate("sd15", job(256, seeds=(5,), steps=30), dataclasses.replace(lay, code=near["code"]))
    # small on the tiny models (the final pass starts at a low noise level; 0.1 measured) but
    # not rounding: the same inputs give bit-identical images
    assert diff(a, b) > 0.05


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs_the_split_passes(sampler):
    j = job(128, seeds=(1, 2), steps=14, sampler_name=sampler)
    lay = layers(256)
    small = dataclasses.replace(lay, **{k: getattr(lay, k).resize((128, 128)) for k in
                                        ("code", "modules", "finders", "finder_mask")})
    a, b = generate("sd15", j, small)
    assert np.isfinite(a).all() and a.std() > 5 and diff(a, b) > 5
    (a1,) = generate("sd15", job(128, seeds=(1,), steps=14, sampler_name=sampler), small)
    assert diff(a, a1) < 0.5  # ancestral and SDE samplers too: their noise is per seed


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_few_steps(steps):
    (a,) = generate("sdxl", job(256, steps=steps))
    assert np.isfinite(a).all()


def test_no_guidance_and_clip_skip():
    for kw in ({"cfg_scale": 1.0}, {"clip_skip": 2}):
        (a,) = generate("sd15", job(256, steps=6, **kw))
        (b,) = generate("sdxl", job(256, steps=6, **kw))
        assert a.std() > 5 and b.std() > 5


def test_refusals():
    module, pipe, cn = model("sd15")
    with pytest.raises(ValueError, match="finder_mask|code"):
        qr_generate(module, pipe, cn, job(512), layers(256), FUNCTION_PROMPT, PROMPT, "")
    with pytest.raises(ValueError, match="family"):
        qr_generate(module, pipe, model("sdxl")[2], job(256), layers(256), FUNCTION_PROMPT, PROMPT, "")
    cascade = types.SimpleNamespace(FAMILY=qrd.Family.stable_cascade)
    with pytest.raises(JobRejected, match="SD 1.5 and SDXL"):
        qr_generate(cascade, pipe, cn, job(256), layers(256), FUNCTION_PROMPT, PROMPT, "")
