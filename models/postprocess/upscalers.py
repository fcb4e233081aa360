"""ESRGAN-family upscalers: the AI Horde's RealESRGAN_x4plus, RealESRGAN_x2plus,
RealESRGAN_x4plus_anime_6B, NMKD_Siax and 4x_AnimeSharp post-processors.

    load_upscaler(state_dict_or_path, *, dtype=torch.float32, device=None) -> (RRDBNet, scale)
    upscale(module, scale, image: PIL.Image, tile=0, tile_pad=16) -> PIL.Image  # RGB, x scale

All five are the same network, written here from the ESRGAN and Real-ESRGAN papers: RRDBNet
(`conv_first`; N residual-in-residual dense blocks, each three residual dense blocks of five 3x3
convs with growth channels, LeakyReLU 0.2 and residual scaling 0.2; `conv_body` with a long skip;
nearest x2 upsample + conv stages; `conv_hr`; `conv_last`). Scale 2 and 1 networks take the image
pixel-unshuffled by 2 or 4 (12 or 48 input channels) into the x4 body.

Published files come in three key layouts, all read by `load_upscaler`:
- "new" (Real-ESRGAN / BasicSR): `conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`,
  `conv_up2`, `conv_hr`, `conv_last`, usually wrapped in `{"params_ema": ...}` or
  `{"params": ...}` (`params_ema` wins when both are there). Our module's own layout.
- "old" (original ESRGAN sequential models; community models such as NMKD_Siax and
  4x_AnimeSharp): `model.0`, `model.1.sub.N.RDB1.conv1.0`, `model.1.sub.<blocks>` (the body
  conv), then for each upsample `model.3`, `model.6`, ... and `conv_hr` / `conv_last` as the
  last two indices (`model.8`, `model.10` for x4).
- "esrgan" (the ESRGAN repository's later layout): `conv_first`, `RRDB_trunk.N.RDB1.conv1`,
  `trunk_conv`, `upconv1`, `upconv2`, `HRconv`, `conv_last`.

Loading is strict: the layout, block count, feature and growth widths, the number of upsample
convs and the pixel-unshuffle factor (input channels 3 / 12 / 48) are read from the keys and
shapes; then every key must be used and every module key present with its shape, else
`UpscalerWeightsMismatch` names the keys. `.pth` / `.pt` files are read with
`torch.load(weights_only=True)`, `.safetensors` with safetensors. A meta-device state dict gives
a meta-device module (layout checks without memory).

`BUILTIN_UPSCALERS` maps each AI Horde upscaler name to a factory of a tiny seeded random-weight
state dict in that model's published layout and wrapper (tests, the embedded demo);
`upscaler_state_dict(name, tiny=False, device="meta")` gives the full published shapes.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

NEGATIVE_SLOPE = 0.2
RESIDUAL_SCALE = 0.2
RGB_CHANNELS = 3
# Input channels -> pixel-unshuffle factor (Real-ESRGAN's x2 and x1 networks).
UNSHUFFLE_BY_IN_CHANNELS = {3: 1, 12: 2, 48: 4}
WRAPPER_KEYS = ("params_ema", "params")
LAYOUTS = ("new", "old", "esrgan")


class UpscalerWeightsMismatch(ValueError):
    """A state dict whose keys or shapes do not fit the upscaler built for it."""


# --------------------------------------------------------------------------------------------
# The network


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed the block input and every earlier output (dense connections);
    LeakyReLU after the first four; the fifth's output is scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), NEGATIVE_SLOPE))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, scaled by 0.2, plus the input."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator. `num_upsample` nearest x2 + conv stages (`conv_up1`, `conv_up2`, ...);
    `unshuffle` > 1 pixel-unshuffles the RGB input first (in channels 3 * unshuffle^2), so the
    overall scale is 2^num_upsample / unshuffle (Real-ESRGAN x2: unshuffle 2, two upsamples).
    Input height and width must be multiples of `unshuffle` (`upscale` pads for it)."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32, num_upsample: int = 2):
        super().__init__()
        if num_in_ch not in UNSHUFFLE_BY_IN_CHANNELS:
            raise ValueError(f"RRDBNet takes 3, 12 or 48 input channels, not {num_in_ch}")
        unshuffle = UNSHUFFLE_BY_IN_CHANNELS[num_in_ch]
        if num_upsample < 0 or (2 ** num_upsample) % unshuffle:
            raise ValueError(
                f"{num_upsample} upsamples cannot undo a pixel-unshuffle by {unshuffle}")
        self.num_in_ch, self.num_out_ch = num_in_ch, num_out_ch
        self.num_feat, self.num_block, self.num_grow_ch = num_feat, num_block, num_grow_ch
        self.num_upsample, self.unshuffle = num_upsample, unshuffle
        self.scale = 2 ** num_upsample // unshuffle
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for i in range(1, num_upsample + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.num_upsample + 1):
            conv = getattr(self, f"conv_up{i}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")),
                                NEGATIVE_SLOPE)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), NEGATIVE_SLOPE))


# --------------------------------------------------------------------------------------------
# Key layouts


@dataclass(frozen=True)
class RRDBConfig:
    """What a state dict says about its network."""

    layout: str  # "new", "old" or "esrgan"
    num_block: int
    num_feat: int
    num_grow_ch: int
    num_in_ch: int
    num_out_ch: int
    num_upsample: int

    @property
    def unshuffle(self) -> int:
        return UNSHUFFLE_BY_IN_CHANNELS.get(self.num_in_ch, 0)

    @property
    def scale(self) -> int:
        return 2 ** self.num_upsample // max(1, self.unshuffle)

    def build(self) -> RRDBNet:
        return RRDBNet(self.num_in_ch, self.num_out_ch, self.num_feat, self.num_block,
                       self.num_grow_ch, self.num_upsample)


_NEW_BODY = re.compile(r"^body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$")
_OLD_BODY = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_TRUNK = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_ESRGAN_BODY = re.compile(r"^RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)$")
_NEW_UP = re.compile(r"^conv_up(\d+)\.weight$")
_ESRGAN_RENAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}


def detect_layout(state_dict: Mapping[str, object]) -> str:
    """"new", "old" or "esrgan"; raises `UpscalerWeightsMismatch` for anything else."""
    if "conv_first.weight" in state_dict:
        if any(k.startswith("RRDB_trunk.") for k in state_dict):
            return "esrgan"
        return "new"
    if "model.0.weight" in state_dict and any(_OLD_BODY.match(k) for k in state_dict):
        return "old"
    sample = ", ".join(sorted(state_dict)[:5])
    raise UpscalerWeightsMismatch(
        "not an ESRGAN-family state dict: no conv_first.weight nor model.0.weight with "
        f"model.1.sub.*.RDB* keys (first keys: {sample})")


def _old_indices(num_upsample: int) -> tuple[list[int], int, int]:
    """Sequential indices of the old layout after the trunk: upsample convs, conv_hr, conv_last
    (each upsample is Upsample, conv, LeakyReLU; conv_hr is followed by a LeakyReLU)."""
    ups = [3 + 3 * i for i in range(num_upsample)]
    hr = 2 + 3 * num_upsample
    return ups, hr, hr + 2


def _old_num_blocks(state_dict: Mapping[str, object]) -> int:
    return 1 + max((int(m.group(1)) for k in state_dict if (m := _OLD_BODY.match(k))), default=-1)


def _old_num_upsample(state_dict: Mapping[str, object]) -> int:
    tops = [int(m.group(1)) for k in state_dict if (m := _OLD_TOP.match(k))]
    last = max(tops, default=0)
    if last < 4 or (last - 4) % 3:
        raise UpscalerWeightsMismatch(
            f"old ESRGAN layout: cannot place the last conv model.{last} (expected model.4, "
            "model.7, model.10, ... for 0, 1, 2, ... upsamples)")
    return (last - 4) // 3


def new_layout_names(state_dict: Mapping[str, object]) -> dict[str, str]:
    """Each key of an old ESRGAN, ESRGAN-repository or new state dict -> our (Real-ESRGAN) key.
    Keys that fit no rule keep their name (strict loading then names them)."""
    layout = detect_layout(state_dict)
    if layout == "new":
        return {key: key for key in state_dict}
    names: dict[str, str] = {}
    if layout == "esrgan":
        for key in state_dict:
            new_key = key
            if m := _ESRGAN_BODY.match(key):
                new_key = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
            else:
                head, _, tail = key.partition(".")
                if head in _ESRGAN_RENAMES:
                    new_key = f"{_ESRGAN_RENAMES[head]}.{tail}"
                elif up := re.fullmatch(r"upconv(\d+)", head):
                    new_key = f"conv_up{up.group(1)}.{tail}"
            names[key] = new_key
        return names
    num_block = _old_num_blocks(state_dict)
    ups, hr, last = _old_indices(_old_num_upsample(state_dict))
    tops = {0: "conv_first", hr: "conv_hr", last: "conv_last"}
    tops.update({index: f"conv_up{i + 1}" for i, index in enumerate(ups)})
    for key in state_dict:
        new_key = key
        if m := _OLD_BODY.match(key):
            new_key = f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"
        elif (m := _OLD_TRUNK.match(key)) and int(m.group(1)) == num_block:
            new_key = f"conv_body.{m.group(2)}"
        elif (m := _OLD_TOP.match(key)) and int(m.group(1)) in tops:
            new_key = f"{tops[int(m.group(1))]}.{m.group(2)}"
        names[key] = new_key
    return names


def _renamed(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """The state dict under our keys, and our key -> the file's key; raises when two file keys
    become one of ours."""
    renamed: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, new_key in new_layout_names(state_dict).items():
        if new_key in original:
            raise UpscalerWeightsMismatch(f"{original[new_key]} and {key} are both {new_key}")
        renamed[new_key], original[new_key] = state_dict[key], key
    return renamed, original


def to_new_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An old ESRGAN or ESRGAN-repository state dict under our (Real-ESRGAN) keys; a new one
    comes back as a plain dict."""
    return _renamed(state_dict)[0]


