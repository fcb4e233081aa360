"""Face fixers (GFPGAN, CodeFormers): detection, alignment, restoration and paste-back with the
builtin narrow networks, and the published key layouts on the meta device."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from models.postprocess.codeformer_arch import codeformer_v01
from models.postprocess.facefix import (
    CROP_SIZE,
    FaceFixer,
    HaarCascade,
    HaarFaceDetector,
    VENDORED_CASCADE,
    build_face_fixer,
    builtin_network,
    codeformer_from_state_dict,
    face_transform,
    gfpgan_from_state_dict,
    group_rectangles,
    load_strict,
)
from models.postprocess.gfpgan_arch import gfpgan_v14

torch.set_num_threads(1)


def draw_face(size=(400, 360), center=(180, 200), face_w=150, bg=(70, 110, 160)) -> np.ndarray:
    """A cartoon face that the Haar frontal-face cascade detects (checked against OpenCV 4.11's
    CascadeClassifier: box (84, 103, 195, 195) for the defaults)."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = bg
    cx, cy = center
    fw, fh = face_w, int(face_w * 1.3)
    cv2.ellipse(img, (cx, cy), (fw // 2, fh // 2), 0, 0, 360, (224, 180, 150), -1, cv2.LINE_AA)
    cv2.ellipse(img, (cx, cy - fh // 3), (fw // 2 + 4, fh // 4), 0, 180, 360, (60, 40, 30), -1,
                cv2.LINE_AA)  # hair
    ex, ey = int(fw * 0.2), cy - int(fh * 0.08)
    for s in (-1, 1):
        c = (cx + s * ex, ey)
        cv2.ellipse(img, (c[0], c[1] - int(fw * 0.09)), (int(fw * 0.11), int(fw * 0.025)), 0, 0,
                    360, (70, 50, 40), -1, cv2.LINE_AA)  # brow
        cv2.ellipse(img, c, (int(fw * 0.09), int(fw * 0.045)), 0, 0, 360, (250, 250, 250), -1,
                    cv2.LINE_AA)
        cv2.circle(img, c, int(fw * 0.04), (40, 30, 25), -1, cv2.LINE_AA)
    nose = np.array([[cx, ey + 5], [cx - int(fw * 0.07), cy + int(fh * 0.12)],
                     [cx + int(fw * 0.07), cy + int(fh * 0.12)]])
    cv2.fillPoly(img, [nose], (200, 150, 125), cv2.LINE_AA)
    cv2.ellipse(img, (cx, cy + int(fh * 0.25)), (int(fw * 0.17), int(fw * 0.05)), 0, 0, 360,
                (150, 60, 60), -1, cv2.LINE_AA)
    return cv2.GaussianBlur(img, (0, 0), 1.5)


def no_face(size=(300, 400)) -> np.ndarray:
    """A faceless scene: sky gradient, a sun, hills, fine noise."""
    h, w = size
    img = np.zeros((h, w, 3), np.float32)
    img[:] = np.linspace([90, 140, 230], [200, 220, 250], h, dtype=np.float32)[:, None, :]
    img = np.ascontiguousarray(img)
    cv2.circle(img, (w * 3 // 4, h // 4), h // 10, (255, 230, 120), -1, cv2.LINE_AA)
    cv2.ellipse(img, (w // 3, h), (w // 2, h // 3), 0, 180, 360, (60, 140, 60), -1, cv2.LINE_AA)
    img += np.random.default_rng(3).normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def detector():
    return HaarFaceDetector(backend="numpy")


@pytest.fixture(scope="module")
def gfpgan(detector):
    return build_face_fixer("GFPGAN", None, detector=detector)


@pytest.fixture(scope="module")
def codeformer(detector):
    return build_face_fixer("CodeFormers", None, detector=detector)


def crop_square(box, shape, fixer: FaceFixer):
    """Image-space bounds (x0, y0, x1, y1), clipped, of the crop a box is restored through."""
    m = face_transform(box, CROP_SIZE, fixer.crop_scale, fixer.center_shift)
    s, tx, ty = m[0, 0], m[0, 2], m[1, 2]
    x0, y0 = -tx / s, -ty / s
    side = CROP_SIZE / s
    h, w = shape[:2]
    return (max(0, int(np.floor(x0)) - 1), max(0, int(np.floor(y0)) - 1),
            min(w, int(np.ceil(x0 + side)) + 1), min(h, int(np.ceil(y0 + side)) + 1))


# -- detection -----------------------------------------------------------------------------


def test_haar_numpy_detects_drawn_face(detector):
    boxes = detector(draw_face())
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    # OpenCV 4.11's CascadeClassifier gives (84, 103, 195, 195) on this image
    assert abs(x - 84) <= 4 and abs(y - 103) <= 4 and abs(w - 195) <= 6
    assert x < 180 < x + w and y < 200 < y + h  # holds the face's centre


def test_haar_two_faces_and_none():
    cascade = HaarCascade.load(VENDORED_CASCADE)
    a = draw_face(size=(480, 640), center=(160, 220), face_w=110)
    b = draw_face(size=(480, 640), center=(470, 250), face_w=170, bg=(0, 0, 0))
    two = np.ascontiguousarray(np.concatenate([a[:, :320], b[:, 320:]], 1))
    found = sorted(cascade.detect(cv2.cvtColor(two, cv2.COLOR_RGB2GRAY), 1.1, 3, (80, 80)))
    # OpenCV 4.11: [[89, 148, 142, 142], [363, 141, 216, 216]]
    assert len(found) == 2
    assert np.abs(np.array(found) - [[89, 148, 142, 142], [363, 141, 216, 216]]).max() <= 4
    assert cascade.detect(cv2.cvtColor(no_face(), cv2.COLOR_RGB2GRAY), 1.1, 3) == []


def test_group_rectangles():
    rects = [(10, 10, 50, 50), (12, 11, 50, 50), (11, 9, 52, 52), (200, 200, 30, 30)]
    assert group_rectangles(rects, 2) == [(11, 10, 51, 51)]
    assert group_rectangles(rects, 0) == rects


def test_detector_backend_auto_matches_installed_opencv():
    det = HaarFaceDetector()
    assert det.backend == ("opencv" if hasattr(cv2, "CascadeClassifier") else "numpy")
    assert len(det(draw_face())) == 1


# -- pipeline --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gfpgan", "codeformer"])
def test_image_without_face_is_unchanged(which, request):
    fixer = request.getfixturevalue(which)
    src = Image.fromarray(no_face())
    out = fixer(src, 1.0)
    assert out.mode == "RGB" and out.size == src.size
    assert out.tobytes() == src.tobytes()


@pytest.mark.parametrize("which", ["gfpgan", "codeformer"])
def test_face_changes_inside_crop_only(which, request):
    fixer = request.getfixturevalue(which)
    arr = draw_face()
    (box,) = fixer.detector(arr)
    out = np.asarray(fixer(Image.fromarray(arr), 1.0))
    x, y, w, h = box
    inner = np.abs(out[y:y + h, x:x + w].astype(int) - arr[y:y + h, x:x + w]).mean()
    assert inner > 5  # the (random, narrow) restorer replaced the face
    x0, y0, x1, y1 = crop_square(box, arr.shape, fixer)
    outside = np.ones(arr.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any()
    assert np.array_equal(out[outside], arr[outside])
    # the feathered edge: near the crop border the change is smaller than at the centre
    changed = np.any(out != arr, axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1


def test_strength_zero_gives_input_and_blending_scales(gfpgan):
    arr = draw_face()
    src = Image.fromarray(arr)
    assert gfpgan(src, 0.0).tobytes() == src.tobytes()
    full = np.asarray(gfpgan(src, 1.0)).astype(int)
    half = np.asarray(gfpgan(src, 0.5)).astype(int)
    # GFPGAN's output does not depend on strength: half strength is halfway (up to rounding)
    assert np.abs((half - arr) - (full - arr) / 2).max() <= 1.0


def test_codeformer_fidelity_weight_changes_restoration(codeformer):
    crop = cv2.resize(draw_face(), (CROP_SIZE, CROP_SIZE))
    a = codeformer.restore_crop(crop, 0.0)
    b = codeformer.restore_crop(crop, 1.0)
    assert a.shape == (CROP_SIZE, CROP_SIZE, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)


def test_pluggable_detector_and_given_boxes():
    fixer = build_face_fixer("GFPGAN", None, detector=lambda rgb: [])
    arr = no_face(size=(256, 256))
    src = Image.fromarray(arr)
    assert fixer(src, 1.0).tobytes() == src.tobytes()  # the detector found nothing
    box = (96, 96, 64, 64)
    out = np.asarray(fixer(src, 1.0, boxes=[box]))
    assert np.abs(out[96:160, 96:160].astype(int) - arr[96:160, 96:160]).mean() > 5
    x0, y0, x1, y1 = crop_square(box, arr.shape, fixer)
    assert np.array_equal(out[:y0], arr[:y0]) and np.array_equal(out[y1:], arr[y1:])
    assert np.array_equal(out[:, :x0], arr[:, :x0]) and np.array_equal(out[:, x1:], arr[:, x1:])


def test_rgba_keeps_alpha(gfpgan):
    arr = draw_face()
    alpha = np.full(arr.shape[:2], 200, np.uint8)
    src = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    out = gfpgan(src, 1.0)
    assert out.mode == "RGBA"
    assert np.array_equal(np.asarray(out)[..., 3], alpha)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown face fixer"):
        build_face_fixer("RealESRGAN_x4plus", None)


# -- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["GFPGAN", "CodeFormers"])
def test_builtin_weights_round_trip(name, tmp_path):
    net = builtin_network(name)
    again = builtin_network(name)
    sd = net.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())  # seeded
    path = tmp_path / "w.pth"
    torch.save({"params_ema": sd}, path)  # the published files' wrapper
    fixer = build_face_fixer(name, str(path), detector=lambda rgb: [])
    loaded = fixer.net.state_dict()
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    crop = cv2.resize(draw_face(), (CROP_SIZE, CROP_SIZE))
    reference = FaceFixer(name, net, detector=lambda rgb: [])
    assert np.array_equal(fixer.restore_crop(crop, 0.7), reference.restore_crop(crop, 0.7))


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file
    sd = {k: v.contiguous().clone() for k, v in builtin_network("GFPGAN").state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    fixer = build_face_fixer("GFPGAN", str(tmp_path / "w.safetensors"), detector=lambda r: [])
    assert all(torch.equal(fixer.net.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("name", ["GFPGAN", "CodeFormers"])
def test_strict_loading_names_missing_extra_and_misshapen_keys(name):
    sd = dict(builtin_network(name).state_dict())
    missing_key = "final_linear.weight" if name == "GFPGAN" else "idx_pred_layer.1.weight"
    broken = {k: v for k, v in sd.items() if k != missing_key}
    with pytest.raises(ValueError, match=f"missing keys: .*{missing_key}"):
        load_strict(builtin_network(name), broken)
    with pytest.raises(ValueError, match="unexpected keys: .*'bogus.weight'"):
        load_strict(builtin_network(name), {**sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"shape mismatches: .*{missing_key}"):
        load_strict(builtin_network(name), {**sd, missing_key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="not a"):  # the key the config is read from
        build_face_fixer(name, {"params_ema": {"x": torch.zeros(1)}}, detector=lambda r: [])


def test_gfpgan_v14_layout_on_meta():
    with torch.device("meta"):
        net = gfpgan_v14()
    sd = net.state_dict()
    # GFPGANv1.4.pth: 285 tensors, 87,143,276 values (348.6 MB of float32, the file's size)
    assert len(sd) == 285
    assert sum(v.numel() for v in sd.values()) == 87_143_276
    assert sum(p.numel() for p in net.parameters()) == 86_444_252
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv_body_first.weight"] == (32, 3, 1, 1)
    assert shapes["conv_body_down.0.conv2.weight"] == (64, 32, 3, 3)
    assert shapes["conv_body_down.6.skip.weight"] == (256, 256, 1, 1)
    assert shapes["final_conv.weight"] == (256, 256, 3, 3)
    assert shapes["final_linear.weight"] == (16 * 512, 256 * 16)
    assert shapes["conv_body_up.0.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["conv_body_up.6.skip.weight"] == (32, 64, 1, 1)
    assert shapes["toRGB.6.weight"] == (3, 32, 1, 1)
    assert shapes["condition_scale.0.2.weight"] == (256, 256, 3, 3)  # sft_half
    assert shapes["condition_shift.6.0.weight"] == (32, 32, 3, 3)
    assert shapes["stylegan_decoder.style_mlp.15.weight"] == (512, 512)
    assert shapes["stylegan_decoder.constant_input.weight"] == (1, 512, 4, 4)
    assert shapes["stylegan_decoder.style_conv1.modulated_conv.weight"] == (1, 512, 512, 3, 3)
    assert shapes["stylegan_decoder.style_conv1.weight"] == (1,)
    assert shapes["stylegan_decoder.to_rgb1.modulated_conv.modulation.weight"] == (512, 512)
    assert shapes["stylegan_decoder.style_convs.13.modulated_conv.weight"] == (1, 64, 64, 3, 3)
    assert shapes["stylegan_decoder.style_convs.13.bias"] == (1, 64, 1, 1)
    assert shapes["stylegan_decoder.to_rgbs.6.modulated_conv.weight"] == (1, 3, 64, 1, 1)
    assert shapes["stylegan_decoder.to_rgbs.6.bias"] == (1, 3, 1, 1)
    assert shapes["stylegan_decoder.noises.noise0"] == (1, 1, 4, 4)
    assert shapes["stylegan_decoder.noises.noise14"] == (1, 1, 512, 512)
    assert "stylegan_decoder.noises.noise15" not in shapes
    # the builtin narrow network has the same keys
    assert list(builtin_network("GFPGAN").state_dict()) == list(sd)
    # the config read back from a full-size state dict is the published one; it loads strictly
    with torch.device("meta"):
        rebuilt = gfpgan_from_state_dict(sd)
    load_strict(rebuilt, sd, assign=True)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes


def test_codeformer_layout_on_meta():
    with torch.device("meta"):
        net = codeformer_v01()
    sd = net.state_dict()
    # codeformer.pth: 515 tensors, 94,112,707 values (376.5 MB of float32)
    assert len(sd) == 515
    assert sum(v.numel() for v in sd.values()) == 94_112_707
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["position_emb"] == (256, 512)
    assert shapes["feat_emb.weight"] == (512, 256)
    assert shapes["quantize.embedding.weight"] == (1024, 256)
    assert shapes["encoder.blocks.0.weight"] == (64, 3, 3, 3)
    assert shapes["encoder.blocks.3.conv.weight"] == (64, 64, 3, 3)  # downsample
    assert shapes["encoder.blocks.4.conv_out.weight"] == (128, 64, 1, 1)
    assert shapes["encoder.blocks.17.q.weight"] == (512, 512, 1, 1)  # attention at 16x16
    assert shapes["encoder.blocks.23.weight"] == (512,)  # GroupNorm
    assert shapes["encoder.blocks.24.weight"] == (256, 512, 3, 3)
    assert "encoder.blocks.25.weight" not in shapes
    assert shapes["generator.blocks.0.weight"] == (512, 256, 3, 3)
    assert shapes["generator.blocks.8.conv.weight"] == (512, 512, 3, 3)  # upsample
    assert shapes["generator.blocks.9.conv_out.weight"] == (256, 512, 1, 1)
    assert shapes["generator.blocks.21.conv_out.weight"] == (64, 128, 1, 1)
    assert "generator.blocks.12.conv_out.weight" not in shapes
    assert shapes["generator.blocks.24.weight"] == (3, 64, 3, 3)
    assert shapes["ft_layers.8.self_attn.in_proj_weight"] == (1536, 512)
    assert shapes["ft_layers.8.linear1.weight"] == (1024, 512)
    assert "ft_layers.9.norm1.weight" not in shapes
    assert shapes["idx_pred_layer.1.weight"] == (1024, 512)
    assert "idx_pred_layer.1.bias" not in shapes
    assert {k.split(".")[1] for k in shapes if k.startswith("fuse_convs_dict.")} == \
        {"32", "64", "128", "256"}
    assert shapes["fuse_convs_dict.32.encode_enc.conv1.weight"] == (256, 512, 3, 3)
    assert shapes["fuse_convs_dict.256.encode_enc.conv_out.weight"] == (128, 256, 1, 1)
    assert shapes["fuse_convs_dict.256.shift.2.weight"] == (128, 128, 3, 3)
    assert list(builtin_network("CodeFormers").state_dict()) == list(sd)
    with torch.device("meta"):
        rebuilt = codeformer_from_state_dict(sd)
    load_strict(rebuilt, sd, assign=True)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
