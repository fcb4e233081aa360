"""models.qr: request rules, rendered layers that real decoders read, and the scan-guaranteeing
blend. Every render is checked by decoding it with zxing-cpp or by reading its pixels at
positions computed from the QR geometry, not from the module's own bookkeeping."""

import numpy as np
import pytest
import segno
from PIL import Image

from models.qr import (DRAWERS, QrRequest, QrRequestError, blend_until_scans, decode, render_layers,
                       scans)

URL = "https://aihorde.net"  # version 3 at error correction H: 29 modules


def req(**refs):
    return QrRequest.from_extra_texts([{"text": str(v), "reference": k} for k, v in refs.items()], "a castle")


# -- request ---------------------------------------------------------------------------------

def test_missing_qr_code_is_refused_naming_extra_texts():
    for texts in ([], [{"text": "https", "reference": "protocol"}], [{"text": "", "reference": "qr_code"}]):
        with pytest.raises(QrRequestError) as e:
            QrRequest.from_extra_texts(texts, "p")
        assert e.value.field == "extra_texts" and "qr_code" in e.value.message
        assert isinstance(e.value, ValueError)


def test_unknown_and_repeated_references_are_refused():
    with pytest.raises(QrRequestError, match="x_ofset") as e:
        req(qr_code="hi", x_ofset=64)
    assert e.value.field == "extra_texts"
    with pytest.raises(QrRequestError, match="twice"):
        QrRequest.from_extra_texts([{"text": "a", "reference": "qr_code"}, {"text": "b", "reference": "qr_code"}], "p")
    with pytest.raises(QrRequestError, match="text, reference"):
        QrRequest.from_extra_texts([{"text": "a", "reference": "qr_code", "extra": 1}], "p")


def test_defaults_and_function_layer_prompt():
    r = req(qr_code="hello")
    assert (r.content, r.protocol, r.module_drawer, r.x_offset, r.y_offset, r.qr_border) == \
        ("hello", "none", "square", None, None, 1)
    assert r.function_layer_prompt == "a castle"
    assert req(qr_code="x", function_layer_prompt="a maze").function_layer_prompt == "a maze"
    assert req(qr_code="x", module_drawer="Gapped_Square").module_drawer == "gapped square"


def test_protocol_prefixes_only_when_there_is_no_scheme():
    assert req(qr_code="aihorde.net", protocol="https").content == "https://aihorde.net"
    assert req(qr_code="aihorde.net", protocol="HTTP").content == "http://aihorde.net"
    assert req(qr_code="ftp://x.org/f", protocol="https").content == "ftp://x.org/f"
    assert req(qr_code="aihorde.net", protocol="none").content == "aihorde.net"
    with pytest.raises(QrRequestError, match="protocol"):
        req(qr_code="x", protocol="gopher")


def test_offsets_floor_to_64_and_zero_centres():
    r = req(qr_code="x", x_offset=100, y_offset=127)
    assert (r.x_offset, r.y_offset) == (64, 64)
    assert req(qr_code="x", x_offset=63, y_offset=0).x_offset is None  # floors to 0: centred
    assert req(qr_code="x", x_offset=128).y_offset is None
    for bad in ("-64", "1.5", "ten", "99999999"):
        with pytest.raises(QrRequestError, match="x_offset"):
            req(qr_code="x", x_offset=bad)


def test_bounds():
    assert req(qr_code="x", qr_border=0).qr_border == 0
    assert req(qr_code="x", qr_border=10).qr_border == 10
    with pytest.raises(QrRequestError, match="qr_border"):
        req(qr_code="x", qr_border=11)
    with pytest.raises(QrRequestError, match="at most 20"):
        QrRequest.from_extra_texts([{"text": "x", "reference": "qr_code"}] * 21, "p")
    with pytest.raises(QrRequestError, match="2000"):
        req(qr_code="x" * 2001)
    with pytest.raises(QrRequestError, match="too long"):  # fits extra_texts, not version 40-H
        req(qr_code="x" * 2000)
    with pytest.raises(QrRequestError, match="module_drawer"):
        req(qr_code="x", module_drawer="hexagon")
    with pytest.raises(Exception):  # strict: no str -> int coercion when built directly
        QrRequest(content="x", qr_border="1")


# -- rendering -------------------------------------------------------------------------------

@pytest.mark.parametrize("drawer", DRAWERS)
@pytest.mark.parametrize("size", [512, 1024])
def test_each_drawer_decodes(drawer, size):
    layers = render_layers(req(qr_code=URL, module_drawer=drawer), size, size)
    assert layers.code.size == layers.modules.size == layers.finders.size == layers.finder_mask.size == (size, size)
    assert decode(layers.code) == [URL]
    assert decode(layers.modules) == []  # without finders nothing locates the code


