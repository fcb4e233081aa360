"""models.postprocess.background: rembg's u2net steps through onnxruntime, checked with tiny ONNX
models built here with onnx's helper API whose outputs are known functions of their input (the
published u2net.onnx cannot be downloaded in tests)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from models.postprocess.background import MEAN, SIZE, STD, BackgroundModelError, BackgroundRemover, default_providers

X_SHAPE = [1, 3, SIZE, SIZE]
Y_SHAPE = [1, 1, SIZE, SIZE]


def save_model(path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def red_model(path, x_shape=X_SHAPE):
    """First output: the (normalised) red channel of the input. A second output, its negation, is
    there to show that only the first output is used (u2net has 7; the first is the fused map)."""
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s", 0), ("e", 1), ("a", 1))]
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a"], ["y"]), helper.make_node("Neg", ["y"], ["z"])]
    return save_model(path, nodes, [f32("x", x_shape)], [f32("y", Y_SHAPE), f32("z", Y_SHAPE)], inits)


def conv_sigmoid_model(path, weights=(1.0, -1.0, 0.0), bias=0.0):
    """A u2net-shaped net: 1x1 conv over the 3 channels, then sigmoid."""
    w = numpy_helper.from_array(np.array(weights, np.float32).reshape(1, 3, 1, 1), "w")
    b = numpy_helper.from_array(np.array([bias], np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["y"])]
    return save_model(path, nodes, [f32("x", X_SHAPE)], [f32("y", Y_SHAPE)], [w, b])


@pytest.fixture
def red(tmp_path):
    return BackgroundRemover(red_model(tmp_path / "red.onnx"))


def halves(size=(200, 120), left=(255, 0, 0), right=(0, 0, 255)):
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def test_rgba_same_size_rgb_unchanged_and_input_untouched(red):
    img = halves()
    before = np.asarray(img).copy()
    out = red.remove(img)
    assert out.mode == "RGBA" and out.size == img.size
    assert np.array_equal(np.asarray(out)[..., :3], before)
    assert np.array_equal(np.asarray(img), before) and img.mode == "RGB"


def test_alpha_follows_model_output_red_is_kept(red):
    """The model outputs the red channel: the red half becomes opaque, the blue half transparent."""
    out = np.asarray(red.remove(halves()))
    alpha = out[..., 3].astype(int)
    assert (alpha[:, :90] >= 250).all()  # away from the seam, where LANCZOS rings
    assert (alpha[:, 110:] <= 5).all()
    # and the other way round: blue on the left is transparent
    alpha = np.asarray(red.remove(halves(left=(0, 0, 255), right=(255, 0, 0))))[..., 3].astype(int)
    assert (alpha[:, :90] <= 5).all() and (alpha[:, 110:] >= 250).all()


def test_alpha_is_min_max_normalised_output_exactly_at_model_size(red):
    """At 320x320 both resizes are identities, so alpha = uint8(255 * (R - Rmin) / (Rmax - Rmin))
    of the model's output (the normalised red channel, an affine function of R). The min-max
    normalisation removes both the / max and the mean/std. 255 * k / 160 is a multiple of 1/32:
    where it is not a whole number it is truncated exactly; where it is, float32 rounding may
    land just below it and truncate to one less."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rgb[..., 0] = rng.integers(40, 201, (SIZE, SIZE))  # red in 40..200, not the full range
    rgb[0, 0, 0], rgb[0, 1, 0] = 40, 200
    alpha = np.asarray(red.remove(Image.fromarray(rgb)))[..., 3].astype(int)
    r = rgb[..., 0].astype(float)
    want = 255 * (r - 40) / 160
    assert np.abs(alpha - want).max() <= 1
    assert alpha[0, 0] == 0 and alpha[0, 1] == 255
    fractional = want != np.round(want)
    assert fractional.mean() > 0.9
    assert np.array_equal(alpha[fractional], np.floor(want[fractional]))
    assert np.isin(alpha[~fractional] - want[~fractional], (0, -1)).all()


