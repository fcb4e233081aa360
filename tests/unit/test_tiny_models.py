"""The tiny built-in models (models/tiny.py) driven through the family generators
(deployments/*.py), without Ray: determinism, seeds, batches, sizes and prompt conditioning."""

from __future__ import annotations

import functools

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.diffusion.cascade import split_steps
from deployments.diffusion.deployment import CascadeGenerator
from deployments.diffusion.common import diffusers_clip_skip, encode_webp
from deployments.jobs import ImageJob, JobRejected
from deployments.diffusion.deployment import SD15Generator
from deployments.diffusion.deployment import SDXLGenerator
from models.tiny import BUILTIN, MAX_TOKENS, build_tokenizer

FAMILIES = {
    "tiny-sd15": (SD15Generator, "stable_diffusion_1"),
    "tiny-sdxl": (SDXLGenerator, "stable_diffusion_xl"),
    "tiny-cascade": (CascadeGenerator, "stable_cascade"),
}


# diffusers' schedulers trip numpy 2's __array__/__array_wrap__ deprecations on every step.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")


def builtin(name: str, family: str, path: str) -> dict:
    return {"name": name, "family": family, "weights": {"kind": "builtin", "path": path}}


@functools.lru_cache(maxsize=None)
def built(name: str):
    """(generator, loaded pipeline(s), model name), built once per model."""
    cls, family = FAMILIES[name]
    gen = cls([builtin(name, family, name)], device="cpu")
    return gen, gen.load(name), name


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return built(request.param)


def job(model: str, **overrides) -> dict:
    base = dict(model=model, prompt="a photo of a cat", negative_prompt="", width=128, height=128,
                steps=4, cfg_scale=7.0, sampler_name="k_euler_a", karras=True, clip_skip=1,
                seeds=[42], tiling=False)
    return {**base, **overrides}


def images(family, **overrides) -> list[Image.Image]:
    gen, pipe, name = family
    return gen.generate(pipe, job(name, **overrides))


def run(family, **overrides) -> list[bytes]:
    return [encode_webp(im) for im in images(family, **overrides)]


def pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).astype(np.int16)


@pytest.mark.timeout(60)
def test_tokenizer_takes_any_text():
    tok = build_tokenizer()
    ids = tok("a cat 🐈 ünïcødé 日本語 <html> \t\n  !!", padding="max_length", max_length=MAX_TOKENS,
              truncation=True).input_ids
    assert len(ids) == MAX_TOKENS and tok.model_max_length == MAX_TOKENS
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    words = tok.tokenize("a cat and a dragon")  # known words are single tokens
    assert words == ["a</w>", "cat</w>", "and</w>", "a</w>", "dragon</w>"]
    assert len(tok("x " * 500, truncation=True, max_length=MAX_TOKENS).input_ids) == MAX_TOKENS


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builders_are_deterministic(name):
    def weights(built):
        pipes = built if isinstance(built, tuple) else (built,)
        return {f"{i}.{n}.{k}": v for i, p in enumerate(pipes) for n, m in p.components.items()
                if isinstance(m, torch.nn.Module) for k, v in m.state_dict().items()}

    a, b, other = weights(BUILTIN[name](seed=0)), weights(BUILTIN[name](seed=0)), weights(BUILTIN[name](seed=1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a)


@pytest.mark.timeout(120)
def test_same_seed_gives_identical_bytes(family):
    first, second = run(family, seeds=[7]), run(family, seeds=[7])
    assert first == second


@pytest.mark.timeout(120)
def test_different_seeds_give_different_images(family):
    a, b = run(family, seeds=[1, 2])
    assert np.abs(pixels(a) - pixels(b)).mean() > 5


@pytest.mark.timeout(120)
def test_batch_images_equal_single_seed_images(family):
    seeds = [3, 4, 5]
    batch = images(family, seeds=seeds)
    assert len(batch) == 3
    for seed, image in zip(seeds, batch):
        (single,) = images(family, seeds=[seed])
        # Same noise per image; only float summation order differs with the batch size (CPU
        # kernels block by batch), which can flip a pixel's rounding by one level. (Compared
        # before WebP: its lossy encoder can turn a one-level change into a few.)
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(single, np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [(192, 128), (64, 256)])
def test_width_and_height_are_honoured(family, size):
    (blob,) = run(family, width=size[0], height=size[1])
    assert Image.open(io.BytesIO(blob)).size == size


@pytest.mark.timeout(120)
def test_prompt_changes_the_image(family):
    (a,), (b,) = run(family), run(family, prompt="a red dragon over a castle at night")
    assert np.abs(pixels(a) - pixels(b)).max() > 0


@pytest.mark.timeout(120)
def test_negative_prompt_changes_the_image(family):
    (a,), (b,) = run(family), run(family, negative_prompt="blurry, low quality")
    assert np.abs(pixels(a) - pixels(b)).max() > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])  # Stable Cascade takes no clip_skip
