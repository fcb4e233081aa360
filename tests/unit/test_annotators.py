"""ControlNet annotators (models/annotators): map shapes, the weightless rules, strict loading
of published files, the published key layouts, and the OpenPose grouping/drawing code."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pydantic import ValidationError

from models.annotators import (
    CONTROL_TYPES,
    Annotator,
    AnnotatorWeights,
    WeightsMismatch,
    build_annotator,
)
from models.annotators import depth as depth_mod
from models.annotators import hed, mlsd, seg
from models.annotators import openpose as op
from models.annotators.common import save_state_dict_file

torch.set_num_threads(1)


def _scene(w: int = 200, h: int = 136) -> Image.Image:
    """Shapes and a gradient: something every annotator has edges/lines/regions to find."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    arr = np.broadcast_to(x, (h, w, 3)).astype(np.uint8).copy()
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    d.rectangle((20, 20, 90, 100), fill=(10, 40, 200))
    d.ellipse((110, 30, 180, 110), fill=(230, 200, 30))
    d.line((0, 130, 199, 60), fill=(0, 0, 0), width=3)
    return img


# ---------------------------------------------------------------- every control type


@pytest.mark.parametrize("control_type", CONTROL_TYPES)
def test_every_control_type_returns_an_rgb_map_of_the_input_size(control_type):
    ann = build_annotator(control_type)
    assert isinstance(ann, Annotator)
    img = _scene()
    out = ann(img)
    assert out.mode == "RGB" and out.size == img.size
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.shape == (img.size[1], img.size[0], 3)
    # RGBA and greyscale inputs work too
    assert ann(img.convert("RGBA")).size == img.size
    assert ann(img.convert("L")).mode == "RGB"


def test_unknown_control_type_is_refused():
    with pytest.raises(ValueError, match="unknown control type"):
        build_annotator("lineart")


def test_build_is_cached_per_type_and_weights():
    a = build_annotator("hed")
    assert build_annotator("hed", AnnotatorWeights(kind="builtin")) is a
    assert build_annotator("hed", AnnotatorWeights(kind="builtin", seed=3)) is not a
    assert build_annotator("canny") is build_annotator("canny")


def test_weights_spec_is_validated():
    with pytest.raises(ValidationError):
        AnnotatorWeights(kind="file")
    with pytest.raises(ValidationError):
        AnnotatorWeights(kind="builtin", repo="lllyasviel/Annotators")
    with pytest.raises(ValidationError):
        AnnotatorWeights(kind="huggingface", path="/x.pth")


# ---------------------------------------------------------------- weightless rules


def test_canny_equals_opencv_canny_100_200():
    img = _scene(256, 192)
    out = np.asarray(build_annotator("canny")(img))
    gray = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(gray, 100, 200)
    assert expected.any()
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], expected)


def test_scribble_darkest_channel_below_127_becomes_white():
    px = np.array([[[200, 200, 126], [127, 200, 200], [0, 0, 0], [255, 255, 255],
                    [126, 255, 255], [127, 127, 127]]], dtype=np.uint8)
    out = np.asarray(build_annotator("scribble")(Image.fromarray(px)))
    assert out[0, :, 0].tolist() == [255, 0, 255, 0, 255, 0]
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


# ---------------------------------------------------------------- HED / fake scribbles


