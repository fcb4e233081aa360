"""ControlNet annotators: turn a source image into the control map a ControlNet expects.

    build_annotator(control_type, weights=None, device="cpu") -> Annotator
    annotator(image: PIL.Image) -> PIL.Image  # RGB, the input's size

Control types (the AI Horde's `params.control_type`):
- canny: OpenCV Canny, thresholds 100/200, on the grey image; edges in 3 channels.
- scribble: pixels whose darkest channel is below 127 become white, the rest black.
- hed: HED soft edges (the Apache-2.0 ControlNetHED network, `hed.py`).
- fakescribbles: HED, then thinning (non-maximum suppression), blur, threshold (`hed.py`).
- hough: M-LSD large line segments drawn white on black (`mlsd.py`).
- depth / normal: DPT (MiDaS) relative depth, and normals from its gradients (`depth.py`).
- seg: ADE20K segmentation coloured with the ADE20K palette (`seg.py`).
- openpose: body (PAF) and hand keypoint networks, skeleton on black (`openpose.py`).

Weights (`AnnotatorWeights`): `builtin` builds the real architecture at reduced widths with
seeded random weights (tests, the embedded demo); `file` loads a local published file
(.pth through `torch.load(weights_only=True)`, or .safetensors) strictly: every key must be
used and every module key present, else `WeightsMismatch` names the keys; `huggingface`
downloads `filename` from `repo` (lllyasviel/Annotators by default). For depth and seg the
networks are transformers models: `huggingface` means `from_pretrained(repo)` (e.g.
Intel/dpt-hybrid-midas, nvidia/segformer-b0-finetuned-ade-512-512) and `file` a local
`save_pretrained` folder. openpose takes a second file for the hand network (`hand_path` /
`hand_filename`); without one it draws bodies only.

Built annotators are cached per (control type, weights, device); building again is free.
"""

from __future__ import annotations

import typing

from models.workflows import ControlType

import threading
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

from models.annotators.common import (
    WeightsMismatch,
    load_state_dict_file,
    load_strict,
    to_map,
    to_rgb_array,
)

__all__ = ["CONTROL_TYPES", "Annotator", "AnnotatorWeights", "WeightsMismatch",
           "build_annotator", "clear_cache", "DEFAULT_FILES"]

CONTROL_TYPES = typing.get_args(ControlType)
WEIGHTLESS = ("canny", "scribble")
ANNOTATORS_REPO = "lllyasviel/Annotators"
# The published file of each network in lllyasviel/Annotators.
DEFAULT_FILES = {"hed": "ControlNetHED.pth", "fakescribbles": "ControlNetHED.pth",
                 "hough": "mlsd_large_512_fp32.pth", "openpose": "body_pose_model.pth"}
DEFAULT_HAND_FILE = "hand_pose_model.pth"
DEFAULT_REPOS = {"depth": "Intel/dpt-hybrid-midas", "normal": "Intel/dpt-hybrid-midas",
                 "seg": "nvidia/segformer-b0-finetuned-ade-512-512"}


@runtime_checkable
class Annotator(Protocol):
    def __call__(self, image: Image.Image) -> Image.Image: ...


class AnnotatorWeights(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["builtin", "file", "huggingface"] = "builtin"
    path: str | None = None  # file: the weights file (depth/seg: a save_pretrained folder)
    repo: str | None = None  # huggingface: the repository (default per control type)
    filename: str | None = None  # huggingface: the file in `repo` (default per control type)
    revision: str | None = None
    hand_path: str | None = None  # openpose, file: the hand network's file
    hand_filename: str | None = None  # openpose, huggingface (default hand_pose_model.pth)
    seed: int = 0  # builtin

    @model_validator(mode="after")
    def _check(self) -> AnnotatorWeights:
        if self.kind == "file" and not self.path:
            raise ValueError("file weights need a path")
        if self.kind != "file" and (self.path or self.hand_path):
            raise ValueError("path/hand_path are for file weights")
        if self.kind != "huggingface" and (self.repo or self.filename or self.hand_filename):
            raise ValueError("repo/filename are for huggingface weights")
        return self


class CannyAnnotator:
    """OpenCV Canny on the grey image, thresholds 100/200 (the AI Horde's)."""

    def __init__(self, low: int = 100, high: int = 200):
        self.low, self.high = low, high

    def __call__(self, image: Image.Image) -> Image.Image:
        gray = cv2.cvtColor(to_rgb_array(image), cv2.COLOR_RGB2GRAY)
        return to_map(cv2.Canny(gray, self.low, self.high))


class ScribbleAnnotator:
    """A drawing on white paper -> white strokes on black: pixels whose darkest channel is
    below 127 become 255, all others 0 (what ControlNet's scribble model takes)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = to_rgb_array(image)
        out = np.zeros(rgb.shape[:2], dtype=np.uint8)
        out[rgb.min(axis=2) < 127] = 255
        return to_map(out)


_CACHE: dict[tuple, Annotator] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def build_annotator(control_type: str, weights: AnnotatorWeights | None = None,
                    device: str = "cpu") -> Annotator:
    """The annotator for a control type, built once per (type, weights, device)."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {control_type!r}; "
                         f"known: {', '.join(CONTROL_TYPES)}")
    weights = weights or AnnotatorWeights()
    key = (control_type, None if control_type in WEIGHTLESS else weights, str(device))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            hit = _CACHE[key] = _build(control_type, weights, str(device))
        return hit


