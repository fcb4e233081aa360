"""`strip_background`: rembg's u2net background removal, run through onnxruntime without rembg.

The AI Horde's worker strips backgrounds with rembg and its `u2net` model (the published
`u2net.onnx`, 1 input `[1, 3, 320, 320]` float, 7 side outputs `[1, 1, 320, 320]`, the first
being the fused saliency map). This module does rembg's u2net steps itself:

1. the image, as RGB, is resized to 320x320 (LANCZOS) and divided by its largest value;
2. each channel is normalised with ImageNet's mean (0.485, 0.456, 0.406) and std
   (0.229, 0.224, 0.225), laid out NCHW, float32;
3. the first output's first channel is min-max normalised to 0..1, scaled to 0..255 and
   truncated to uint8 (rembg's mask), then resized back to the image's size (LANCZOS);
4. the mask becomes the alpha channel of the original image (rembg's `putalpha=True` cutout).

rembg's default cutout (`putalpha=False`) instead composites the image over transparent black,
which also darkens the RGB of half-transparent pixels; here the RGB is left exactly as it was so
the caller can decide, and only the alpha changes. rembg's optional alpha matting and mask
post-processing are not done (the worker does not ask for them).

The model's input/output contract is checked when it is loaded, so a wrong file (another rembg
model, an upscaler, a truncated download) is refused with a clear `BackgroundModelError` rather
than failing on the first image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

SIZE = 320  # u2net's fixed input side
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)")


class BackgroundModelError(ValueError):
    """The file is not a usable u2net-style ONNX model (unreadable, or the wrong contract)."""


def _dim_ok(dim: object, want: int) -> bool:
    # A symbolic dimension (a name, or None when unnamed) can take the value we feed.
    return dim == want or dim is None or isinstance(dim, str)


def _shape_ok(shape: Sequence[object] | None, want: Sequence[int]) -> bool:
    return shape is not None and len(shape) == len(want) and all(_dim_ok(d, w) for d, w in zip(shape, want))


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


class BackgroundRemover:
    """rembg's u2net `remove` (as a cutout with the mask put as alpha), on one ONNX session.

    `remove` may be called from several threads at once (onnxruntime sessions are thread-safe).
    """

    def __init__(self, model_path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 sess_options: ort.SessionOptions | None = None) -> None:
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise BackgroundModelError(f"background removal model {self.model_path!r} does not exist")
        try:
            self.session = ort.InferenceSession(
                self.model_path, sess_options=sess_options,
                providers=list(providers) if providers is not None else default_providers())
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BackgroundModelError(
                f"background removal model {self.model_path!r} is not a loadable ONNX model: {e}") from e
        self._check_contract()
        self.input_name = self.session.get_inputs()[0].name

    def _check_contract(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want_in, want_out = [1, 3, SIZE, SIZE], [1, 1, SIZE, SIZE]
        where = f"background removal model {self.model_path!r}"
        if len(inputs) != 1:
            raise BackgroundModelError(
                f"{where} must take exactly one input (float {want_in}); it takes {len(inputs)}: "
                f"{[(i.name, i.shape, i.type) for i in inputs]}")
        inp = inputs[0]
        if inp.type != "tensor(float)" or not _shape_ok(inp.shape, want_in):
            raise BackgroundModelError(
                f"{where} must take one float input of shape {want_in} (u2net's); "
                f"its input {inp.name!r} is {inp.type} of shape {inp.shape}")
        if not outputs:
            raise BackgroundModelError(f"{where} has no outputs; u2net's first output is {want_out}")
        out = outputs[0]
        if out.type not in _FLOAT_OUTPUTS or not _shape_ok(out.shape, want_out):
            raise BackgroundModelError(
                f"{where} must have a first output of shape {want_out} (u2net's mask); "
                f"its first output {out.name!r} is {out.type} of shape {out.shape}")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @staticmethod
    def preprocess(image: Image.Image) -> np.ndarray:
        """rembg's u2net input: 320x320 LANCZOS, / max, ImageNet mean/std, NCHW float32."""
        rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
        peak = rgb.max()
        rgb = rgb / (peak if peak > 0 else 1.0)  # rembg divides by the max; an all-black image has 0
        x = (rgb - np.asarray(MEAN)) / np.asarray(STD)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))

    def mask(self, image: Image.Image) -> Image.Image:
        """The "L" mask (255 = keep) at the image's size."""
        pred = np.asarray(self.session.run(None, {self.input_name: self.preprocess(image)})[0], dtype=np.float64)
        pred = pred[0, 0]
        lo, hi = float(pred.min()), float(pred.max())
        # rembg divides by (max - min); a constant map (nothing salient) would give NaNs there.
        pred = (pred - lo) / (hi - lo) if hi > lo else np.zeros_like(pred)
        small = Image.fromarray((pred * 255).astype(np.uint8))  # 2-D uint8: mode "L"
        return small.resize(image.size, Image.Resampling.LANCZOS)

    def remove(self, image: Image.Image) -> Image.Image:
        """A new RGBA image: the original's RGB, with the predicted foreground mask as alpha."""
        out = image.convert("RGBA")  # always a copy, so the caller's image is untouched
        out.putalpha(self.mask(image))
        return out