def test_clip_skip_changes_the_image(name):
    family = built(name)
    (one,), (two,), (three,) = run(family, clip_skip=1), run(family, clip_skip=2), run(family, clip_skip=3)
    assert one != two and two != three
    (many,) = run(family, clip_skip=12)  # the horde's most, past the tiny encoder's depth: clamped
    assert many


@pytest.mark.timeout(120)
def test_sampler_and_karras_change_the_image(family):
    (a,), (b,) = run(family), run(family, sampler_name="k_dpmpp_2m")
    (c,) = run(family, sampler_name="k_dpmpp_2m", karras=False)
    if family[2] == "tiny-cascade":  # one scheduler for every sampler name
        assert a == b == c
    else:
        assert a != b and b != c


@pytest.mark.timeout(30)
def test_clip_skip_off_by_one():
    # Horde 1 = last layer = diffusers None; horde 2 = penultimate = diffusers 1.
    assert diffusers_clip_skip(1, max_skip=11) is None
    assert diffusers_clip_skip(2, max_skip=11) == 1
    assert diffusers_clip_skip(12, max_skip=11) == 11
    assert diffusers_clip_skip(40, max_skip=3) == 3


@pytest.mark.timeout(30)
def test_cascade_step_split():
    assert split_steps(30) == (20, 10)
    assert split_steps(1) == (1, 1)
    assert split_steps(2) == (1, 1)
    assert split_steps(50) == (34, 16)


@pytest.mark.timeout(30)
def test_job_parsing():
    parsed = ImageJob.parse(job("m", seeds=[5, 6.0], cfg_scale=7, width=512.0))
    assert parsed.seeds == (5, 6) and parsed.cfg_scale == 7.0 and parsed.width == 512
    assert ImageJob.parse({"model": "m", "prompt": "p", "seeds": [1], "negative_prompt": None}).negative_prompt == ""
    # Every bad field is refused by name, as JobRejected (faulted at once, never retried).
    for bad, field in (({"seeds": []}, "seeds"), ({"width": 100}, "width"), ({"steps": 0}, "steps"),
                       ({"clip_skip": 0}, "clip_skip"), ({"seeds": ["5"]}, r"seeds\[0\]"),
                       ({"width": "512"}, "width"), ({"cfg_scale": float("nan")}, "cfg_scale"),
                       ({"unknown_key": 1}, "unknown_key"), ({"seeds": [1] * 21}, "seeds"),
                       ({"workflow": "img2img"}, "source_image")):
        with pytest.raises(JobRejected, match=field):
            ImageJob.parse(job("m", **bad))
    with pytest.raises(JobRejected, match="seeds"):
        ImageJob.parse({"model": "m", "prompt": "p"})


@pytest.mark.timeout(30)
def test_generator_refuses_other_families_and_unknown_models():
    with pytest.raises(ValueError, match="not stable_diffusion_1"):
        SD15Generator([builtin("x", "stable_diffusion_xl", "tiny-sdxl")])
    gen = SD15Generator([], device="cpu")
    with pytest.raises(ValueError, match="not one of"):
        gen.load("nope")


@pytest.mark.timeout(60)
def test_sd15_clip_skip_embeddings_match_the_pipelines_own():
    from deployments.diffusion.sd15 import clip_skip_embeds

    gen = SD15Generator([builtin("m", "stable_diffusion_1", "tiny-sd15")])
    pipe = gen.load("m")
    ours = clip_skip_embeds(pipe, "a photo of a cat", 0)  # zero layers skipped = last layer
    theirs, _ = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(clip_skip_embeds(pipe, "a photo of a cat", 1), theirs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_generator_matches_the_plain_pipeline_call(name):
    # The job contract adds nothing of its own at clip_skip 1: the images are what diffusers
    # makes for the same prompt, sampler and seed.
    from models.samplers import make_scheduler

    cls, family = FAMILIES[name]
    gen = cls([builtin(name, family, name)])
    pipe = gen.load(name)
    base = dict(pipe.scheduler.config)
    ours = gen.generate(pipe, job(name, sampler_name="k_dpmpp_2m", seeds=[9]))[0]
    pipe.scheduler = make_scheduler("k_dpmpp_2m", True, base)
    theirs = pipe("a photo of a cat", negative_prompt="", width=128, height=128, num_inference_steps=4,
                  guidance_scale=7.0, generator=torch.Generator().manual_seed(9)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
