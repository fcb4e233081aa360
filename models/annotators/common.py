"""Shared helpers of the ControlNet annotators: image conversions, the detection resize and
strict loading of published state dicts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

# BatchNorm's step counter: some published files carry it and some do not; it never changes the
# output, so it is the one key allowed to be absent (it is still refused when unexpected).
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


class WeightsMismatch(ValueError):
    """A published file whose keys or shapes do not fit the module built for it."""


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB (any PIL mode in; alpha is dropped onto black as PIL does)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_map(array: np.ndarray, size: tuple[int, int] | None = None,
           interpolation: int = cv2.INTER_LINEAR) -> Image.Image:
    """A 1- or 3-channel uint8 map as an RGB PIL image, resized to `size` (W, H) if given."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if size is not None and (array.shape[1], array.shape[0]) != tuple(size):
        array = cv2.resize(array, tuple(size), interpolation=interpolation)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def detection_size(width: int, height: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
    """ControlNet's `resize_image` rule: scale so the shorter side is `resolution`, then round
    each side to a multiple of `multiple` (at least one multiple). Returns (W, H)."""
    k = float(resolution) / min(width, height)
    w = max(multiple, int(np.round(width * k / multiple)) * multiple)
    h = max(multiple, int(np.round(height * k / multiple)) * multiple)
    return w, h


def resize_for_detection(array: np.ndarray, resolution: int, multiple: int = 64) -> np.ndarray:
    """Resize an HxWxC image for a network: LANCZOS when enlarging, AREA when shrinking."""
    h, w = array.shape[:2]
    nw, nh = detection_size(w, h, resolution, multiple)
    if (nw, nh) == (w, h):
        return array
    interp = cv2.INTER_LANCZOS4 if nw * nh > w * h else cv2.INTER_AREA
    return cv2.resize(array, (nw, nh), interpolation=interp)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a published weights file: .safetensors, or .pth/.pt/.ckpt through
    `torch.load(weights_only=True)`. A checkpoint wrapping its weights in `state_dict` (or
    `model`) is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsMismatch(f"{path}: not a state dict of tensors")
    return dict(sd)


def save_state_dict_file(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as .safetensors or (any other suffix) torch.save."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))


def _short(keys: Iterable[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                     what: str = "weights") -> None:
    """Raise `WeightsMismatch` naming every missing key, unexpected key and wrong shape."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} != model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_short(shapes, 6)}")
    if problems:
        raise WeightsMismatch(f"{what} do not fit {type(module).__name__}: " + "; ".join(problems))


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                what: str = "weights") -> torch.nn.Module:
    """Check, then load every tensor (cast to the module's dtype)."""
    check_state_dict(module, state_dict, what)
    expected = module.state_dict()
    sd = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    for k in expected:
        if k not in sd:  # an optional counter
            sd[k] = expected[k]
    module.load_state_dict(sd, strict=True)
    return module


def seeded_init(module: torch.nn.Module, seed: int, std_scale: float = 1.0) -> torch.nn.Module:
    """Deterministic random weights: Kaiming-uniform convolutions (PyTorch's default), small
    biases, BatchNorm with unit variance. The same seed always builds the same weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                bound = std_scale * (3.0 / fan_in) ** 0.5 * 2 ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                if m.bias is not None:
                    m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * 0.05)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return module


def channels(state_dict: Mapping[str, torch.Tensor], key: str) -> int:
    """Output channels of a conv weight in a state dict (for inferring widths of a file)."""
    if key not in state_dict:
        raise WeightsMismatch(f"missing keys: {key}")
    return int(state_dict[key].shape[0])
