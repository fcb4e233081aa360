"""QR codes for the `qr_code` workflow: the request, the control images, scanning, and a blend
that guarantees the delivered image scans. Everything here is plain PIL / numpy; no diffusion.

The AI Horde describes a QR job only through `extra_texts` (`[{text, reference}]`), so
`QrRequest.from_extra_texts` turns that loose list into a strict, bounded request and refuses
what the engine would otherwise guess at (unknown references, bad numbers).

`render_layers` draws the three ControlNet inputs the engine uses (see horde-facts, "QR code"):
the whole code and the module layer on a 0.5-grey canvas (grey is "no constraint" for QR Code
Monster), the finder layer on white, and the feathered mask through which the finder latent is
pasted over the module latent. Error correction is always H (30 % of the codewords may be
lost to the artwork) at 16 px per module, as the AI Horde does. A code that does not fit raises
`QrRequestError`: the AI Horde silently renders "This QR Code is too large for this image"
instead, which the requester would only discover after paying for the job.

The AI Horde never checks that the result scans. `blend_until_scans` does: it mixes the
rendered code into the generated image at the lowest strength that zxing-cpp can decode.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import segno
import zxingcpp
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MODULE_PX = 16  # pixels per module, as the AI Horde's engine draws them
GREY = 128  # the 0.5-grey canvas: QR Code Monster reads it as "anything goes here"
FINDER = 7  # a finder pattern is 7x7 modules
MASK_GROW_PX = 8
MASK_BLUR_RADIUS = 16

MAX_EXTRA_TEXTS = 20
MAX_TEXT = 2000  # per extra_texts entry
MAX_REFERENCE = 64
MAX_PROMPT = 50_000  # the API's prompt bound; function_layer_prompt defaults to the prompt
MAX_OFFSET = 16_384  # no image is larger; bounds the integers we accept
MAX_BORDER = 10

QrProtocol = Literal["http", "https", "none"]
ModuleDrawer = Literal["square", "gapped square", "circle", "rounded", "vertical bars", "horizontal bars"]
DRAWERS: tuple[str, ...] = ModuleDrawer.__args__  # type: ignore[attr-defined]
REFERENCES = ("qr_code", "protocol", "module_drawer", "function_layer_prompt", "x_offset", "y_offset",
              "qr_border")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class QrRequestError(ValueError):
    """A QR request the worker cannot honour; `field` names the request field to blame (the API
    turns it into a 400 pointing at that field, before any GPU time is spent)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@functools.lru_cache(maxsize=64)
def _matrix(content: str) -> tuple[bytes, ...]:
    """The module matrix (1 = dark), without quiet zone. micro=False: segno would otherwise pick
    a Micro QR for short content, which QR Code Monster was not trained on and many phones
    cannot read. Cached: validation and rendering ask for the same content."""
    try:
        qr = segno.make(content, error="h", micro=False, boost_error=False)
    except segno.DataOverflowError as e:
        raise QrRequestError("extra_texts", f"qr_code is too long for a QR code at error correction H: {e}") from e
    return tuple(bytes(row) for row in qr.matrix)


