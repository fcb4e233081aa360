"""Semantic segmentation (`seg`): an ADE20K (150 classes) segmentation network from
transformers, coloured with the ADE20K palette ControlNet's seg model was trained on.

Networks: `SegformerForSemanticSegmentation` (builtin: a tiny random MiT-b0-shaped config;
published: e.g. nvidia/segformer-b0-finetuned-ade-512-512) or any model
`AutoModelForSemanticSegmentation` loads (openmmlab/upernet-convnext-small, ...). Input:
ImageNet mean/std normalisation at the detection size (shorter side 512, multiples of 64);
the logits are upsampled bilinearly to that size, the argmax class of each pixel is painted
with `ADE20K_PALETTE[class]` and the map is resized back with nearest neighbours.

The palette (mmsegmentation's ADE20K table, used by ControlNet's UniFormer annotator) lists
150 colours of which 149 are distinct: class 6 ("road") and class 48 ("skyscraper") share
(140, 140, 140) in the published table, and ControlNet's seg model was trained with it so.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.annotators.common import resize_for_detection, to_map, to_rgb_array

ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
NUM_CLASSES = 150
_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def build_builtin(seed: int = 0):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    cfg = SegformerConfig(num_labels=NUM_CLASSES, hidden_sizes=[8, 16, 32, 64],
                          num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
                          decoder_hidden_size=32, sr_ratios=[8, 4, 2, 1], mlp_ratios=[2, 2, 2, 2])
    return SegformerForSemanticSegmentation(cfg).eval()


def colorize(classes: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 RGB through the ADE20K palette."""
    palette = np.array(ADE20K_PALETTE, dtype=np.uint8)
    return palette[np.clip(classes, 0, NUM_CLASSES - 1)]


class SegAnnotator:
    def __init__(self, model, resolution: int = 512):
        self.model, self.resolution = model.eval(), resolution
        n = getattr(model.config, "num_labels", NUM_CLASSES)
        if n != NUM_CLASSES:
            raise ValueError(f"seg needs an ADE20K model (150 classes); this one has {n}")

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        small = resize_for_detection(rgb, self.resolution)
        x = (small.astype(np.float32) - _MEAN) / _STD
        x = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
        param = next(self.model.parameters())
        with torch.inference_mode():
            logits = self.model(pixel_values=x.to(param.device, param.dtype)).logits
            logits = F.interpolate(logits.float(), size=small.shape[:2], mode="bilinear",
                                   align_corners=False)
            classes = logits.argmax(dim=1)[0].cpu().numpy()
        return to_map(colorize(classes), (w, h), cv2.INTER_NEAREST)
