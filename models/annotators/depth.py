"""Depth (`depth`) and normals from depth (`normal`) with transformers' DPT.

The network is `DPTForDepthEstimation` (the Intel/dpt-hybrid-midas family: a BiT-ResNet stem,
a ViT, reassembled features fused into a relative inverse depth map). The hybrid takes a
fixed square input (`config.image_size`, 384 in the published model); plain-ViT DPTs take
any multiple of the patch size. Input: RGB / 127.5 - 1 (mean 0.5, std 0.5).

- depth map: the prediction min-max normalised to 0..255 (near is white), grey in 3 channels.
- normal map (ControlNet's "normal from MiDaS"): 3x3 Sobel x/y gradients of the raw
  prediction, set to 0 where the normalised depth is below the background threshold 0.1,
  z = 2*pi everywhere, the vector normalised to unit length and mapped to 0..255 as
  (x, y, z) -> (R, G, B).
Both are computed at the detection size (shorter side 384, multiples of 64, as ControlNet's
MiDaS sees the image) and resized back to the input's size.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BitConfig, DPTConfig, DPTForDepthEstimation

from models.annotators.common import detection_size, to_map, to_rgb_array


def builtin_config(image_size: int = 384) -> DPTConfig:
    """A tiny DPT-hybrid: the published model's structure (BiT stages feeding the first two
    reassemble stages, ViT layers the last two, project readout) at toy widths."""
    backbone = BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                         hidden_sizes=[16, 32, 64], embedding_size=8, num_groups=4,
                         out_features=["stage1", "stage2", "stage3"])
    return DPTConfig(is_hybrid=True, backbone_config=backbone, hidden_size=32,
                     num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     image_size=image_size, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                     neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16,
                     head_in_index=-1, readout_type="project",
                     reassemble_factors=[1, 1, 1, 0.5], neck_ignore_stages=[0, 1],
                     backbone_featmap_shape=[1, 64, image_size // 16, image_size // 16])


def build_builtin(seed: int = 0) -> DPTForDepthEstimation:
    torch.manual_seed(seed)  # transformers' own init, made repeatable
    return DPTForDepthEstimation(builtin_config()).eval()


def predict_depth(model: DPTForDepthEstimation, rgb: np.ndarray) -> np.ndarray:
    """float32 HxW relative inverse depth at the size of `rgb`."""
    h, w = rgb.shape[:2]
    cfg = model.config
    if cfg.is_hybrid:
        size = (cfg.image_size, cfg.image_size)
    else:  # any multiple of the patch size (32 keeps the fusion upsamplings exact)
        size = (max(32, round(w / 32) * 32), max(32, round(h / 32) * 32))
    x = cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC).astype(np.float32) / 127.5 - 1.0
    x = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    param = next(model.parameters())
    with torch.inference_mode():
        pred = model(pixel_values=x.to(param.device, param.dtype)).predicted_depth
        pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bicubic",
                             align_corners=False)[0, 0]
    return pred.cpu().numpy()


def depth_and_normal(depth: np.ndarray, bg_th: float = 0.1,
                     a: float = math.pi * 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(HxW uint8 depth image, HxWx3 uint8 normal image) from a raw inverse-depth map."""
    lo, hi = float(depth.min()), float(depth.max())
    norm = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    depth_image = (norm * 255.0).clip(0, 255).astype(np.uint8)
    x = cv2.Sobel(depth.astype(np.float32), cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth.astype(np.float32), cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, a)
    x[norm < bg_th] = 0
    y[norm < bg_th] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal ** 2.0, axis=2, keepdims=True) ** 0.5
    normal_image = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    return depth_image, normal_image


class DepthAnnotator:
    def __init__(self, model: DPTForDepthEstimation, normal: bool = False, resolution: int = 384):
        self.model, self.normal, self.resolution = model.eval(), normal, resolution

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        dw, dh = detection_size(w, h, self.resolution)
        small = cv2.resize(rgb, (dw, dh), interpolation=cv2.INTER_AREA)
        depth_image, normal_image = depth_and_normal(predict_depth(self.model, small))
        return to_map(normal_image if self.normal else depth_image, (w, h))
