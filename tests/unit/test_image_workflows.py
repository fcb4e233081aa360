"""The image workflows on the tiny models, through the deployment's generator (no Ray): what
each returns (size, mode, alpha) and what it changes against the source or the same seed
without the feature; and the AI Horde's hires fix rules, pinned on the worked examples of
shared/horde-facts.md."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.diffusion.deployment import DiffusionGenerator
from deployments.jobs import ImageJob, JobRejected
from models.adapters import load_adapter_catalog
from models.catalog import Family, load_catalog
from models.workflows import (
    Workflow,
    choose_workflow,
    first_pass_size,
    hires_fix_applies,
    hires_second_pass_steps,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]
SD1, SDXL, CASCADE = Family.stable_diffusion_1, Family.stable_diffusion_xl, Family.stable_cascade


# ------------------------------------------------------------------------------ the rules


def test_hires_second_pass_steps_match_the_worked_examples():
    assert hires_second_pass_steps(30, 0.65, 1024, 1024, 512) == 16
    assert hires_second_pass_steps(30, 0.3, 1024, 1024, 512) == 6
    assert hires_second_pass_steps(30, 0.65, 1536, 1536, 1024) == 18
    # Few steps: +3, clamped to the request's steps; never fewer than min(6, S).
    assert hires_second_pass_steps(10, 0.65, 1024, 1024, 512) == 10
    assert hires_second_pass_steps(4, 0.01, 640, 640, 512) == 4


def test_first_pass_sizes():
    assert first_pass_size(SD1, 1024, 1536) == (512, 768)
    assert first_pass_size(SD1, 1000, 700) == (704, 512)  # shorter side 512, floored to 64
    assert first_pass_size(SDXL, 2048, 2048) == (1024, 1024)
    assert first_pass_size(SDXL, 1536, 1024) == (1216, 832)  # the nearest aspect bucket
    assert first_pass_size(SDXL, 1024, 2048) == (768, 1344)
    assert first_pass_size(SDXL, 640, 1600) == (640, 1536)
    assert first_pass_size(CASCADE, 2048, 1536) == (1024, 768)


def test_hires_fix_is_off_where_the_horde_turns_it_off():
    assert not hires_fix_applies(SD1, 512, 512, painting=False)
    assert not hires_fix_applies(SD1, 512, 1024, painting=False)  # the first pass is the image
    assert hires_fix_applies(SD1, 768, 768, painting=False)
    assert not hires_fix_applies(SD1, 1024, 1024, painting=True)
    assert not hires_fix_applies(SDXL, 1024, 1024, painting=False)
    assert hires_fix_applies(SDXL, 1536, 1536, painting=False)
    kw = dict(source_processing="inpainting", has_source=True, hires_fix=True, transparent=False)
    assert choose_workflow(SD1, width=1024, height=1024, **kw) is Workflow.inpainting
    kw.update(source_processing="img2img")
    assert choose_workflow(SD1, width=1024, height=1024, **kw) is Workflow.hires_fix
    assert choose_workflow(SD1, width=512, height=512, **kw) is Workflow.img2img


# ---------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    torch.set_num_threads(1)  # the suite shares two cores; one thread is faster here
    catalog = load_catalog("configs/models.yaml")
    adapters = load_adapter_catalog("configs/adapters.yaml").model_copy(
        update={"cache_dir": str(tmp_path_factory.mktemp("adapters"))})
    out = {}
    for family, names in ((SD1, ["tiny-sd15", "tiny-sd15-inpainting"]), (SDXL, ["tiny-sdxl"]),
                          (CASCADE, ["tiny-cascade"])):
        gen = DiffusionGenerator(family, [catalog.get(n) for n in names], device="cpu",
                                 adapters=adapters)
        out.update({n: (gen, gen.load(n)) for n in names})
    return out


def run(generators, model: str, **job) -> list[Image.Image]:
    gen, pipe = generators[model]
    base = dict(model=model, prompt="a red house on a hill", seeds=[7], width=128, height=128,
                steps=6, sampler_name="k_euler", cfg_scale=6.0)
    return gen.generate(pipe, ImageJob.parse({**base, **job}))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def source_image(size=(128, 128)) -> Image.Image:
    """A source with structure: a bright disc on a dark gradient."""
    y, x = np.mgrid[: size[1], : size[0]]
    img = np.stack([x * 255 / size[0], y * 255 / size[1], np.full_like(x, 40.0)], -1)
    disc = (x - size[0] / 2) ** 2 + (y - size[1] / 2) ** 2 < (size[0] / 4) ** 2
    img[disc] = (250, 240, 60)
    return Image.fromarray(img.astype(np.uint8))


def test_img2img_strength_decides_how_far_it_departs_from_the_source(generators):
    """With random weights the VAE does not give the source back, so "near the source" means
    near what the VAE makes of it: its encode-decode round trip."""
    source = source_image()
    _, pipe = generators["tiny-sd15"]
    with torch.no_grad():
        latents = pipe.vae.encode(pipe.image_processor.preprocess(source)).latent_dist.mean
        round_trip = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample)[0]
    low, high = (run(generators, "tiny-sd15", workflow="img2img", source_image=png(source),
                     denoising_strength=d)[0] for d in (0.05, 1.0))
    near, far = np.abs(px(low) - px(round_trip)).mean(), np.abs(px(high) - px(round_trip)).mean()
    assert low.size == high.size == (128, 128)
    assert near < far / 3, (near, far)
    (low_other_seed,) = run(generators, "tiny-sd15", workflow="img2img", source_image=png(source),
                            denoising_strength=0.05, seeds=[8])
    (low_other_source,) = run(generators, "tiny-sd15", workflow="img2img", denoising_strength=0.05,
                              source_image=png(source.transpose(Image.Transpose.ROTATE_90)))
    assert np.abs(px(low) - px(low_other_seed)).mean() < np.abs(px(low) - px(low_other_source)).mean() / 3
    # The source is resized to the requested size (LANCZOS) whatever size it came in.
    wide = run(generators, "tiny-sd15", workflow="img2img", source_image=png(source.resize((300, 200))),
               width=192, height=128, denoising_strength=0.3)[0]
    assert wide.size == (192, 128)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd15-inpainting", "tiny-sdxl"])
def test_inpainting_repaints_the_white_of_the_mask(generators, model):
    source = source_image()
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (64, 0, 128, 128))  # repaint the right half
    job = dict(workflow="inpainting", source_image=png(source), source_mask=png(mask))
    a, b = run(generators, model, **job)[0], run(generators, model, **job, seeds=[8])[0]
    assert a.size == (128, 128) and a.mode == "RGB"
    diff = np.abs(px(a) - px(b)).mean(axis=(0, 2))
    # Seeds only change what is repainted: the right half, much less the kept left (the kept
    # latents are the source's exactly, but the tiny random VAE decoder smears across the mask's
    # edge). A 9-channel inpainting UNet repaints all of it from the masked source, so only the
    # repainted side is checked there.
    assert diff[72:].mean() > 1.0
    if model != "tiny-sd15-inpainting":
        assert diff[:48].mean() < diff[72:].mean() / 3, (diff[:48].mean(), diff[72:].mean())
    else:
        other = Image.new("L", (128, 128), 0)
        other.paste(255, (0, 0, 64, 128))
        flipped = run(generators, model, **{**job, "source_mask": png(other)})[0]
        assert np.abs(px(flipped) - px(a)).mean() > 1.0  # the model sees the mask


def test_outpainting_fills_the_transparent_border(generators):
    padded = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    padded.paste(source_image((160, 160)).convert("RGBA"), (48, 48))
    job = dict(workflow="outpainting", source_image=png(padded), width=256, height=256)
    a, b = run(generators, "tiny-sd15", **job)[0], run(generators, "tiny-sd15", **job, seeds=[8])[0]
    assert a.size == (256, 256)
    diff = np.abs(px(a) - px(b)).mean(axis=2)
    inner, border = diff[88:168, 88:168].mean(), np.concatenate([diff[:32].ravel(), diff[-32:].ravel()]).mean()
    assert border > 1.0 and inner < border / 3, (inner, border)


def test_inpainting_without_mask_or_alpha_is_rejected_at_once(generators):
    with pytest.raises(JobRejected, match="source_mask"):
        run(generators, "tiny-sd15", workflow="inpainting", source_image=png(source_image()))
    with pytest.raises(JobRejected, match="source_image"):
        run(generators, "tiny-sd15", workflow="img2img", source_image=b"GIF89a not an image")


class UNetCalls:
    """Counts UNet forward passes (one per step for k_euler, whatever the batch)."""

    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1


@pytest.mark.parametrize("model, size, native", [("tiny-sd15", (768, 640), 512),
                                                 ("tiny-sdxl", (1280, 1024), 1024)])
def test_hires_fix_runs_two_passes_with_the_horde_step_rule(generators, model, size, native):
    gen, pipe = generators[model]
    steps, d = 8, 0.5
    calls = UNetCalls(pipe.unet)
    try:
        (hires,) = run(generators, model, workflow="hires_fix", width=size[0], height=size[1],
                       steps=steps, hires_fix_denoising_strength=d)
    finally:
        calls.handle.remove()
    assert hires.size == size
    assert calls.count == steps + hires_second_pass_steps(steps, d, *size, native)
    (plain,) = run(generators, model, width=size[0], height=size[1], steps=steps)
    assert np.abs(px(hires) - px(plain)).mean() > 1.0


def test_cascade_hires_fix_is_two_passes(generators):
    (hires,) = run(generators, "tiny-cascade", workflow="hires_fix", width=1280, height=1280, steps=6)
    (plain,) = run(generators, "tiny-cascade", width=1280, height=1280, steps=6)
    assert hires.size == plain.size == (1280, 1280)
    assert np.abs(px(hires) - px(plain)).mean() > 1.0
    with pytest.raises(JobRejected, match="Stable Cascade"):
        run(generators, "tiny-cascade", workflow="img2img", source_image=png(source_image()))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_transparent_images_have_a_real_alpha_channel(generators, model):
    (image,) = run(generators, model, workflow="transparent")
    assert image.mode == "RGBA" and image.size == (128, 128)
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32)
    assert alpha.std() > 1.0 and alpha.min() < alpha.max()
    # Plain jobs on the same replica afterwards are untouched by the injection.
    before = run(generators, model)[0]
    run(generators, model, workflow="transparent")
    assert np.array_equal(px(run(generators, model)[0]), px(before))


@pytest.mark.parametrize("model, lora, ti", [("tiny-sd15", "tiny-lora", "tiny-ti"),
                                             ("tiny-sdxl", "tiny-lora-xl", "tiny-ti-xl")])
def test_loras_and_tis_change_the_image_and_strength_zero_does_not(generators, model, lora, ti):
    (plain,) = run(generators, model)
    (with_lora,) = run(generators, model, loras=[{"name": lora}])
    (zero,) = run(generators, model, loras=[{"name": lora, "model": 0.0, "clip": 0.0}])
    (after,) = run(generators, model)
    (with_ti,) = run(generators, model, tis=[{"name": ti, "inject_ti": "prompt"}])
    assert np.abs(px(with_lora) - px(plain)).mean() > 1.0
    assert np.abs(px(zero) - px(plain)).max() <= 1.0
    assert np.array_equal(px(after), px(plain))  # nothing leaks into the next job
    assert np.abs(px(with_ti) - px(plain)).mean() > 0.5
    with pytest.raises(JobRejected, match=r"params.loras\[0\]"):
        run(generators, model, loras=[{"name": "no-such-lora"}])
    with pytest.raises(JobRejected, match="loras"):
        run(generators, "tiny-cascade", loras=[{"name": lora}])