def to_old_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (new-layout) keys as the old ESRGAN sequential model's keys (the inverse of
    `to_new_layout` for old files). Raises for keys that have no old name."""
    sd = to_new_layout(state_dict)
    num_block = 1 + max((int(m.group(1)) for k in sd if (m := _NEW_BODY.match(k))), default=-1)
    num_upsample = sum(1 for k in sd if _NEW_UP.match(k))
    ups, hr, last = _old_indices(num_upsample)
    tops = {"conv_first": 0, "conv_hr": hr, "conv_last": last}
    tops.update({f"conv_up{i + 1}": index for i, index in enumerate(ups)})
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        head, _, tail = key.partition(".")
        if m := _NEW_BODY.match(key):
            out[f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.0.{m.group(4)}"] = value
        elif head == "conv_body":
            out[f"model.1.sub.{num_block}.{tail}"] = value
        elif head in tops:
            out[f"model.{tops[head]}.{tail}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise UpscalerWeightsMismatch(f"no old ESRGAN name for: {', '.join(sorted(unknown))}")
    return out


def detect_config(state_dict: Mapping[str, torch.Tensor]) -> RRDBConfig:
    """Layout, blocks, widths, input channels and upsample count of a (flat) state dict."""
    layout = detect_layout(state_dict)
    sd = to_new_layout(state_dict)
    required = ["conv_first.weight", "body.0.rdb1.conv1.weight", "conv_last.weight"]
    if missing := [k for k in required if k not in sd]:
        raise UpscalerWeightsMismatch(f"{layout} layout without the keys (our names): "
                                      f"{', '.join(missing)}")
    first, grow, last = (sd[k] for k in required)
    if first.dim() != 4 or grow.dim() != 4 or last.dim() != 4:
        raise UpscalerWeightsMismatch("conv_first / body.0.rdb1.conv1 / conv_last weights are not "
                                      "4-d conv kernels")
    num_in_ch = int(first.shape[1])
    if num_in_ch not in UNSHUFFLE_BY_IN_CHANNELS:
        raise UpscalerWeightsMismatch(
            f"conv_first.weight takes {num_in_ch} input channels; only RGB (3) and RGB "
            "pixel-unshuffled by 2 (12) or 4 (48) are supported")
    num_out_ch = int(last.shape[0])
    if num_out_ch != RGB_CHANNELS:
        raise UpscalerWeightsMismatch(f"conv_last.weight gives {num_out_ch} channels, not RGB (3)")
    num_block = 1 + max(int(m.group(1)) for k in sd if (m := _NEW_BODY.match(k)))
    num_upsample = sum(1 for k in sd if _NEW_UP.match(k))
    config = RRDBConfig(layout, num_block, int(first.shape[0]), int(grow.shape[0]),
                        num_in_ch, num_out_ch, num_upsample)
    if 2 ** num_upsample % config.unshuffle:
        raise UpscalerWeightsMismatch(
            f"{num_upsample} upsample convs cannot undo the pixel-unshuffle by {config.unshuffle} "
            f"that {num_in_ch} input channels mean")
    return config


# --------------------------------------------------------------------------------------------
# Reading and loading


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a published file: `params_ema`, else `params`, else the
    object itself; raises `UpscalerWeightsMismatch` when it is not a dict of tensors."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UpscalerWeightsMismatch("not a state dict (a dict of tensors, optionally inside "
                                      "params_ema / params)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise UpscalerWeightsMismatch(f"entries that are not tensors: {', '.join(bad[:10])}")
    return dict(obj)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A published upscaler file as a flat CPU tensor dict (.safetensors through safetensors,
    anything else through `torch.load(weights_only=True)`)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path), device="cpu"))
    return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     original_names: Mapping[str, str] | None = None) -> None:
    """Raise `UpscalerWeightsMismatch` naming every missing key (ours, and the file layout's name
    from `original_names` when it differs), unexpected key (by its name in the file) and wrong
    shape."""
    names = original_names or {}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(f"{names[k]} ({k})" if names.get(k, k) != k else k
                     for k in expected if k not in state_dict)
    unexpected = sorted(names.get(k, k) for k in state_dict if k not in expected)
    shapes = sorted(f"{names.get(k, k)} {tuple(v.shape)} != {expected[k]}"
                    for k, v in state_dict.items()
                    if k in expected and tuple(v.shape) != expected[k])
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("wrong shapes: " + ", ".join(shapes))
    if problems:
        raise UpscalerWeightsMismatch("state dict does not fit RRDBNet: " + "; ".join(problems))


def load_upscaler(state_dict_or_path: Mapping[str, torch.Tensor] | str | Path, *,
                  dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None) -> tuple[RRDBNet, int]:
    """Build the RRDBNet a state dict (or a .pth / .safetensors file) describes and load it
    strictly. Floating tensors are cast to `dtype`; the module lives where the tensors do (or on
    `device`); meta tensors give a meta module. The module is in eval mode without gradients
    and may share storage with the given tensors. Returns (module, scale)."""
    if isinstance(state_dict_or_path, (str, Path)):
        raw = read_state_dict(state_dict_or_path)
    else:
        raw = unwrap_state_dict(state_dict_or_path)
    config = detect_config(raw)
    converted, original_names = _renamed(raw)
    tensors = {}
    for key, value in converted.items():
        if value.is_floating_point():
            value = value.to(dtype=dtype)
        if device is not None:
            value = value.to(device)
        tensors[key] = value
    with torch.device("meta"):
        module = config.build()
    if config.layout == "old":  # name missing keys as the file would have them, too
        expected = module.state_dict()
        for ours, theirs in zip(expected, to_old_layout(expected)):
            original_names.setdefault(ours, theirs)
    check_state_dict(module, tensors, original_names)
    module.load_state_dict(tensors, strict=True, assign=True)
    module.eval().requires_grad_(False)
    return module, module.scale


# --------------------------------------------------------------------------------------------
# Inference


def _module_place(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def upscale(module: RRDBNet, scale: int, image: Image.Image, tile: int = 0,
            tile_pad: int = 16) -> Image.Image:
    """Upscale an image (any PIL mode; converted to RGB) by exactly `scale`. `tile` > 0 runs the
    network on input tiles of at most `tile` pixels a side, each with `tile_pad` pixels of
    context on every side that is cut from its output, bounding memory; the seams match the
    untiled result when the context covers the network's effective reach."""
    if scale != module.scale:
        raise ValueError(f"scale {scale} does not match the module's scale {module.scale}")
    device, dtype = _module_place(module)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = rgb.shape[:2]
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].to(device=device, dtype=dtype) / 255.0
    step = module.unshuffle
    pad_h, pad_w = (-height) % step, (-width) % step
    if pad_h or pad_w:  # pixel-unshuffle needs sides that are multiples of its factor
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.inference_mode():
        if tile <= 0 or (x.shape[2] <= tile and x.shape[3] <= tile):
            out = module(x)
        else:
            out = _tiled(module, x, _round_up(tile, step), _round_up(max(0, tile_pad), step))
        out = out[:, :, :height * scale, :width * scale].clamp(0, 1)
        array = (out[0].permute(1, 2, 0).float() * 255.0).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _tiled(module: RRDBNet, x: torch.Tensor, tile: int, pad: int) -> torch.Tensor:
    scale = module.scale
    _, channels, height, width = x.shape
    out = x.new_empty((1, RGB_CHANNELS, height * scale, width * scale))
    for y0 in range(0, height, tile):
        y1 = min(height, y0 + tile)
        for x0 in range(0, width, tile):
            x1 = min(width, x0 + tile)
            cy0, cy1 = max(0, y0 - pad), min(height, y1 + pad)
            cx0, cx1 = max(0, x0 - pad), min(width, x1 + pad)
            result = module(x[:, :, cy0:cy1, cx0:cx1])
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                result[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out


# --------------------------------------------------------------------------------------------
# Published shapes and builtin tiny weights


@dataclass(frozen=True)
class UpscalerSpec:
    """A published upscaler's architecture and file layout."""

    name: str
    layout: str  # "new" or "old"
    scale: int
    num_block: int = 23
    num_feat: int = 64
    num_grow_ch: int = 32
    wrapper: str | None = None  # "params_ema" for the Real-ESRGAN releases

    @property
    def num_in_ch(self) -> int:
        return RGB_CHANNELS * (4 // self.scale) ** 2  # x4: 3, x2: 12 (the x4 body)


PUBLISHED_UPSCALERS: dict[str, UpscalerSpec] = {
    spec.name: spec for spec in (
        UpscalerSpec("RealESRGAN_x4plus", "new", 4, wrapper="params_ema"),
        UpscalerSpec("RealESRGAN_x2plus", "new", 2, wrapper="params_ema"),
        UpscalerSpec("RealESRGAN_x4plus_anime_6B", "new", 4, num_block=6, wrapper="params_ema"),
        UpscalerSpec("NMKD_Siax", "old", 4),
        UpscalerSpec("4x_AnimeSharp", "old", 4),
    )
}
# Tiny builtin sizes: (blocks, features, growth channels).
TINY_SIZES = {"RealESRGAN_x4plus_anime_6B": (1, 12, 8)}
TINY_DEFAULT = (2, 16, 8)


def upscaler_state_dict(name: str, *, tiny: bool = True, seed: int | None = None,
                        device: str | torch.device = "cpu") -> dict:
    """A state dict in the published layout and wrapper of an AI Horde upscaler: tiny (few
    blocks, narrow features) or full size; seeded random weights (on "meta": shapes only)."""
    spec = PUBLISHED_UPSCALERS[name]
    num_block, num_feat, num_grow = (TINY_SIZES.get(name, TINY_DEFAULT) if tiny
                                     else (spec.num_block, spec.num_feat, spec.num_grow_ch))
    with torch.device("meta"):
        shapes = RRDBNet(spec.num_in_ch, RGB_CHANNELS, num_feat, num_block, num_grow,
                         num_upsample=2).state_dict()
    device = torch.device(device)
    if device.type == "meta":
        sd = {k: torch.empty(v.shape, device="meta") for k, v in shapes.items()}
    else:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) if seed is None else seed)
        sd = {}
        for key, ref in shapes.items():
            if key.endswith(".weight"):
                fan_in = ref.shape[1] * ref.shape[2] * ref.shape[3]
                # Real-ESRGAN's init: Kaiming normal, x0.1 inside the dense blocks.
                std = (2.0 / fan_in) ** 0.5 * (0.1 if key.startswith("body.") else 1.0)
                value = torch.randn(ref.shape, generator=gen) * std
            else:
                value = torch.randn(ref.shape, generator=gen) * 0.01
            sd[key] = value.to(device)
        # Mid-grey outputs with a modest spread, so that few pixels are clamped to 0 or 255.
        sd["conv_last.weight"] = sd["conv_last.weight"] * 0.1
        sd["conv_last.bias"] = sd["conv_last.bias"] + 0.5
    if spec.layout == "old":
        sd = to_old_layout(sd)
    return {spec.wrapper: sd} if spec.wrapper else sd


def _builtin(name: str) -> Callable[[], dict]:
    def factory() -> dict:
        return upscaler_state_dict(name)

    factory.__name__ = f"builtin_{name}"
    factory.__doc__ = f"Tiny seeded random-weight {name} state dict in its published layout."
    return factory


BUILTIN_UPSCALERS: dict[str, Callable[[], dict]] = {
    name: _builtin(name) for name in PUBLISHED_UPSCALERS
}

__all__ = [
    "BUILTIN_UPSCALERS", "PUBLISHED_UPSCALERS", "RRDB", "RRDBConfig", "RRDBNet",
    "ResidualDenseBlock", "UpscalerSpec", "UpscalerWeightsMismatch", "check_state_dict",
    "detect_config", "detect_layout", "load_upscaler", "new_layout_names", "read_state_dict",
    "to_new_layout", "to_old_layout", "unwrap_state_dict", "upscale", "upscaler_state_dict",
]