def _fetch(weights: AnnotatorWeights, filename: str | None) -> str:
    if weights.kind == "file":
        return str(weights.path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(weights.repo or ANNOTATORS_REPO, filename, revision=weights.revision)


def _load_net(weights: AnnotatorWeights, builtin, make, filename: str | None,
              path: str | None = None):
    """A state-dict network: builtin, or a published file loaded strictly. `make(sd)` builds
    the empty module whose widths fit the file (so reduced builtin files load too)."""
    if weights.kind == "builtin" and path is None:
        return builtin(weights.seed)
    path = path or _fetch(weights, filename)
    sd = load_state_dict_file(path)
    return load_strict(make(sd), sd, what=Path(path).name).eval()


def _transformers_model(weights: AnnotatorWeights, builtin, auto_cls, control_type: str):
    if weights.kind == "builtin":
        return builtin(weights.seed)
    if weights.kind == "file":
        source = weights.path
    else:
        source = weights.repo or DEFAULT_REPOS[control_type]
    if weights.kind == "file" and not Path(source).is_dir():
        raise ValueError(f"{control_type} file weights must be a transformers save_pretrained "
                         f"folder (config.json + weights), not {source}")
    return auto_cls.from_pretrained(source, revision=weights.revision).eval()


def _build(control_type: str, weights: AnnotatorWeights, device: str) -> Annotator:
    if control_type == "canny":
        return CannyAnnotator()
    if control_type == "scribble":
        return ScribbleAnnotator()
    filename = weights.filename or DEFAULT_FILES.get(control_type)
    if control_type in ("hed", "fakescribbles"):
        from models.annotators import hed

        net = _load_net(weights, hed.build_builtin, lambda sd: hed.HEDNet(hed.HEDNet.widths_of(sd)),
                        filename)
        return hed.HEDAnnotator(net.to(device), scribble=control_type == "fakescribbles")
    if control_type == "hough":
        from models.annotators import mlsd

        net = _load_net(weights, mlsd.build_builtin,
                        lambda sd: mlsd.MLSDLarge(*mlsd.MLSDLarge.config_of(sd)), filename)
        return mlsd.MLSDAnnotator(net.to(device))
    if control_type == "openpose":
        from models.annotators import openpose as op

        body = _load_net(weights, op.build_builtin_body,
                         lambda sd: op.BodyPoseNet(op.BodyPoseNet.widths_of(sd)), filename)
        hand = None
        if weights.kind == "builtin":
            hand = op.build_builtin_hand(weights.seed + 1)
        elif weights.hand_path or weights.kind == "huggingface":
            hand_file = weights.hand_path if weights.kind == "file" else _fetch(
                weights, weights.hand_filename or DEFAULT_HAND_FILE)
            hand = _load_net(weights, None, lambda sd: op.HandPoseNet(op.HandPoseNet.widths_of(sd)),
                            None, path=hand_file)
        return op.OpenPoseAnnotator(body.to(device), hand.to(device) if hand is not None else None)
    if control_type in ("depth", "normal"):
        from transformers import DPTForDepthEstimation

        from models.annotators import depth

        model = _transformers_model(weights, depth.build_builtin, DPTForDepthEstimation,
                                    control_type)
        return depth.DepthAnnotator(model.to(device), normal=control_type == "normal")
    if control_type == "seg":
        from transformers import AutoModelForSemanticSegmentation

        from models.annotators import seg

        model = _transformers_model(weights, seg.build_builtin, AutoModelForSemanticSegmentation,
                                    control_type)
        return seg.SegAnnotator(model.to(device))
    raise AssertionError(control_type)  # pragma: no cover