class QrRequest(BaseModel):
    """A validated QR job. Offsets are None when centred (the AI Horde's 0 means the same)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    content: str = Field(min_length=1, max_length=MAX_TEXT + len("https://"))
    protocol: QrProtocol = "none"
    module_drawer: ModuleDrawer = "square"
    function_layer_prompt: str = Field(default="", max_length=MAX_PROMPT)
    x_offset: int | None = Field(default=None, ge=0, le=MAX_OFFSET)
    y_offset: int | None = Field(default=None, ge=0, le=MAX_OFFSET)
    qr_border: int = Field(default=1, ge=0, le=MAX_BORDER)

    @field_validator("x_offset", "y_offset")
    @classmethod
    def _floor64(cls, v: int | None) -> int | None:
        """Latents are 1/8 of the image and the engine aligns the code to 64 px; 0 = centred."""
        if v is None:
            return None
        v -= v % 64
        return v or None

    @model_validator(mode="after")
    def _prefix_and_fit(self) -> "QrRequest":
        """Add the protocol's scheme when the content has none (so a phone opens it as a link),
        and refuse content no QR version can hold now rather than on the worker."""
        if self.protocol != "none" and not _SCHEME.match(self.content):
            object.__setattr__(self, "content", f"{self.protocol}://{self.content}")
        _matrix(self.content)
        return self

    @classmethod
    def from_extra_texts(cls, extra_texts: Iterable[Any], prompt: str) -> "QrRequest":
        """Build from the AI Horde's `extra_texts`. Every value arrives as text; numbers must be
        plain integers. Unknown or repeated references are refused, not ignored: a typo such
        as `x_ofset` would otherwise silently move the code."""
        entries = list(extra_texts or [])
        if len(entries) > MAX_EXTRA_TEXTS:
            raise QrRequestError("extra_texts", f"at most {MAX_EXTRA_TEXTS} entries, got {len(entries)}")
        refs: dict[str, str] = {}
        for i, e in enumerate(entries):
            if not isinstance(e, Mapping):
                e = getattr(e, "model_dump", lambda: e)()
            if not isinstance(e, Mapping) or set(e) != {"text", "reference"}:
                raise QrRequestError("extra_texts", f"entry {i} must be {{text, reference}}")
            text, ref = e["text"], e["reference"]
            if not isinstance(text, str) or not isinstance(ref, str):
                raise QrRequestError("extra_texts", f"entry {i}: text and reference must be strings")
            if len(text) > MAX_TEXT or len(ref) > MAX_REFERENCE:
                raise QrRequestError("extra_texts", f"entry {i}: text over {MAX_TEXT} or reference over "
                                                    f"{MAX_REFERENCE} characters")
            if ref in refs:
                raise QrRequestError("extra_texts", f"reference {ref!r} given twice")
            refs[ref] = text
        unknown = sorted(set(refs) - set(REFERENCES))
        if unknown:
            raise QrRequestError("extra_texts", f"unknown references {unknown}; known: {list(REFERENCES)}")
        if not refs.get("qr_code"):
            raise QrRequestError("extra_texts", "the qr_code reference (the code's content) is required")

        fields: dict[str, Any] = {"content": refs["qr_code"]}
        if "protocol" in refs:
            fields["protocol"] = refs["protocol"].strip().lower()
        if "module_drawer" in refs:
            fields["module_drawer"] = re.sub(r"[_\s]+", " ", refs["module_drawer"].strip().lower())
        fp = refs.get("function_layer_prompt", "").strip()
        fields["function_layer_prompt"] = fp or prompt
        for name in ("x_offset", "y_offset", "qr_border"):
            if name in refs:
                raw = refs[name].strip()
                if not re.fullmatch(r"[+-]?\d{1,6}", raw):
                    raise QrRequestError("extra_texts", f"{name} must be an integer, got {raw[:20]!r}")
                fields[name] = int(raw)
        try:
            return cls(**fields)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise QrRequestError("extra_texts", msg) from None


# -- rendering -------------------------------------------------------------------------------

@dataclass(frozen=True)
class QrLayers:
    """The control images, all at the generation size, RGB except the mask.

    box: (left, top, right, bottom) pixels of the pasted code including its border (quiet zone).
    finder_boxes: the three finder squares (7x7 modules) in the same pixel coordinates.
    """

    code: Image.Image
    modules: Image.Image
    finders: Image.Image
    finder_mask: Image.Image
    box: tuple[int, int, int, int]
    finder_boxes: tuple[tuple[int, int, int, int], ...]


def _finder_origins(n: int) -> tuple[tuple[int, int], ...]:
    """(row, col) of the top-left module of each finder pattern in an n x n matrix."""
    return ((0, 0), (0, n - FINDER), (n - FINDER, 0))


def _in_finder(r: int, c: int, n: int) -> bool:
    return any(r0 <= r < r0 + FINDER and c0 <= c < c0 + FINDER for r0, c0 in _finder_origins(n))


def _draw_modules(draw: ImageDraw.ImageDraw, m: tuple[bytes, ...], drawer: str, off: int) -> None:
    """Draw the dark data modules (finders excluded) in the requested shape, black on white.
    Shapes keep each module's centre dark, where decoders sample, and bars/rounded modules join
    their neighbours so the code still reads as runs of modules."""
    n, p = len(m), MODULE_PX

    def dark(r: int, c: int) -> bool:
        return 0 <= r < n and 0 <= c < n and bool(m[r][c]) and not _in_finder(r, c, n)

    if drawer in ("vertical bars", "horizontal bars"):
        vertical = drawer == "vertical bars"
        inset = p // 8  # bars are 75 % of a module wide, with round ends
        for a in range(n):  # a: the column (vertical) or the row (horizontal)
            b = 0
            while b < n:
                r, c = (b, a) if vertical else (a, b)
                if not dark(r, c):
                    b += 1
                    continue
                start = b
                while b < n and dark(*((b, a) if vertical else (a, b))):
                    b += 1
                lo, hi = off + start * p, off + b * p - 1
                across = off + a * p
                box = ((across + inset, lo, across + p - 1 - inset, hi) if vertical
                       else (lo, across + inset, hi, across + p - 1 - inset))
                draw.rounded_rectangle(box, radius=(p - 2 * inset) // 2, fill=0)
        return
    for r in range(n):
        for c in range(n):
            if not dark(r, c):
                continue
            x, y = off + c * p, off + r * p
            if drawer == "square":
                draw.rectangle((x, y, x + p - 1, y + p - 1), fill=0)
            elif drawer == "gapped square":  # 75 % squares leave a light grid between modules
                g = p // 8
                draw.rectangle((x + g, y + g, x + p - 1 - g, y + p - 1 - g), fill=0)
            elif drawer == "circle":
                draw.ellipse((x, y, x + p - 1, y + p - 1), fill=0)
            elif drawer == "rounded":
                # A round module, then the halves facing dark neighbours filled square: a corner
                # stays round only where both of its sides are open.
                draw.ellipse((x, y, x + p - 1, y + p - 1), fill=0)
                h = p // 2
                if dark(r, c + 1):
                    draw.rectangle((x + h, y, x + p - 1, y + p - 1), fill=0)
                if dark(r, c - 1):
                    draw.rectangle((x, y, x + h, y + p - 1), fill=0)
                if dark(r + 1, c):
                    draw.rectangle((x, y + h, x + p - 1, y + p - 1), fill=0)
                if dark(r - 1, c):
                    draw.rectangle((x, y, x + p - 1, y + h), fill=0)
            else:  # pragma: no cover - QrRequest's Literal rules this out
                raise ValueError(f"unknown module drawer {drawer!r}")


def _draw_finder(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    """A finder pattern, always square whatever the drawer: decoders locate the code by its
    1:1:3:1:1 runs, which circles or bars would break."""
    p = MODULE_PX
    draw.rectangle((x, y, x + 7 * p - 1, y + 7 * p - 1), fill=0)
    draw.rectangle((x + p, y + p, x + 6 * p - 1, y + 6 * p - 1), fill=255)
    draw.rectangle((x + 2 * p, y + 2 * p, x + 5 * p - 1, y + 5 * p - 1), fill=0)


def render_layers(req: QrRequest, width: int, height: int) -> QrLayers:
    """Render the code and its layers at the generation size, placed at the request's offsets
    (each axis centred when its offset is absent). Raises QrRequestError naming extra_texts
    when the code with its border does not fit."""
    if not (isinstance(width, int) and isinstance(height, int) and 0 < width <= MAX_OFFSET
            and 0 < height <= MAX_OFFSET):
        raise ValueError(f"bad image size {width}x{height}")
    m = _matrix(req.content)
    n, p = len(m), MODULE_PX
    off = req.qr_border * p
    size = n * p + 2 * off
    left = req.x_offset if req.x_offset is not None else (width - size) // 2
    top = req.y_offset if req.y_offset is not None else (height - size) // 2
    if left < 0 or top < 0 or left + size > width or top + size > height:
        raise QrRequestError(
            "extra_texts", f"the QR code ({size}x{size} px: {n} modules of {p} px and a border of "
            f"{req.qr_border}) at offset ({left}, {top}) is too large for a {width}x{height} image; "
            "shorten qr_code, lower qr_border or the offsets, or enlarge the image")

    tile = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(tile)
    _draw_modules(d, m, req.module_drawer, off)
    finder_xy = [(off + c0 * p, off + r0 * p) for r0, c0 in _finder_origins(n)]
    modules_tile = tile.copy()
    for x, y in finder_xy:
        _draw_finder(d, x, y)
        # painted out with the canvas grey: the finder pass, not the module pass, shapes them
        ImageDraw.Draw(modules_tile).rectangle((x, y, x + 7 * p - 1, y + 7 * p - 1), fill=GREY)

    def on(canvas: int, img: Image.Image | None = None) -> Image.Image:
        out = Image.new("L", (width, height), canvas)
        if img is not None:
            out.paste(img, (left, top))
        return out

    finders = on(255)
    fd, mask = ImageDraw.Draw(finders), on(0)
    md = ImageDraw.Draw(mask)
    boxes = []
    for x, y in finder_xy:
        bx, by = left + x, top + y
        _draw_finder(fd, bx, by)
        boxes.append((bx, by, bx + 7 * p, by + 7 * p))
        g = MASK_GROW_PX  # a rectangle grown by g px is its dilation by a (2g+1)^2 square
        md.rectangle((bx - g, by - g, bx + 7 * p - 1 + g, by + 7 * p - 1 + g), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(MASK_BLUR_RADIUS))
    return QrLayers(code=on(GREY, tile).convert("RGB"), modules=on(GREY, modules_tile).convert("RGB"),
                    finders=finders.convert("RGB"), finder_mask=mask,
                    box=(left, top, left + size, top + size), finder_boxes=tuple(boxes))


# -- scanning --------------------------------------------------------------------------------

def _otsu(grey: np.ndarray) -> np.ndarray:
    """Binarise at Otsu's threshold: one global cut between the two luminance populations,
    which survives the gentle shading that trips zxing's local-average binariser on artwork."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    mu = np.cumsum(hist * np.arange(256))
    total, w1 = w0[-1], w0[-1] - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - total * mu) ** 2 / (w0 * w1)
    t = int(np.nanargmax(np.nan_to_num(between, nan=-1.0)))
    return np.where(grey > t, 255, 0).astype(np.uint8)