@pytest.mark.parametrize("drawer", DRAWERS)
def test_every_module_centre_matches_segno(drawer):
    """Whatever the shape, each module's centre (where decoders sample) is dark exactly where
    segno's matrix is dark, and the shapes really differ between drawers."""
    border = 1
    layers = render_layers(req(qr_code=URL, module_drawer=drawer, qr_border=border), 512, 512)
    code = np.asarray(layers.code.convert("L"))
    m = np.array(segno.make(URL, error="h", micro=False).matrix, dtype=bool)
    x0 = layers.box[0] + border * 16
    centres = code[x0 + 8:x0 + 16 * len(m):16, x0 + 8:x0 + 16 * len(m):16]  # centred: same x and y
    assert centres.shape == m.shape
    assert ((centres == 0) == m).all()
    # where two dark data modules touch, the shape decides whether they join or leave a gap
    n = len(m)
    finder = np.zeros_like(m)
    finder[:8, :8] = finder[:8, n - 8:] = finder[n - 8:, :8] = True
    data = m & ~finder
    pairs_h = [(r, c) for r in range(n) for c in range(n - 1) if data[r, c] and data[r, c + 1]]
    pairs_v = [(r, c) for r in range(n - 1) for c in range(n) if data[r, c] and data[r + 1, c]]
    joined_h = {code[x0 + 16 * r + 8, x0 + 16 * (c + 1) + dx] == 0 for r, c in pairs_h for dx in (-1, 0)}
    joined_v = {code[x0 + 16 * (r + 1) + dy, x0 + 16 * c + 8] == 0 for r, c in pairs_v for dy in (-1, 0)}
    expect = {"square": (True, True), "rounded": (True, True), "gapped square": (False, False),
              "vertical bars": (False, True), "horizontal bars": (True, False)}
    if drawer in expect:
        assert (joined_h, joined_v) == tuple({e} for e in expect[drawer])
    if drawer in ("square", "rounded"):  # joined edge to edge: the corners along the seam are square
        assert all(code[x0 + 16 * r + dy, x0 + 16 * (c + 1) + dx] == 0
                   for r, c in pairs_h for dx in (-1, 0) for dy in (0, 15))
    if drawer in ("rounded", "circle"):  # a lone module's corners are cut
        lone = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1) if m[r, c] and not finder[r, c]
                and not (m[r - 1, c] or m[r + 1, c] or m[r, c - 1] or m[r, c + 1])]
        assert lone and all(code[x0 + 16 * r, x0 + 16 * c] == 255 for r, c in lone)
    square = np.asarray(render_layers(req(qr_code=URL, qr_border=border), 512, 512).code.convert("L"))
    dark, dark_square = (code == 0).sum(), (square == 0).sum()
    if drawer == "square":
        assert dark == dark_square
    else:  # gaps, circles, bars and rounded corners all remove ink from the square modules
        assert 0.5 * dark_square < dark < dark_square


@pytest.mark.parametrize("drawer", DRAWERS)
def test_offsets_and_borders_decode(drawer):
    for border in range(5):
        r = req(qr_code=URL, module_drawer=drawer, qr_border=border, x_offset=64, y_offset=200)
        layers = render_layers(r, 1024, 1024)
        size = (29 + 2 * border) * 16
        assert layers.box == (64, 192, 64 + size, 192 + size)
        code = np.asarray(layers.code.convert("L"))
        assert (code[:, :64] == 128).all() and (code[:192] == 128).all()  # grey around it
        assert decode(layers.code) == [URL], (drawer, border)


def test_centred_by_default():
    layers = render_layers(req(qr_code=URL), 1024, 768)
    left, top, right, bottom = layers.box
    assert right - left == bottom - top == 31 * 16
    assert abs(left - (1024 - right)) <= 1 and abs(top - (768 - bottom)) <= 1
    assert decode(layers.code) == [URL]


def _finder_boxes(box, border, content):
    """Finder squares from the QR geometry (segno's own version), independent of models.qr."""
    n = segno.make(content, error="h", micro=False).symbol_size(border=0)[0]
    x0, y0 = box[0] + border * 16, box[1] + border * 16
    return [(x0 + c * 16, y0 + r * 16, x0 + (c + 7) * 16, y0 + (r + 7) * 16)
            for r, c in ((0, 0), (0, n - 7), (n - 7, 0))]


