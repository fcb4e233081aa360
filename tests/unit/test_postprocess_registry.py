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
