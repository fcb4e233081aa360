"""HED soft edges (`hed`) and fake scribbles (`fakescribbles`).

The network is the layout lllyasviel published under Apache-2.0 as `ControlNetHED.pth` in
`lllyasviel/Annotators` ("ControlNetHED_Apache2"), written here from its key layout:

- `norm`: a (1, 3, 1, 1) parameter subtracted from the 0..255 RGB input (no other scaling);
- `block1`..`block5`: each `convs.{i}` 3x3 convolutions (padding 1, ReLU after each) then a
  1x1 `projection` to one channel taken from the block's output; blocks 2-5 first max-pool
  2x2. Widths 64, 128, 256, 512, 512; convolution counts 2, 2, 3, 3, 3 (VGG16's).

The edge map is sigmoid(mean of the five projections, each bilinearly resized to the image).
Fake scribbles then follow ControlNet's preprocessing: thin the HED edges by non-maximum
suppression (Gaussian blur sigma 3, keep pixels that are the maximum of their 3-pixel line
along any of the four directions, threshold 127), blur again with sigma 3, and binarise
(anything above 4 becomes a white stroke on black).
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

FULL_WIDTHS = (64, 128, 256, 512, 512)
LAYERS = (2, 2, 3, 3, 3)
# ImageNet's channel means in 0..255: what `norm` holds in the builtin weights.
_MEAN = (123.68, 116.78, 103.94)


class DoubleConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1)
                                     for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down:
            x = F.max_pool2d(x, 2, 2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = FULL_WIDTHS):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (w, n) in enumerate(zip(widths, LAYERS), start=1):
            setattr(self, f"block{i}", DoubleConvBlock(cin, w, n))
            cin = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        out = []
        for i in range(1, 6):
            h, p = getattr(self, f"block{i}")(h, down=i > 1)
            out.append(p)
        return out

    @staticmethod
    def widths_of(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(channels(state_dict, f"block{i}.convs.0.weight") for i in range(1, 6))


def build_builtin(seed: int = 0) -> HEDNet:
    """The real layout at 1/8 of the widths, seeded."""
    net = seeded_init(HEDNet(tuple(w // 8 for w in FULL_WIDTHS)), seed)
    with torch.no_grad():
        net.norm.copy_(torch.tensor(_MEAN).view(1, 3, 1, 1))
        net.block1.convs[0].weight.div_(64.0)  # the input is 0..255: keep activations O(1)
    return net.eval()


def hed_edges(net: HEDNet, rgb: np.ndarray) -> np.ndarray:
    """HxW uint8 soft edges of an HxWx3 uint8 RGB array (at that array's size)."""
    h, w = rgb.shape[:2]
    device = net.norm.device
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device, torch.float32)
    x = x.permute(2, 0, 1)[None]
    with torch.inference_mode():
        projections = net(x)
    maps = [cv2.resize(p[0, 0].float().cpu().numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
            for p in projections]
    mean = np.mean(np.stack(maps, axis=2), axis=2)
    edge = 0.5 * (1.0 + np.tanh(0.5 * mean))  # sigmoid, without overflow
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def thin(edges: np.ndarray, threshold: int = 127, sigma: float = 3.0) -> np.ndarray:
    """Non-maximum suppression: blur, keep pixels equal to the max of their 3-pixel line in
    one of the four directions (horizontal, vertical, both diagonals), threshold."""
    x = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
        [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
    )]
    keep = np.zeros_like(x)
    for k in kernels:
        np.putmask(keep, cv2.dilate(x, kernel=k) == x, x)
    out = np.zeros(edges.shape, dtype=np.uint8)
    out[keep > threshold] = 255
    return out


def fake_scribble(edges: np.ndarray) -> np.ndarray:
    """HED edges -> white scribble strokes on black (ControlNet's fake scribble steps)."""
    m = thin(edges, 127, 3.0)
    m = cv2.GaussianBlur(m, (0, 0), 3.0)
    out = np.zeros_like(m)
    out[m > 4] = 255
    return out


class HEDAnnotator:
    def __init__(self, net: HEDNet, scribble: bool = False, resolution: int = 512):
        self.net, self.scribble, self.resolution = net.eval(), scribble, resolution

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        edges = hed_edges(self.net, resize_for_detection(rgb, self.resolution))
        edges = cv2.resize(edges, (w, h), interpolation=cv2.INTER_LINEAR)
        if self.scribble:
            edges = fake_scribble(edges)
        return to_map(edges)