@pytest.mark.parametrize("drawer", ["square", "circle"])
def test_module_layer_lacks_finders_and_finder_layer_has_only_them(drawer):
    border = 2
    layers = render_layers(req(qr_code=URL, module_drawer=drawer, qr_border=border, x_offset=64), 768, 768)
    code, modules, finders = (np.asarray(i.convert("L")) for i in (layers.code, layers.modules, layers.finders))
    boxes = _finder_boxes(layers.box, border, URL)
    inside = np.zeros(code.shape, bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
        # the finder pattern: dark outer ring, light ring, dark 3x3 centre
        for img in (code, finders):
            assert img[y0 + 8, x0 + 8] == 0 and img[y0 + 24, x0 + 24] == 255 and img[y0 + 56, x0 + 56] == 0
        assert (modules[y0:y1, x0:x1] == 128).all()  # painted out with the canvas grey
    assert (finders[~inside] == 255).all()  # nothing but the finders on white
    assert (finders[inside] == 0).sum() == 3 * (49 - 25 + 9) * 256  # 24-module ring + 3x3 centre
    # outside the finders, the module layer is the code
    assert (modules[~inside] == code[~inside]).all() and (code[~inside] == 0).any()


def test_finder_mask_is_grown_and_feathered():
    layers = render_layers(req(qr_code=URL, x_offset=128, y_offset=128), 768, 768)
    mask = np.asarray(layers.finder_mask)
    assert layers.finder_mask.mode == "L"
    for x0, y0, x1, y1 in _finder_boxes(layers.box, 1, URL):
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        assert mask[cy, cx] == 255
        row = mask[cy]
        # the half-way (128) line sits 8 px outside the square, not on its edge: grown, then blurred
        assert 160 < row[x0] < 255 and row[x0 - 4] > 128 > row[x0 - 12]
        assert mask[y0 - 4, cx] > 128 > mask[y0 - 12, cx]
        assert 0 < row[x0 - 8] < 255 and 0 < row[x1 - 1 + 8] < 255  # feathered at the grown edge
        assert row[x0 - 8] < row[x0] and mask[y0 - 8, cx] < mask[y0, cx]
        assert row[x0 - 80] == 0 if x0 - 80 >= 0 else True
    assert mask[384, 384] == 0  # far from any finder: untouched


def test_too_large_raises_naming_extra_texts():
    with pytest.raises(QrRequestError, match="too large for a 256x256 image") as e:
        render_layers(req(qr_code="a long text that needs a larger QR version " * 3), 256, 256)
    assert e.value.field == "extra_texts"
    with pytest.raises(QrRequestError, match="too large"):  # fits centred, not at this offset
        render_layers(req(qr_code=URL, x_offset=64), 512, 512)


# -- scanning and blending -------------------------------------------------------------------

def noise(seed, size=512):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_decode_and_scans():
    layers = render_layers(req(qr_code=URL), 512, 512)
    assert scans(layers.code, URL) and not scans(layers.code, URL + "/")
    assert decode(noise(0)) == [] and not scans(noise(0), URL)
    # a faint code on flat grey is read through the autocontrast / binarised variants
    faint = Image.blend(Image.new("RGB", (512, 512), (120, 120, 120)), layers.code, 0.05)
    assert scans(faint, URL)


def test_blend_finds_a_near_minimal_strength():
    layers = render_layers(req(qr_code=URL), 512, 512)
    img = noise(1)
    out, s = blend_until_scans(img, layers.code, URL)
    assert 0 < s <= 1 and scans(out, URL)
    assert out.size == img.size
    # the same blend at a clearly lower strength does not scan: the bisection did not stop early
    mask = Image.fromarray(np.where(np.asarray(layers.code.convert("L")) == 128, 0, 255).astype(np.uint8))
    if s - 0.1 > 0:
        lower = Image.composite(Image.blend(img, layers.code, s - 0.1), img, mask)
        assert not scans(lower, URL)
    # and finer: 12 halvings land within 1/4096 of the transition; checked on this fixed seed
    assert not scans(Image.composite(Image.blend(img, layers.code, s - 0.02), img, mask), URL)
    assert s < blend_until_scans(img, layers.code, URL, max_steps=2)[1]
    # outside the code's box the picture is untouched
    l, t, r, b = layers.box
    a, o = np.asarray(img), np.asarray(out)
    assert (a[:t] == o[:t]).all() and (a[:, :l] == o[:, :l]).all()
    assert not (a[t:b, l:r] == o[t:b, l:r]).all()


def test_blend_returns_zero_when_it_already_scans():
    layers = render_layers(req(qr_code=URL, module_drawer="circle"), 512, 512)
    already = Image.blend(noise(2), layers.code, 0.8)
    out, s = blend_until_scans(already, layers.code, URL)
    assert s == 0.0 and np.array_equal(np.asarray(out), np.asarray(already))


def test_blend_border_zero_falls_back_to_whole_frame_when_needed():
    layers = render_layers(req(qr_code=URL, qr_border=0), 512, 512)
    out, s = blend_until_scans(noise(3), layers.code, URL)  # noise around it is quiet enough
    assert 0 < s <= 1 and scans(out, URL) and np.array_equal(np.asarray(out)[:5], np.asarray(noise(3))[:5])
    # on dark grey, the code without a quiet zone loses its finders' outer edge: even the
    # masked blend at strength 1 fails, so the grey canvas must be blended in too
    dark = Image.new("RGB", (512, 512), (30, 30, 30))
    mask = Image.fromarray(np.where(np.asarray(layers.code.convert("L")) == 128, 0, 255).astype(np.uint8))
    assert not scans(Image.composite(layers.code, dark, mask), URL)
    out, s = blend_until_scans(dark, layers.code, URL)
    assert 0 < s <= 1 and scans(out, URL)
    assert np.asarray(out)[0, 0, 0] > 30  # the corner (outside the code) was greyed too
    with pytest.raises(ValueError, match="differ in size"):
        blend_until_scans(noise(3, 256), layers.code, URL)
