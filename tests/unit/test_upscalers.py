"""ESRGAN-family upscalers (models/postprocess/upscalers.py): the five AI Horde upscalers load
from .pth and .safetensors in their published key layouts, upscale by exactly x4 / x2, match an
independent functional RRDBNet, and load strictly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from models.postprocess.upscalers import (
    BUILTIN_UPSCALERS,
    PUBLISHED_UPSCALERS,
    RRDBNet,
    UpscalerWeightsMismatch,
    detect_config,
    load_upscaler,
    to_new_layout,
    to_old_layout,
    unwrap_state_dict,
    upscale,
    upscaler_state_dict,
)

AI_HORDE_UPSCALERS = ["RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B",
                      "NMKD_Siax", "4x_AnimeSharp"]
SCALES = {"RealESRGAN_x4plus": 4, "RealESRGAN_x2plus": 2, "RealESRGAN_x4plus_anime_6B": 4,
          "NMKD_Siax": 4, "4x_AnimeSharp": 4}
X4PLUS_PARAMS = 16_697_987  # 23 RRDBs of 64 features, growth 32: the published 16.7M
X4PLUS_KEYS = 23 * 3 * 5 * 2 + 6 * 2  # dense-block convs + conv_first/body/up1/up2/hr/last


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content plus noise, like a picture rather than pure noise.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(1, width - 1)), (yy * 255 // max(1, height - 1)),
                     ((xx + yy) * 7) % 256], axis=2)
    noise = rng.integers(-40, 41, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").convert(mode)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """RRDBNet written out with F.conv2d from new-layout keys (ESRGAN / Real-ESRGAN papers)."""
    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    in_ch = sd["conv_first.weight"].shape[1]
    if in_ch == 12:
        x = F.pixel_unshuffle(x, 2)
    feat = conv("conv_first", x)
    trunk = feat
    blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    for b in range(blocks):
        block_in = trunk
        for r in (1, 2, 3):
            p = f"body.{b}.rdb{r}"
            x1 = lrelu(conv(f"{p}.conv1", trunk))
            x2 = lrelu(conv(f"{p}.conv2", torch.cat((trunk, x1), 1)))
            x3 = lrelu(conv(f"{p}.conv3", torch.cat((trunk, x1, x2), 1)))
            x4 = lrelu(conv(f"{p}.conv4", torch.cat((trunk, x1, x2, x3), 1)))
            x5 = conv(f"{p}.conv5", torch.cat((trunk, x1, x2, x3, x4), 1))
            trunk = x5 * 0.2 + trunk
        trunk = trunk * 0.2 + block_in
    feat = feat + conv("conv_body", trunk)
    feat = lrelu(conv("conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(conv("conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def test_builtins_are_the_five_ai_horde_upscalers():
    assert sorted(BUILTIN_UPSCALERS) == sorted(AI_HORDE_UPSCALERS)
    for name, spec in PUBLISHED_UPSCALERS.items():
        assert spec.scale == SCALES[name]
    # Published layouts and wrappers: Real-ESRGAN releases wrap in params_ema; the community
    # models are old sequential ESRGAN files.
    for name in ("RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B"):
        sd = BUILTIN_UPSCALERS[name]()
        assert list(sd) == ["params_ema"]
        assert {"conv_first.weight", "body.0.rdb1.conv1.weight"} <= set(sd["params_ema"])
    for name in ("NMKD_Siax", "4x_AnimeSharp"):
        sd = BUILTIN_UPSCALERS[name]()
        assert "model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd
        assert "model.1.sub.0.RDB3.conv5.0.bias" in sd
        assert {"model.3.weight", "model.6.weight", "model.8.weight", "model.10.weight"} <= set(sd)
        assert not any(k.startswith(("conv_", "body.")) for k in sd)
    # Seeded: the same weights every time, different weights per name.
    a, b = BUILTIN_UPSCALERS["NMKD_Siax"](), BUILTIN_UPSCALERS["NMKD_Siax"]()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = BUILTIN_UPSCALERS["4x_AnimeSharp"]()
    assert not torch.equal(a["model.0.weight"], c["model.0.weight"])


@pytest.mark.parametrize("name", AI_HORDE_UPSCALERS)
def test_builtin_loads_from_pth_and_safetensors(name, tmp_path):
    published = BUILTIN_UPSCALERS[name]()
    pth = tmp_path / f"{name}.pth"
    torch.save(published, pth)
    st = tmp_path / f"{name}.safetensors"
    save_file(unwrap_state_dict(published), str(st))  # safetensors files are flat

    image = _image(45, 37)  # odd sides: the x2 model's pixel-unshuffle needs padding
    outputs = []
    for path in (pth, st):
        module, scale = load_upscaler(path)
        assert isinstance(module, RRDBNet) and scale == SCALES[name] == module.scale
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        out = upscale(module, scale, image)
        assert out.mode == "RGB" and out.size == (45 * scale, 37 * scale)
        outputs.append(_pixels(out))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    # A real picture comes out, not a constant or clamped image, and it depends on the input.
    assert outputs[0].std() > 10 and ((outputs[0] == 0) | (outputs[0] == 255)).mean() < 0.05
    other = _pixels(upscale(module, scale, _image(45, 37, seed=1)))
    assert np.abs(other - outputs[0]).mean() > 1


@pytest.mark.parametrize("name", ["RealESRGAN_x4plus", "RealESRGAN_x2plus", "NMKD_Siax"])
def test_module_matches_functional_reference(name):
    module, scale = load_upscaler(BUILTIN_UPSCALERS[name]())
    sd = to_new_layout(unwrap_state_dict(BUILTIN_UPSCALERS[name]()))
    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = module(x)
        ref = _reference_forward(sd, x)
    assert ours.shape == (1, 3, 20 * scale, 24 * scale)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_upscale_matches_module_on_pixels():
    module, scale = load_upscaler(BUILTIN_UPSCALERS["RealESRGAN_x4plus"]())
    image = _image(16, 12)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = (module(x).clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    np.testing.assert_array_equal(np.asarray(upscale(module, scale, image)), expected.numpy())


@pytest.mark.parametrize("old_name,new_name", [("NMKD_Siax", None), ("4x_AnimeSharp", None),
                                               (None, "RealESRGAN_x4plus"),
                                               (None, "RealESRGAN_x2plus")])
def test_old_and_new_layouts_give_identical_outputs(old_name, new_name):
    if old_name:
        old = BUILTIN_UPSCALERS[old_name]()
        new = to_new_layout(old)
        assert detect_config(old).layout == "old" and detect_config(new).layout == "new"
    else:
        new = unwrap_state_dict(BUILTIN_UPSCALERS[new_name]())
        old = to_old_layout(new)
        assert "model.1.sub.0.RDB1.conv1.0.weight" in old and "model.10.weight" in old
    assert len(old) == len(new)
    # Round trip keeps every tensor under the same key.
    back = to_old_layout(to_new_layout(old))
    assert back.keys() == old.keys() and all(back[k] is old[k] for k in old)
    image = _image(30, 22, seed=2)
    results = []
    for sd in (old, new):
        module, scale = load_upscaler(sd)
        results.append(_pixels(upscale(module, scale, image)))
    np.testing.assert_array_equal(results[0], results[1])


def test_full_size_x4plus_layout_on_meta():
    published = upscaler_state_dict("RealESRGAN_x4plus", tiny=False, device="meta")
    sd = published["params_ema"]
    assert len(sd) == X4PLUS_KEYS == 702
    assert sum(t.numel() for t in sd.values()) == X4PLUS_PARAMS
    assert sd["conv_first.weight"].shape == (64, 3, 3, 3)
    assert sd["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert sd["conv_last.weight"].shape == (3, 64, 3, 3)
    assert "body.23.rdb1.conv1.weight" not in sd
    module, scale = load_upscaler(published)
    assert scale == 4 and module.num_block == 23 and module.num_feat == 64
    assert module.num_grow_ch == 32
    assert all(p.device.type == "meta" for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) == X4PLUS_PARAMS
    assert len(module.state_dict()) == X4PLUS_KEYS
    # Our own module, built directly, has exactly the published keys.
    with torch.device("meta"):
        direct = RRDBNet(3, 3, 64, 23, 32)
    assert {k: v.shape for k, v in direct.state_dict().items()} == \
        {k: v.shape for k, v in sd.items()}


def test_full_size_x2plus_takes_pixel_unshuffled_input():
    sd = upscaler_state_dict("RealESRGAN_x2plus", tiny=False, device="meta")["params_ema"]
    assert len(sd) == X4PLUS_KEYS
    assert sd["conv_first.weight"].shape == (64, 12, 3, 3)
    assert {"conv_up1.weight", "conv_up2.weight"} <= set(sd)  # the x4 body behind unshuffle
    assert sum(t.numel() for t in sd.values()) == X4PLUS_PARAMS + 64 * 9 * 9
    module, scale = load_upscaler(sd)
    assert scale == 2 and module.unshuffle == 2 and module.num_upsample == 2


def test_full_size_anime_6b_and_old_layout_models():
    module, scale = load_upscaler(
        upscaler_state_dict("RealESRGAN_x4plus_anime_6B", tiny=False, device="meta"))
    assert scale == 4 and module.num_block == 6
    assert sum(p.numel() for p in module.parameters()) == 4_467_779
    for name in ("NMKD_Siax", "4x_AnimeSharp"):
        sd = upscaler_state_dict(name, tiny=False, device="meta")
        assert len(sd) == X4PLUS_KEYS
        assert sd["model.0.weight"].shape == (64, 3, 3, 3)
        assert sd["model.1.sub.22.RDB3.conv5.0.weight"].shape == (64, 192, 3, 3)
        assert sd["model.1.sub.23.weight"].shape == (64, 64, 3, 3)  # the body conv
        for index in (3, 6, 8):
            assert sd[f"model.{index}.weight"].shape == (64, 64, 3, 3)
        assert sd["model.10.weight"].shape == (3, 64, 3, 3)
        assert not any(k.startswith(f"model.{i}.") for k in sd for i in (2, 4, 5, 7, 9, 11))
        config = detect_config(sd)
        assert (config.layout, config.num_block, config.num_feat, config.scale) == \
            ("old", 23, 64, 4)
        module, scale = load_upscaler(sd)
        assert scale == 4 and sum(p.numel() for p in module.parameters()) == X4PLUS_PARAMS


def test_old_layout_with_other_upsample_counts():
    """Old ESRGAN x2 (one upsample: model.3, hr model.5, last model.7) and x8 files."""
    for num_upsample, last in ((1, 7), (3, 13)):
        with torch.device("meta"):
            net = RRDBNet(3, 3, 8, 1, 4, num_upsample=num_upsample)
        old = to_old_layout(net.state_dict())
        assert f"model.{last}.weight" in old and f"model.{last - 2}.weight" in old
        module, scale = load_upscaler(old)
        assert scale == 2 ** num_upsample


def test_strict_loading_names_extra_missing_and_misshaped_keys():
    old = BUILTIN_UPSCALERS["NMKD_Siax"]()
    extra = dict(old, **{"model.1.sub.0.RDB1.conv6.0.weight": torch.zeros(1)})
    with pytest.raises(UpscalerWeightsMismatch, match=r"unexpected keys: .*RDB1\.conv6\.0\.weight"):
        load_upscaler(extra)
    missing = {k: v for k, v in old.items() if k != "model.8.bias"}
    with pytest.raises(UpscalerWeightsMismatch,
                       match=r"missing keys: model\.8\.bias \(conv_hr\.bias\)"):
        load_upscaler(missing)

    new = BUILTIN_UPSCALERS["RealESRGAN_x4plus"]()
    flat = dict(new["params_ema"])
    del flat["body.1.rdb2.conv3.weight"]
    with pytest.raises(UpscalerWeightsMismatch,
                       match=r"missing keys: body\.1\.rdb2\.conv3\.weight"):
        load_upscaler({"params_ema": flat})
    extra_new = dict(new["params_ema"], **{"conv_extra.weight": torch.zeros(3)})
    with pytest.raises(UpscalerWeightsMismatch, match=r"unexpected keys: conv_extra\.weight"):
        load_upscaler(extra_new)
    bad_shape = dict(new["params_ema"])
    bad_shape["conv_hr.bias"] = torch.zeros(5)
    with pytest.raises(UpscalerWeightsMismatch, match=r"wrong shapes: conv_hr\.bias \(5,\)"):
        load_upscaler(bad_shape)
    with pytest.raises(UpscalerWeightsMismatch, match="not an ESRGAN"):
        load_upscaler({"encoder.weight": torch.zeros(1)})
    with pytest.raises(UpscalerWeightsMismatch, match="input channels"):
        load_upscaler(dict(new["params_ema"], **{"conv_first.weight": torch.zeros(16, 4, 3, 3)}))


def test_wrappers_params_ema_wins_over_params(tmp_path):
    new = BUILTIN_UPSCALERS["RealESRGAN_x4plus"]()["params_ema"]
    other = {k: torch.zeros_like(v) for k, v in new.items()}
    both = tmp_path / "both.pth"
    torch.save({"params": other, "params_ema": new}, both)
    only_params = tmp_path / "params.pth"
    torch.save({"params": new}, only_params)
    image = _image(12, 10)
    expected = _pixels(upscale(*load_upscaler(new), image))
    for path in (both, only_params):
        np.testing.assert_array_equal(_pixels(upscale(*load_upscaler(path), image)), expected)
    flat = tmp_path / "flat.pth"
    torch.save(new, flat)
    np.testing.assert_array_equal(_pixels(upscale(*load_upscaler(flat), image)), expected)


@pytest.mark.parametrize("name", AI_HORDE_UPSCALERS)
def test_tiling_equals_untiled(name):
    module, scale = load_upscaler(BUILTIN_UPSCALERS[name]())
    image = _image(150, 133, seed=4)
    whole = _pixels(upscale(module, scale, image))
    for tile in (64, 100):
        tiled = _pixels(upscale(module, scale, image, tile=tile))
        assert tiled.shape == whole.shape
        assert np.abs(tiled - whole).max() <= 1, tile
    # Without context the seams differ: the tiles really are run separately.
    seams = _pixels(upscale(module, scale, image, tile=64, tile_pad=0))
    assert np.abs(seams - whole).max() > 1


def test_esrgan_repository_layout():
    """The ESRGAN repository's later key names (RRDB_trunk, trunk_conv, upconv1/2, HRconv)."""
    new = unwrap_state_dict(BUILTIN_UPSCALERS["RealESRGAN_x4plus"]())
    renames = {"conv_body.": "trunk_conv.", "conv_up1.": "upconv1.", "conv_up2.": "upconv2.",
               "conv_hr.": "HRconv."}
    esrgan = {}
    for key, value in new.items():
        if key.startswith("body."):
            key = "RRDB_trunk." + key[len("body."):].replace(".rdb", ".RDB")
        for ours, theirs in renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        esrgan[key] = value
    assert "RRDB_trunk.0.RDB1.conv1.weight" in esrgan and "HRconv.bias" in esrgan
    assert detect_config(esrgan).layout == "esrgan"
    image = _image(14, 11)
    np.testing.assert_array_equal(_pixels(upscale(*load_upscaler(esrgan), image)),
                                  _pixels(upscale(*load_upscaler(new), image)))


def test_other_modes_and_scale_mismatch():
    module, scale = load_upscaler(BUILTIN_UPSCALERS["RealESRGAN_x2plus"]())
    for mode in ("RGBA", "L", "P"):
        out = upscale(module, scale, _image(9, 7, mode=mode))
        assert out.mode == "RGB" and out.size == (18, 14)
    out = upscale(module, scale, _image(1, 1))
    assert out.size == (2, 2)
    with pytest.raises(ValueError, match="scale"):
        upscale(module, 4, _image(8, 8))
