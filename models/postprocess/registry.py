"""The AI Horde's post-processors by name, and how each catalog entry loads into a callable
`(image, strength) -> image`:

- face fixers (`GFPGAN`, `CodeFormers`): detect, align, restore, paste back (facefix.py);
- upscalers (`RealESRGAN_x4plus`, `RealESRGAN_x2plus`, `RealESRGAN_x4plus_anime_6B`,
  `NMKD_Siax`, `4x_AnimeSharp`): ESRGAN-family networks (upscalers.py);
- `strip_background`: rembg's u2net model through onnxruntime (background.py).

Weights come from the catalog (`postprocessors:` in configs/models.yaml): `builtin` random
weights with the real architectures (written to disk and loaded back the way the published
files are), a local `file`, or a `huggingface` file. CodeFormer's published weights carry a
non-commercial licence: only an operator's own entry points at them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

FACE_FIXERS = ("GFPGAN", "CodeFormers")
UPSCALERS = ("RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B", "NMKD_Siax",
             "4x_AnimeSharp")
BACKGROUND = "strip_background"
# How many times larger each upscaler makes an image (the published networks' scales; the
# specs in upscalers.py build them so).
UPSCALE_FACTORS = {"RealESRGAN_x4plus": 4, "RealESRGAN_x2plus": 2,
                   "RealESRGAN_x4plus_anime_6B": 4, "NMKD_Siax": 4, "4x_AnimeSharp": 4}
POST_PROCESSORS = (*FACE_FIXERS, *UPSCALERS, BACKGROUND)
PostProcessorName = Literal["GFPGAN", "CodeFormers", "RealESRGAN_x4plus", "RealESRGAN_x2plus",
                            "RealESRGAN_x4plus_anime_6B", "NMKD_Siax", "4x_AnimeSharp",
                            "strip_background"]
PostProcess = Callable[[Image.Image, float], Image.Image]


class PostProcessorEntry(BaseModel):
    """A post-processor the cluster serves and where its weights come from."""

    model_config = ConfigDict(extra="forbid")

    name: PostProcessorName
    kind: Literal["builtin", "file", "huggingface"] = "builtin"
    path: str | None = None  # file
    repo: str | None = None  # huggingface
    filename: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "PostProcessorEntry":
        if self.kind == "file" and not self.path:
            raise ValueError(f"{self.name}: file weights need a path")
        if self.kind == "huggingface" and not (self.repo and self.filename):
            raise ValueError(f"{self.name}: huggingface weights need repo and filename")
        return self


def order(names: list[str] | tuple[str, ...]) -> list[str]:
    """The AI Horde's order: face fixers first, then the upscaler, then strip_background."""
    rank = {n: i for i, n in enumerate((*FACE_FIXERS, *UPSCALERS, BACKGROUND))}
    group = lambda n: 0 if n in FACE_FIXERS else 1 if n in UPSCALERS else 2  # noqa: E731
    return sorted(names, key=lambda n: (group(n), rank[n]))


def output_size(width: int, height: int, post_processing) -> tuple[int, int]:
    """The size of an image of `width` x `height` after `post_processing` (at most one
    upscaler; the others keep the size)."""
    factor = 1
    for name in post_processing or ():
        factor *= UPSCALE_FACTORS.get(name, 1)
    return width * factor, height * factor


def _weights_file(entry: PostProcessorEntry) -> str | None:
    if entry.kind == "file":
        return entry.path
    if entry.kind == "huggingface":
        from huggingface_hub import hf_hub_download

        return hf_hub_download(entry.repo, entry.filename)
    return None


def load(entry: PostProcessorEntry, device: str = "cpu") -> PostProcess:
    """The entry as a callable `(image, strength) -> image` (strength: facefixer_strength;
    the others ignore it)."""
    path = _weights_file(entry)
    if entry.name in FACE_FIXERS:
        from models.postprocess.facefix import build_face_fixer

        fixer = build_face_fixer(entry.name, path, device=device)
        return lambda image, strength: fixer(image.convert("RGB"), strength)
    if entry.name in UPSCALERS:
        from models.postprocess.upscalers import BUILTIN_UPSCALERS, load_upscaler, upscale

        if path is None:  # builtin: through a file, the way published weights load
            import torch

            path = str(Path(tempfile.mkdtemp(prefix="rayhorde-upscaler-")) / f"{entry.name}.pth")
            torch.save(BUILTIN_UPSCALERS[entry.name](), path)
        module, scale = load_upscaler(path, device=device)
        return lambda image, strength: upscale(module, scale, image.convert("RGB"), tile=512)
    from models.postprocess.background import BackgroundRemover

    remover = BackgroundRemover(path or build_tiny_u2net())
    return lambda image, strength: remover.remove(image)


def build_tiny_u2net(folder: str | None = None) -> str:
    """A tiny ONNX model with u2net's input/output contract (one [1,3,320,320] input; the
    first output [1,1,320,320]): a 3x3 convolution with fixed seeded weights and a sigmoid.
    The embedded cluster's `strip_background`; returns its path."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (1, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(1, np.float32), "b")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["conv"], ["output"])]
    graph = helper.make_graph(
        nodes, "tiny-u2net", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 320, 320])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 320, 320])],
        initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = Path(folder or tempfile.mkdtemp(prefix="rayhorde-u2net-")) / "tiny-u2net.onnx"
    onnx.save(model, str(path))
    return str(path)