def test_fakescribbles_is_binary_and_thins_thick_edges():
    edges = np.zeros((96, 96), np.uint8)
    edges[:, 40:56] = 255  # a 16 px wide band
    out = hed.fake_scribble(edges)
    assert set(np.unique(out)) <= {0, 255}
    # non-maximum suppression keeps a pixel only where it is the maximum of its 3-pixel line
    # in some direction: a uniform band (flat along its length) stays, a slope goes
    assert hed.thin(edges)[48, 44:52].min() == 255
    yy, xx = np.mgrid[0:96, 0:96]
    slope = (128 + xx + yy // 2).astype(np.uint8)
    assert not hed.thin(slope)[20:76, 20:76].any()
    assert not hed.thin((edges // 2))[48].any()  # below the threshold 127 after the blur
    assert out[48, 40:56].all() and not out[:, :10].any()
    full = np.asarray(build_annotator("fakescribbles")(_scene()))
    assert set(np.unique(full)) <= {0, 255}


def test_hed_edge_map_is_sigmoid_of_mean_projection():
    class Const(torch.nn.Module):
        norm = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))

        def forward(self, x):
            h, w = x.shape[2:]
            return [torch.full((1, 1, h // 2 ** i, w // 2 ** i), float(v))
                    for i, v in enumerate((0, 0, 0, 0, 5))]

    out = hed.hed_edges(Const(), np.zeros((64, 64, 3), np.uint8))
    assert out.shape == (64, 64)
    assert abs(int(out[10, 10]) - int(255 / (1 + math.exp(-1.0)))) <= 1


# ---------------------------------------------------------------- strict loading


def _networks(ann):
    if isinstance(ann, op.OpenPoseAnnotator):
        return {"body": ann.body, "hand": ann.hand}
    return {"net": ann.net}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("control_type", ["hed", "hough", "openpose"])
def test_builtin_weights_round_trip_through_published_file_loading(tmp_path, control_type, suffix):
    builtin = build_annotator(control_type)
    nets = _networks(builtin)
    for name, net in nets.items():
        save_state_dict_file(net.state_dict(), tmp_path / f"{name}{suffix}")
    kw = {"path": str(tmp_path / f"{list(nets)[0]}{suffix}")}
    if control_type == "openpose":
        kw["hand_path"] = str(tmp_path / f"hand{suffix}")
    loaded = build_annotator(control_type, AnnotatorWeights(kind="file", **kw))
    assert loaded is not builtin
    torch.manual_seed(0)
    x = torch.rand(1, 4 if control_type == "hough" else 3, 64, 64) * 255
    for name, net in _networks(loaded).items():
        with torch.inference_mode():
            a, b = nets[name](x), net(x)
        for ta, tb in zip(a if isinstance(a, (list, tuple)) else [a],
                          b if isinstance(b, (list, tuple)) else [b]):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    img = _scene()
    np.testing.assert_array_equal(np.asarray(builtin(img)), np.asarray(loaded(img)))


def test_half_precision_file_loads_into_float32(tmp_path):
    """ControlNetHED.pth is published in fp16."""
    net = build_annotator("hed").net
    save_state_dict_file({k: v.half() for k, v in net.state_dict().items()}, tmp_path / "h.pth")
    loaded = build_annotator("hed", AnnotatorWeights(kind="file", path=str(tmp_path / "h.pth"))).net
    assert loaded.norm.dtype == torch.float32
    torch.testing.assert_close(loaded.norm, net.norm.half().float())


def test_strict_loading_names_missing_extra_and_misshapen_keys(tmp_path):
    sd = build_annotator("hed").net.state_dict()
    missing = {k: v for k, v in sd.items() if k != "block3.convs.1.bias"}
    save_state_dict_file(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatch, match=r"missing keys: block3\.convs\.1\.bias"):
        build_annotator("hed", AnnotatorWeights(kind="file", path=str(tmp_path / "missing.pth")))
    extra = dict(sd, **{"block6.projection.weight": torch.zeros(1, 64, 1, 1)})
    save_state_dict_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsMismatch, match=r"unexpected keys: block6\.projection\.weight"):
        build_annotator("hed", AnnotatorWeights(kind="file",
                                                path=str(tmp_path / "extra.safetensors")))
    bad = dict(sd, **{"block2.projection.bias": torch.zeros(2)})
    save_state_dict_file(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatch, match=r"block2\.projection\.bias: file \(2,\)"):
        build_annotator("hed", AnnotatorWeights(kind="file", path=str(tmp_path / "bad.pth")))
    # the openpose hand file is checked as strictly
    body = build_annotator("openpose").body.state_dict()
    hand = {k: v for k, v in build_annotator("openpose").hand.state_dict().items()
            if not k.startswith("Mconv7_stage6")}
    save_state_dict_file(body, tmp_path / "body.pth")
    save_state_dict_file(hand, tmp_path / "hand.pth")
    with pytest.raises(WeightsMismatch, match=r"Mconv7_stage6\.bias"):
        build_annotator("openpose", AnnotatorWeights(kind="file", path=str(tmp_path / "body.pth"),
                                                     hand_path=str(tmp_path / "hand.pth")))


def test_batchnorm_counters_are_optional_but_other_buffers_are_not(tmp_path):
    sd = build_annotator("hough").net.state_dict()
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    save_state_dict_file(no_counters, tmp_path / "m.pth")
    build_annotator("hough", AnnotatorWeights(kind="file", path=str(tmp_path / "m.pth")))
    no_var = {k: v for k, v in sd.items() if k != "block23.conv1.1.running_var"}
    save_state_dict_file(no_var, tmp_path / "n.pth")
    with pytest.raises(WeightsMismatch, match=r"block23\.conv1\.1\.running_var"):
        build_annotator("hough", AnnotatorWeights(kind="file", path=str(tmp_path / "n.pth")))


# ---------------------------------------------------------------- published key layouts


def _conv(name, cin, cout, k):
    return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _layout(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_hed_full_size_matches_controlnethed_pth_layout():
    expected = {"norm": (1, 3, 1, 1)}
    cin = 3
    for b, (width, n) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for i in range(n):
            expected.update(_conv(f"block{b}.convs.{i}", cin if i == 0 else width, width, 3))
        expected.update(_conv(f"block{b}.projection", width, 1, 1))
        cin = width
    with torch.device("meta"):
        net = hed.HEDNet()
    assert _layout(net) == expected
    assert len(expected) == 37


def test_openpose_body_full_size_matches_body_pose_model_pth_layout():
    expected = {}
    vgg = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
           ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
           ("conv3_4", 256, 256), ("conv4_1", 256, 512), ("conv4_2", 512, 512),
           ("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, 128)]
    for name, cin, cout in vgg:
        expected.update(_conv(name, cin, cout, 3))
    for branch, out in ((1, 38), (2, 19)):
        for i in (1, 2, 3):
            expected.update(_conv(f"conv5_{i}_CPM_L{branch}", 128, 128, 3))
        expected.update(_conv(f"conv5_4_CPM_L{branch}", 128, 512, 1))
        expected.update(_conv(f"conv5_5_CPM_L{branch}", 512, out, 1))
        for s in range(2, 7):
            expected.update(_conv(f"Mconv1_stage{s}_L{branch}", 185, 128, 7))
            for i in (2, 3, 4, 5):
                expected.update(_conv(f"Mconv{i}_stage{s}_L{branch}", 128, 128, 7))
            expected.update(_conv(f"Mconv6_stage{s}_L{branch}", 128, 128, 1))
            expected.update(_conv(f"Mconv7_stage{s}_L{branch}", 128, out, 1))
    with torch.device("meta"):
        net = op.BodyPoseNet()
    assert _layout(net) == expected
    assert sum(math.prod(s) for s in expected.values()) == 52_311_446  # 209 MB in fp32


def test_openpose_hand_full_size_matches_hand_pose_model_pth_layout():
    expected = {}
    vgg = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
           ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
           ("conv3_4", 256, 256), ("conv4_1", 256, 512), ("conv4_2", 512, 512),
           ("conv4_3", 512, 512), ("conv4_4", 512, 512), ("conv5_1", 512, 512),
           ("conv5_2", 512, 512), ("conv5_3_CPM", 512, 128)]
    for name, cin, cout in vgg:
        expected.update(_conv(name, cin, cout, 3))
    expected.update(_conv("conv6_1_CPM", 128, 512, 1))
    expected.update(_conv("conv6_2_CPM", 512, 22, 1))
    for s in range(2, 7):
        expected.update(_conv(f"Mconv1_stage{s}", 150, 128, 7))
        for i in (2, 3, 4, 5):
            expected.update(_conv(f"Mconv{i}_stage{s}", 128, 128, 7))
        expected.update(_conv(f"Mconv6_stage{s}", 128, 128, 1))
        expected.update(_conv(f"Mconv7_stage{s}", 128, 22, 1))
    with torch.device("meta"):
        net = op.HandPoseNet()
    assert _layout(net) == expected
    assert sum(math.prod(s) for s in expected.values()) == 36_832_324  # 147 MB in fp32


def test_mlsd_large_full_size_key_layout():
    with torch.device("meta"):
        layout = _layout(mlsd.MLSDLarge())
    expected = {
        "backbone.features.0.0.weight": (32, 4, 3, 3),
        "backbone.features.0.1.running_var": (32,),
        "backbone.features.1.conv.0.0.weight": (32, 1, 3, 3),
        "backbone.features.1.conv.1.weight": (16, 32, 1, 1),
        "backbone.features.1.conv.2.weight": (16,),
        "backbone.features.2.conv.0.0.weight": (96, 16, 1, 1),
        "backbone.features.2.conv.1.0.weight": (96, 1, 3, 3),
        "backbone.features.2.conv.2.weight": (24, 96, 1, 1),
        "backbone.features.13.conv.0.0.weight": (576, 96, 1, 1),
        "backbone.features.13.conv.3.num_batches_tracked": (),
        "block15.conv1.0.weight": (64, 96, 1, 1),
        "block15.conv2.0.weight": (64, 64, 1, 1),
        "block16.conv1.0.weight": (128, 128, 3, 3),
        "block16.conv2.0.weight": (64, 128, 3, 3),
        "block17.conv2.0.weight": (64, 32, 1, 1),
        "block19.conv2.0.weight": (64, 24, 1, 1),
        "block21.conv2.0.weight": (64, 16, 1, 1),
        "block23.conv1.0.weight": (64, 64, 3, 3),
        "block23.conv3.weight": (16, 64, 1, 1),
        "block23.conv3.bias": (16,),
    }
    assert {k: layout.get(k) for k in expected} == expected
    assert not any(k.startswith("backbone.features.14") for k in layout)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(math.prod(s) for k, s in layout.items() if not k.endswith(stats)) == 1_533_680


def test_mlsd_output_is_nine_channels_at_half_resolution():
    out = build_annotator("hough").net(torch.zeros(1, 4, 64, 96))
    assert out.shape == (1, 9, 32, 48)


def test_mlsd_decoding_turns_a_centre_and_displacements_into_a_line():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            tp = torch.full((1, 9, x.shape[2] // 2, x.shape[3] // 2), -10.0)
            tp[0, 1:5] = 0
            tp[0, 0, 16, 20] = 5.0  # centre at (x=20, y=16) in the half-size map
            tp[0, 1:5, 16, 20] = torch.tensor([-10.0, 0.0, 10.0, 0.0])
            return tp

    lines = mlsd.detect_lines(Fixed(), np.zeros((64, 96, 3), np.uint8))
    np.testing.assert_allclose(lines, [[20.0, 32.0, 60.0, 32.0]])
    canvas = mlsd.draw_lines(lines, 96, 64)
    assert canvas[32, 20:61].min() == 255 and canvas.sum() // 255 == 41


# ---------------------------------------------------------------- depth / normal / seg


def test_normals_from_depth_gradients_and_background_threshold():
    depth = np.tile(np.linspace(0, 10, 64, dtype=np.float32), (64, 1))  # rises to the right
    depth[:, :8] = np.arange(8) * 0.05  # background: sloped, but under 10% of the range
    d, n = depth_mod.depth_and_normal(depth)
    assert d.min() == 0 and d.max() == 255
    assert tuple(n[32, 2]) == (127, 127, 255)  # flat background: (0, 0, 1)
    assert n[32, 40, 0] > 127 and n[32, 40, 1] == 127 and n[32, 40, 2] > 127


def test_depth_map_is_grey():
    out = np.asarray(build_annotator("depth")(_scene()))
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


def test_ade20k_palette():
    pal = seg.ADE20K_PALETTE
    assert len(pal) == 150 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in pal)
    # the published table has 149 distinct colours: road (6) and skyscraper (48) share one
    assert len(set(pal)) == 149
    dupes = [i for i, c in enumerate(pal) if pal.count(c) > 1]
    assert dupes == [6, 48] and pal[6] == (140, 140, 140)
    assert pal[0] == (120, 120, 120) and pal[2] == (6, 230, 230) and pal[149] == (92, 0, 255)
    assert sum(sum(c) for c in pal) == 58_427
    classes = np.array([[0, 2], [149, 6]])
    assert seg.colorize(classes).tolist() == [[[120, 120, 120], [6, 230, 230]],
                                              [[92, 0, 255], [140, 140, 140]]]


def test_seg_map_uses_only_palette_colours():
    out = np.asarray(build_annotator("seg")(_scene()))
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= set(seg.ADE20K_PALETTE)


# ---------------------------------------------------------------- openpose


# A standing person (x, y) for the 18 COCO parts: nose, neck, r shoulder, r elbow, r wrist,
# l shoulder, l elbow, l wrist, r hip, r knee, r ankle, l hip, l knee, l ankle, r eye, l eye,
# r ear, l ear.
PERSON = np.array([[100, 40], [100, 70], [80, 70], [70, 100], [65, 130], [120, 70], [130, 100],
                   [135, 130], [88, 130], [86, 170], [85, 210], [112, 130], [114, 170],
                   [115, 210], [95, 35], [105, 35], [90, 38], [110, 38]], dtype=np.float64)


# The COCO-18 limbs (1-based parts) and their PAF channels in the published network's output
# (counted from 19, the heatmaps coming first in OpenPose's numbering).
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
         (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
PAF_CHANNELS = ((31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22),
                (23, 24), (25, 26), (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52),
                (55, 56), (37, 38), (45, 46))


def test_openpose_limb_tables():
    assert op.LIMB_SEQ == LIMBS and op.MAP_IDX == PAF_CHANNELS


def _person_maps(h: int = 240, w: int = 200) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((h, w, 19), np.float32)
    for i, (x, y) in enumerate(PERSON):
        heat[:, :, i] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0 ** 2))
    paf = np.zeros((h, w, 38), np.float32)
    for (a, b), (mx, my) in zip(LIMBS, PAF_CHANNELS):
        pa, pb = PERSON[a - 1], PERSON[b - 1]
        v = (pb - pa) / np.linalg.norm(pb - pa)
        # pixels within 3 px of the segment carry the limb's unit vector
        t = np.clip(((xx - pa[0]) * v[0] + (yy - pa[1]) * v[1]) / np.linalg.norm(pb - pa), 0, 1)
        px, py = pa[0] + t * (pb - pa)[0], pa[1] + t * (pb - pa)[1]
        near = (xx - px) ** 2 + (yy - py) ** 2 <= 9
        paf[:, :, mx - 19][near] = v[0]
        paf[:, :, my - 19][near] = v[1]
    return heat, paf


def test_openpose_peaks_and_paf_grouping_recover_one_person():
    heat, paf = _person_maps()
    peaks = op.find_body_peaks(heat)
    assert [len(p) for p in peaks] == [1] * 18
    candidate, subset = op.group_people(peaks, op.connect_limbs(peaks, paf, heat.shape[0]))
    assert len(subset) == 1 and subset[0, -1] == 18
    found = candidate[subset[0, :18].astype(int), :2]
    np.testing.assert_allclose(found, PERSON, atol=1)


def test_openpose_two_people_are_kept_apart():
    heat1, paf1 = _person_maps(240, 400)
    shift = 200
    heat = heat1.copy()
    heat[:, shift:] = np.maximum(heat[:, shift:], heat1[:, : 400 - shift])
    paf = paf1.copy()
    paf[:, shift:] += paf1[:, : 400 - shift]
    peaks = op.find_body_peaks(heat)
    candidate, subset = op.group_people(peaks, op.connect_limbs(peaks, paf, 240))
    assert len(subset) == 2
    xs = sorted(candidate[int(p[1]), 0] for p in subset)  # necks
    assert xs == [100, 300]


def test_openpose_drawing_renders_a_skeleton():
    candidate = np.concatenate([PERSON, np.ones((18, 1)), np.arange(18)[:, None]], axis=1)
    subset = np.concatenate([np.arange(18), [30.0, 18]])[None]
    canvas = op.draw_body(np.zeros((240, 200, 3), np.uint8), candidate, subset)
    for x, y in PERSON.astype(int):
        assert canvas[y, x].any()  # every keypoint is drawn
    # limb 0 (neck -> right shoulder) at its midpoint: colour 0 (red) blended at 60%
    assert tuple(canvas[70, 90]) == (153, 0, 0)
    # limb 12 (neck -> nose) in colour 12, blue
    assert tuple(canvas[55, 100]) == (0, 0, 153)
    assert not canvas[5:25, 150:195].any()  # background stays black
    hand = np.array([[20, 100]] + [[20 + 5 * (i % 4 + 1), 100 - 10 * (i // 4 + 1)]
                                   for i in range(20)])
    canvas = op.draw_hands(np.zeros((120, 80, 3), np.uint8), [hand])
    assert tuple(canvas[100, 20]) == (0, 0, 255)  # keypoints are blue dots
    assert canvas[85:95].any()
    # a missing keypoint (0, 0) draws nothing
    hand[1:] = 0
    assert op.draw_hands(np.zeros((120, 80, 3), np.uint8), [hand])[:50].sum() == 0


def test_hand_boxes_follow_the_forearm():
    candidate = np.concatenate([PERSON, np.ones((18, 1)), np.arange(18)[:, None]], axis=1)
    subset = np.concatenate([np.arange(18), [30.0, 18]])[None]
    boxes = op.hand_boxes(candidate, subset, 200, 240)
    assert len(boxes) == 2
    for x, y, side, is_left in boxes:
        wrist = PERSON[7 if is_left else 4]
        assert x <= wrist[0] <= x + side and y <= wrist[1] <= y + side and side >= 20


def test_openpose_hand_keypoint_is_the_peak_of_the_strongest_region():
    class Heat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            h, w = x.shape[2] // 8, x.shape[3] // 8
            out = torch.zeros(1, 22, h, w)
            out[0, 0, h // 2 - 1:h // 2 + 2, w // 4 - 1:w // 4 + 2] = 1.0  # keypoint 0
            out[0, 0, 1, w - 2] = 0.5  # a weaker second region, ignored
            return out

    peaks = op.detect_hand(Heat(), np.zeros((64, 64, 3), np.uint8))
    assert peaks.shape == (21, 2)
    assert abs(peaks[0, 0] - 16) <= 4 and abs(peaks[0, 1] - 32) <= 4
    assert (peaks[1:] == 0).all()


@pytest.mark.parametrize("control_type", ["depth", "seg"])
def test_transformers_annotators_load_a_save_pretrained_folder(tmp_path, control_type):
    builtin = build_annotator(control_type)
    builtin.model.save_pretrained(tmp_path / "m")
    loaded = build_annotator(control_type, AnnotatorWeights(kind="file", path=str(tmp_path / "m")))
    assert loaded is not builtin
    img = _scene()
    np.testing.assert_array_equal(np.asarray(builtin(img)), np.asarray(loaded(img)))
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="save_pretrained folder"):
        build_annotator(control_type, AnnotatorWeights(kind="file", path=str(tmp_path / "x.pth")))