def decode(image: Image.Image) -> list[str]:
    """Texts of the QR codes zxing-cpp finds, trying the image as is, then grey with
    autocontrast, then binarised; the first variant that yields anything wins. Each variant
    models a cheaper phone camera pipeline that the artwork must survive."""
    rgb = image.convert("RGB")
    grey = ImageOps.autocontrast(rgb.convert("L"))

    def variants():
        yield rgb
        yield grey
        yield Image.fromarray(_otsu(np.asarray(grey)))

    for v in variants():
        found = zxingcpp.read_barcodes(v, formats=zxingcpp.BarcodeFormat.QRCode)
        texts = list(dict.fromkeys(b.text for b in found if b.valid))
        if texts:
            return texts
    return []


def scans(image: Image.Image, expected: str) -> bool:
    """True when some QR code in the image decodes to exactly `expected`."""
    return expected in decode(image)


def _code_mask(code_layer: Image.Image) -> Image.Image:
    """255 where the code layer draws something (not the 0.5-grey canvas)."""
    a = np.asarray(code_layer.convert("L"))
    return Image.fromarray(np.where(a == GREY, 0, 255).astype(np.uint8))


def blend_until_scans(image: Image.Image, code_layer: Image.Image, expected: str,
                      max_steps: int = 12) -> tuple[Image.Image, float]:
    """Mix the rendered code into `image` at the lowest strength in [0, 1] that scans, found by
    bisection (scanning is monotone enough in practice: more code, more contrast), and return
    the image with the strength used (0: the image scanned untouched).

    The blend is `Image.blend` (a linear RGB mix), but only where the code layer is not its
    0.5-grey canvas: the canvas carries no information, and blending it would just wash the
    rest of the picture out. Linear RGB keeps the artwork's hue while pulling each module's
    luminance towards black or white, which is what a scanner thresholds; a luminance-only
    blend would leave saturated colours that clip and never reach pure black/white at strength 1.
    If the code (border 0 on a dark image, say) does not scan without a grey surround, the
    whole frame is blended instead, so that strength 1 is the code layer itself, which scans.

    "Scans" means zxing-cpp reads the pristine pixels; with the autocontrast variant it reads
    a code on flat artwork at a strength of 1-2 %, which a phone camera would not. Callers that
    want margin for cameras should raise the returned strength (or scan a degraded copy).
    """
    image = image.convert("RGB")
    code = code_layer.convert("RGB")
    if image.size != code.size:
        raise ValueError(f"image {image.size} and code layer {code.size} differ in size")
    if not 0 < max_steps <= 32:
        raise ValueError("max_steps must be in 1..32")
    if scans(image, expected):
        return image, 0.0
    mask = _code_mask(code)

    def mix(s: float) -> Image.Image:
        full = Image.blend(image, code, s)
        return full if mask is None else Image.composite(full, image, mask)

    if not scans(mix(1.0), expected):
        mask = None
        if not scans(code, expected):
            raise ValueError("the code layer itself does not scan; no blend of it can")
    lo, hi = 0.0, 1.0  # lo never scans, hi always does
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        if scans(mix(mid), expected):
            hi = mid
        else:
            lo = mid
    return mix(hi), hi
