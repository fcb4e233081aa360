"""Straight lines (`hough`) with M-LSD large (Gu et al., "Towards Light-weight and Real-time
Line Segment Detection", AAAI 2022), laid out as `mlsd_large_512_fp32.pth` in
`lllyasviel/Annotators` (written here from the paper and that file's key layout):

- `backbone.features.0..13`: MobileNetV2 cut after its 96-channel stage. `features.0` is a
  stride-2 3x3 conv/BN/ReLU6 taking 4 channels (RGB plus a constant plane) with TFLite-style
  padding (pad right/bottom by one, no conv padding). Then inverted residuals (t, c, n, s) =
  (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1): `conv.0` 1x1 expand (t > 1),
  `conv.{0|1}` 3x3 depthwise (stride s), then a 1x1 projection conv and BN (residual when the
  stride is 1 and widths match). Features 1, 3, 6, 10, 13 feed the decoder.
- decoder `block15..block23`: type A (1x1 conv/BN/ReLU on the skip and on the deeper map,
  bilinear x2 of the deeper map except for block15, concatenation), type B (3x3 conv/BN/ReLU
  with a residual, then 3x3 conv/BN/ReLU), type C (dilation-5 3x3, 3x3, 1x1 to 16 channels).
  Channels 7..15 of the output are the tri-points map: [0] centre logits, [1:5] displacement of
  the two end points, at half the input resolution.

Decoding: sigmoid of the centres, 3x3 max-pool non-maximum suppression, the 200 best points;
a line is kept when its score is above 0.1 and its length above 0.1 (the thresholds ControlNet
uses for hough), scaled x2 to the input and drawn 1 px white on black.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.annotators.common import (
    channels,
    resize_for_detection,
    seeded_init,
    to_map,
    to_rgb_array,
)

# (expand ratio, repeats, first stride) of each MobileNetV2 stage kept by M-LSD
STAGES = ((1, 1, 1), (6, 2, 2), (6, 3, 2), (6, 4, 2), (6, 3, 1))
FULL_WIDTHS = (32, 16, 24, 32, 64, 96)  # stem, then each stage
FULL_DECODER = 64
FPN = (1, 3, 6, 10, 13)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        pad = 0 if stride == 2 else (k - 1) // 2
        super().__init__(nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = int(round(cin * t))
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, k=1)] if t != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class Backbone(nn.Module):
    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        feats: list[nn.Module] = [ConvBNReLU(4, widths[0], stride=2)]
        cin = widths[0]
        for (t, n, s), c in zip(STAGES, widths[1:]):
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*feats)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, f in enumerate(self.features):
            x = f(x)
            if i in FPN:
                out.append(x)
        return out


def _cbr(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BlockA(nn.Module):
    """Merge a skip (`a`, conv2) with the deeper map (`b`, conv1)."""

    def __init__(self, c_skip: int, c_deep: int, out_skip: int, out_deep: int, up: bool = True):
        super().__init__()
        self.conv1 = _cbr(c_deep, out_deep, 1)
        self.conv2 = _cbr(c_skip, out_skip, 1)
        self.up = up

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = self.conv1(b)
        a = self.conv2(a)
        if self.up:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((a, b), dim=1)


class BlockB(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _cbr(cin, cin, 3)
        self.conv2 = _cbr(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockC(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _cbr(cin, cin, 3, dilation=5)
        self.conv2 = _cbr(cin, cin, 3)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    def __init__(self, widths: tuple[int, ...] = FULL_WIDTHS, d: int = FULL_DECODER):
        super().__init__()
        self.widths, self.d = tuple(widths), d
        self.backbone = Backbone(widths)
        c1, c2, c3, c4, c5 = widths[1:]
        self.block15 = BlockA(c4, c5, d, d, up=False)
        self.block16 = BlockB(2 * d, d)
        self.block17 = BlockA(c3, d, d, d)
        self.block18 = BlockB(2 * d, d)
        self.block19 = BlockA(c2, d, d, d)
        self.block20 = BlockB(2 * d, d)
        self.block21 = BlockA(c1, d, d, d)
        self.block22 = BlockB(2 * d, d)
        self.block23 = BlockC(d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, 7:]

    @staticmethod
    def config_of(state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
        widths = [channels(state_dict, "backbone.features.0.0.weight"),
                  channels(state_dict, "backbone.features.1.conv.1.weight")]
        first = 2
        for _, n, _ in STAGES[1:]:
            widths.append(channels(state_dict, f"backbone.features.{first}.conv.2.weight"))
            first += n
        return tuple(widths), channels(state_dict, "block15.conv1.0.weight")


def build_builtin(seed: int = 0) -> MLSDLarge:
    """The real backbone, a 16-wide decoder (64 in the published file), seeded."""
    return seeded_init(MLSDLarge(FULL_WIDTHS, 16), seed).eval()


def detect_lines(net: MLSDLarge, rgb: np.ndarray, score_thr: float = 0.1,
                 dist_thr: float = 0.1, topk: int = 200) -> np.ndarray:
    """(N, 4) float lines x0, y0, x1, y1 in the pixels of `rgb` (whose sides are even)."""
    h, w = rgb.shape[:2]
    x = np.concatenate([rgb.astype(np.float32), np.ones((h, w, 1), np.float32)], axis=2)
    x = torch.from_numpy(x.transpose(2, 0, 1)[None] / 127.5 - 1.0)
    x = x.to(next(net.parameters()).device)
    with torch.inference_mode():
        tp = net(x)[0].float()
    heat = torch.sigmoid(tp[0])
    hmax = F.max_pool2d(heat[None, None], 3, stride=1, padding=1)[0, 0]
    heat = (heat * (hmax == heat)).reshape(-1)
    mh, mw = tp.shape[1:]
    scores, idx = torch.topk(heat, min(topk, heat.numel()))
    ys, xs = (idx // mw).cpu().numpy(), (idx % mw).cpu().numpy()
    disp = tp[1:5].permute(1, 2, 0).cpu().numpy()  # (mh, mw, 4): dx0, dy0, dx1, dy1
    d = disp[ys, xs]
    length = np.sqrt((d[:, 0] - d[:, 2]) ** 2 + (d[:, 1] - d[:, 3]) ** 2)
    keep = (scores.cpu().numpy() > score_thr) & (length > dist_thr)
    centres = np.stack([xs, ys, xs, ys], axis=1).astype(np.float32)
    lines = (centres[keep] + d[keep]) * 2.0
    lines[:, [0, 2]] *= w / (2.0 * mw)
    lines[:, [1, 3]] *= h / (2.0 * mh)
    return lines


def draw_lines(lines: np.ndarray, width: int, height: int) -> np.ndarray:
    canvas = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in lines:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas


class MLSDAnnotator:
    def __init__(self, net: MLSDLarge, resolution: int = 512):
        self.net, self.resolution = net.eval(), resolution

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        small = resize_for_detection(rgb, self.resolution)
        lines = detect_lines(self.net, small)
        canvas = draw_lines(lines, small.shape[1], small.shape[0])
        return to_map(canvas, (w, h), cv2.INTER_NEAREST)