def test_conv_sigmoid_model_matches_a_numpy_reference(tmp_path):
    """rembg's preprocessing (/ max, ImageNet mean/std) done by hand, through a known 1x1 conv +
    sigmoid, min-max normalised: the mask agrees to within the uint8 truncation."""
    remover = BackgroundRemover(conv_sigmoid_model(tmp_path / "cs.onnx", weights=(1.0, -1.0, 0.5), bias=0.2))
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 200, (SIZE, SIZE, 3), dtype=np.uint8)  # max 199: the / max matters
    x = (rgb / rgb.max() - np.array(MEAN)) / np.array(STD)
    y = 1 / (1 + np.exp(-(x[..., 0] - x[..., 1] + 0.5 * x[..., 2] + 0.2)))
    want = 255 * (y - y.min()) / (y.max() - y.min())
    mask = np.asarray(remover.mask(Image.fromarray(rgb))).astype(float)
    assert np.abs(mask - want).max() <= 1.0001


def test_rgba_input_alpha_is_replaced_rgb_kept(red):
    img = halves().convert("RGBA")
    img.putalpha(77)
    out = np.asarray(red.remove(img))
    assert np.array_equal(out[..., :3], np.asarray(img)[..., :3])
    assert out[:, :90, 3].min() >= 250 and out[:, 110:, 3].max() <= 5
    assert np.asarray(img)[..., 3].max() == 77  # the caller's image is untouched


def test_constant_output_and_black_image_give_a_transparent_image_without_nans(red):
    for img in (Image.new("RGB", (64, 48), (0, 0, 0)), Image.new("RGB", (64, 48), (10, 200, 30))):
        out = np.asarray(red.remove(img))
        assert out.shape == (48, 64, 4) and (out[..., 3] == 0).all()


def test_symbolic_dimensions_are_accepted(tmp_path):
    remover = BackgroundRemover(red_model(tmp_path / "dyn.onnx", x_shape=["batch", 3, SIZE, SIZE]))
    assert remover.remove(halves()).mode == "RGBA"


def test_cpu_provider_is_used_here(red):
    assert default_providers()[-1] == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in red.providers


@pytest.mark.parametrize("case", ["input_256", "output_3ch", "output_small", "two_inputs", "int_input"])
def test_wrong_contract_is_refused(tmp_path, case):
    path = tmp_path / f"{case}.onnx"
    if case == "input_256":
        save_model(path, [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)],
                   [f32("x", [1, 3, 256, 256])], [f32("y", [1, 1, 256, 256])])
        match = "input .*256"
    elif case == "output_3ch":
        save_model(path, [helper.make_node("Sigmoid", ["x"], ["y"])], [f32("x", X_SHAPE)], [f32("y", X_SHAPE)])
        match = "first output"
    elif case == "output_small":
        save_model(path, [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                          helper.make_node("ReduceMean", ["p"], ["y"], axes=[1], keepdims=1)],
                   [f32("x", X_SHAPE)], [f32("y", [1, 1, 160, 160])])
        match = "first output"
    elif case == "two_inputs":
        save_model(path, [helper.make_node("Add", ["x", "x2"], ["s"]),
                          helper.make_node("ReduceMean", ["s"], ["y"], axes=[1], keepdims=1)],
                   [f32("x", X_SHAPE), f32("x2", X_SHAPE)], [f32("y", Y_SHAPE)])
        match = "exactly one input"
    else:
        save_model(path, [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
                          helper.make_node("ReduceMean", ["c"], ["y"], axes=[1], keepdims=1)],
                   [helper.make_tensor_value_info("x", TensorProto.INT64, X_SHAPE)], [f32("y", Y_SHAPE)])
        match = "float input"
    with pytest.raises(BackgroundModelError, match=match) as e:
        BackgroundRemover(path)
    assert str(path) in str(e.value) and isinstance(e.value, ValueError)


def test_unreadable_or_missing_file_is_refused(tmp_path):
    bad = tmp_path / "u2net.onnx"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer, say
    with pytest.raises(BackgroundModelError, match="not a loadable ONNX model"):
        BackgroundRemover(bad)
    with pytest.raises(BackgroundModelError, match="does not exist"):
        BackgroundRemover(tmp_path / "missing.onnx")
