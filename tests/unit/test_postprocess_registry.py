"""Every AI Horde post-processor by name, built from the registry the way the post-processing
deployment builds it (builtin random weights of the real architectures, through files): the
size and mode each returns, and the order the AI Horde applies them in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.postprocess.registry import POST_PROCESSORS, PostProcessorEntry, load, order

pytestmark = pytest.mark.timeout(300)
SCALES = {"RealESRGAN_x4plus": 4, "RealESRGAN_x2plus": 2, "RealESRGAN_x4plus_anime_6B": 4,
          "NMKD_Siax": 4, "4x_AnimeSharp": 4}


def test_the_horde_order_whatever_the_request_says():
    assert order(["strip_background", "RealESRGAN_x2plus", "CodeFormers", "GFPGAN"]) == [
        "GFPGAN", "CodeFormers", "RealESRGAN_x2plus", "strip_background"]


@pytest.mark.parametrize("name", POST_PROCESSORS)
def test_each_post_processor_loads_and_returns_the_right_size_and_mode(name):
    torch.set_num_threads(1)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = load(PostProcessorEntry(name=name))(image, 0.8)
    scale = SCALES.get(name, 1)
    assert out.size == (64 * scale, 48 * scale)
    assert out.mode == ("RGBA" if name == "strip_background" else "RGB")
    if name in ("GFPGAN", "CodeFormers"):  # noise has no face: unchanged, pixel for pixel
        assert np.array_equal(np.asarray(out), np.asarray(image))


def test_entries_say_where_their_weights_are():
    with pytest.raises(ValueError, match="path"):
        PostProcessorEntry(name="GFPGAN", kind="file")
    with pytest.raises(ValueError, match="repo"):
        PostProcessorEntry(name="strip_background", kind="huggingface")
    with pytest.raises(ValueError):
        PostProcessorEntry(name="Waifu2x")


def test_the_api_knows_each_upscalers_factor():
    """api/results.py checks a post-processed result's size with UPSCALE_FACTORS: it must be
    the factor each built-in upscaler really has, and list every upscaler."""
    from PIL import Image

    from models.postprocess.registry import UPSCALE_FACTORS, UPSCALERS, output_size
    from models.postprocess.upscalers import BUILTIN_UPSCALERS, load_upscaler, upscale

    assert set(UPSCALE_FACTORS) == set(UPSCALERS) == set(BUILTIN_UPSCALERS)
    for name, factory in BUILTIN_UPSCALERS.items():
        module, scale = load_upscaler(factory())
        out = upscale(module, scale, Image.new("RGB", (24, 16), (100, 50, 20)))
        assert scale == UPSCALE_FACTORS[name] and out.size == output_size(24, 16, [name]), name
    assert output_size(64, 32, ["GFPGAN", "RealESRGAN_x2plus", "strip_background"]) == (128, 64)
