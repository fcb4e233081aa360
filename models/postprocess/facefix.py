"""Face fixing (the AI Horde's ``GFPGAN`` and ``CodeFormers`` post-processors).

Pipeline, per face:

1. **Detection**: OpenCV's Haar frontal-face cascade (``haarcascade_frontalface_default.xml``).
   OpenCV 4.x ships it in ``cv2.data.haarcascades`` and runs it with ``cv2.CascadeClassifier``;
   OpenCV 5 dropped both from the wheels, so this module also carries the cascade file
   (``haarcascade_frontalface_default.xml.gz``, Intel's BSD-style licence in its header) and
   evaluates it with :class:`HaarCascade`, a numpy port of the same Viola-Jones evaluation
   (image pyramid with scale factor 1.1, stump stages, variance normalisation, neighbour
   grouping). The detector is pluggable: any ``callable(rgb ndarray) -> [(x, y, w, h)]``.
2. **Alignment**: the Haar box gives no landmarks, so the crop is a similarity transform
   without rotation: a square of side ``crop_scale`` x the box side, centred on the box centre
   moved up by ``center_shift`` x the box side (the FFHQ-style crops the restorers were trained
   on show the whole head with the eyes a little above the middle), warped to 512 x 512.
   (Landmark-based alignment, as GFPGAN's own helper does with RetinaFace's five points, would
   also level tilted faces.)
3. **Restoration**: the 512 px network in [-1, 1] (:mod:`.gfpgan_arch`, :mod:`.codeformer_arch`).
   CodeFormer's fidelity weight ``w`` is ``facefixer_strength``.
4. **Paste-back**: the restored crop is warped back with the inverse transform and blended
   through a feathered square mask (zero on a thin margin at the crop border, ramping to one
   over ``feather`` x 512 px) scaled by ``facefixer_strength``: 0 leaves the image unchanged,
   1 replaces the face region fully. Pixels the mask does not reach are copied unchanged, so
   an image without faces comes back byte-identical.
"""

from __future__ import annotations

import gzip
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from models.postprocess.codeformer_arch import CodeFormer, codeformer_tiny
from models.postprocess.gfpgan_arch import GFPGANv1Clean, gfpgan_tiny

FaceBox = tuple[int, int, int, int]  # x, y, w, h in image pixels
Detector = Callable[[np.ndarray], list[FaceBox]]

CASCADE_NAME = "haarcascade_frontalface_default.xml"
VENDORED_CASCADE = os.path.join(os.path.dirname(os.path.abspath(__file__)), CASCADE_NAME + ".gz")
CROP_SIZE = 512
FACE_FIXERS = ("GFPGAN", "CodeFormers")


# ---------------------------------------------------------------------------------------------
# Haar cascade (numpy evaluator for OpenCV's "new" cascade XML with stump classifiers)


def _read_xml(path: str) -> bytes:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _nums(text: str | None) -> list[float]:
    return [float(t) for t in (text or "").split()]


@dataclass
class _Stage:
    threshold: float
    feature: np.ndarray  # (n,) feature index per stump
    node_threshold: np.ndarray  # (n,)
    left: np.ndarray  # value when feature < threshold
    right: np.ndarray


class HaarCascade:
    """A boosted Haar cascade of decision stumps, evaluated with integral images."""

    def __init__(self, width: int, height: int, stages: list[_Stage],
                 features: list[list[tuple[int, int, int, int, float]]]):
        self.width, self.height = width, height
        self.stages = stages
        self.features = features
        if any(len(f) > 3 for f in features):
            raise ValueError("Haar features have at most three rectangles")
        self._offsets: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def load(cls, path: str) -> HaarCascade:
        root = ET.fromstring(_read_xml(path))
        cascade = root.find("cascade")
        if cascade is None or (cascade.findtext("stageType") or "").strip() != "BOOST" or \
                (cascade.findtext("featureType") or "").strip() != "HAAR":
            raise ValueError(f"{path}: not a BOOST/HAAR cascade in OpenCV's current format")
        width, height = int(cascade.findtext("width")), int(cascade.findtext("height"))
        stages = []
        for st in cascade.find("stages"):
            feats, thrs, lefts, rights = [], [], [], []
            for weak in st.find("weakClassifiers"):
                nodes = _nums(weak.findtext("internalNodes"))
                leaves = _nums(weak.findtext("leafValues"))
                if len(nodes) != 4 or len(leaves) != 2:
                    raise ValueError(f"{path}: only stump classifiers are supported")
                feats.append(int(nodes[2]))
                thrs.append(nodes[3])
                lefts.append(leaves[0])
                rights.append(leaves[1])
            stages.append(_Stage(float(st.findtext("stageThreshold")),
                                 np.array(feats), np.array(thrs), np.array(lefts),
                                 np.array(rights)))
        features = []
        for feat in cascade.find("features"):
            if (feat.findtext("tilted") or "0").strip() not in ("", "0"):
                raise ValueError(f"{path}: tilted Haar features are not supported")
            rects = []
            for r in feat.find("rects"):
                x, y, w, h, wt = _nums(r.text)
                rects.append((int(x), int(y), int(w), int(h), wt))
            features.append(rects)
        return cls(width, height, stages, features)

    def _stage_offsets(self, si: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """Integral-image corner offsets (n, 12) and signed weights (n, 12) of stage ``si``'s
        features for an integral image ``stride`` wide (cached per stride)."""
        key = (si, stride)
        if key not in self._offsets:
            stage = self.stages[si]
            offs = np.zeros((len(stage.feature), 12), np.int64)
            coef = np.zeros((len(stage.feature), 12))
            for n, fi in enumerate(stage.feature):
                for r, (x, y, w, h, wt) in enumerate(self.features[fi]):
                    tl = y * stride + x
                    offs[n, 4 * r:4 * r + 4] = (tl, tl + w, tl + h * stride, tl + h * stride + w)
                    coef[n, 4 * r:4 * r + 4] = (wt, -wt, -wt, wt)
            self._offsets[key] = (offs, coef)
        return self._offsets[key]

    def _windows(self, gray: np.ndarray, step: int) -> np.ndarray:
        """Top-left corners (row-major flat offsets into the integral image) of accepted
        windows in ``gray`` (uint8, already at the scale being searched)."""
        h, w = gray.shape
        stride = w + 1
        ii = np.zeros((h + 1, w + 1), np.int64)
        ii[1:, 1:] = gray.astype(np.int64).cumsum(0).cumsum(1)
        sq = np.zeros((h + 1, w + 1), np.int64)
        sq[1:, 1:] = (gray.astype(np.int64) ** 2).cumsum(0).cumsum(1)
        flat, sqflat = ii.ravel(), sq.ravel()
        ys, xs = np.mgrid[0:h - self.height + 1:step, 0:w - self.width + 1:step]
        base = (ys * stride + xs).ravel()

        def rect_sum(arr: np.ndarray, base: np.ndarray, x: int, y: int, rw: int,
                     rh: int) -> np.ndarray:
            tl = y * stride + x
            br = tl + rh * stride + rw
            return arr[base + tl] - arr[base + tl + rw] - arr[base + br - rw] + arr[base + br]

        # variance normalisation over the window shrunk by one pixel on each side
        nw, nh = self.width - 2, self.height - 2
        s = rect_sum(flat, base, 1, 1, nw, nh).astype(np.float64)
        s2 = rect_sum(sqflat, base, 1, 1, nw, nh).astype(np.float64)
        nf = nw * nh * s2 - s * s
        inv = np.where(nf > 0, 1.0 / np.sqrt(np.maximum(nf, 1e-12)), 1.0)
        for si, stage in enumerate(self.stages):
            if base.size == 0:
                break
            offs, coef = self._stage_offsets(si, stride)
            # evaluate all stumps of the stage at once, in chunks of windows to bound memory
            acc = np.empty(base.size)
            chunk = max(1, 4_000_000 // offs.size)
            for a in range(0, base.size, chunk):
                b = base[a:a + chunk]
                sums = np.einsum("nk,nkw->nw", coef, flat[offs[:, :, None] + b[None, None, :]])
                vals = sums * inv[None, a:a + chunk]
                acc[a:a + chunk] = np.where(vals < stage.node_threshold[:, None],
                                            stage.left[:, None], stage.right[:, None]).sum(0)
            keep = acc >= stage.threshold
            base, inv = base[keep], inv[keep]
        return base

    def detect(self, gray: np.ndarray, scale_factor: float = 1.1, min_neighbors: int = 3,
               min_size: tuple[int, int] = (0, 0),
               max_size: tuple[int, int] | None = None) -> list[FaceBox]:
        """Like ``cv2.CascadeClassifier.detectMultiScale`` on a uint8 grayscale image."""
        h, w = gray.shape
        max_size = max_size or (w, h)
        raw: list[FaceBox] = []
        factor = 1.0
        while True:
            win_w, win_h = round(self.width * factor), round(self.height * factor)
            sw, sh = round(w / factor), round(h / factor)
            if win_w > max_size[0] or win_h > max_size[1]:
                break
            if sw < self.width or sh < self.height:
                break
            if win_w >= min_size[0] and win_h >= min_size[1]:
                scaled = gray if factor == 1.0 else cv2.resize(gray, (sw, sh),
                                                               interpolation=cv2.INTER_LINEAR)
                step = 1 if factor > 2 else 2
                for off in self._windows(scaled, step).tolist():
                    y, x = divmod(off, sw + 1)
                    raw.append((round(x * factor), round(y * factor), win_w, win_h))
            factor *= scale_factor
        return group_rectangles(raw, min_neighbors, 0.2)


def group_rectangles(rects: Sequence[FaceBox], threshold: int, eps: float = 0.2) -> list[FaceBox]:
    """Cluster similar boxes, average each cluster, keep clusters with more than ``threshold``
    members, and drop boxes lying inside a stronger one (OpenCV's ``groupRectangles``)."""
    n = len(rects)
    if threshold <= 0 or n == 0:
        return list(rects)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            a, b = rects[i], rects[j]
            delta = eps * (min(a[2], b[2]) + min(a[3], b[3])) * 0.5
            if (abs(a[0] - b[0]) <= delta and abs(a[1] - b[1]) <= delta
                    and abs(a[0] + a[2] - b[0] - b[2]) <= delta
                    and abs(a[1] + a[3] - b[1] - b[3]) <= delta):
                parent[find(i)] = find(j)
    clusters: dict[int, list[FaceBox]] = {}
    for i, r in enumerate(rects):
        clusters.setdefault(find(i), []).append(r)
    avg = []
    for members in clusters.values():
        m = np.array(members, np.float64).mean(0)
        avg.append((tuple(int(round(v)) for v in m), len(members)))
    out = []
    for i, (r1, n1) in enumerate(avg):
        if n1 <= threshold:
            continue
        inside = False
        for j, (r2, n2) in enumerate(avg):
            if j == i or n2 <= threshold:
                continue
            dx, dy = round(r2[2] * eps), round(r2[3] * eps)
            if (r1[0] >= r2[0] - dx and r1[1] >= r2[1] - dy
                    and r1[0] + r1[2] <= r2[0] + r2[2] + dx
                    and r1[1] + r1[3] <= r2[1] + r2[3] + dy
                    and (n2 > max(3, n1) or n1 < 3)):
                inside = True
                break
        if not inside:
            out.append(r1)
    return out


def find_cascade() -> str:
    """OpenCV's own file when the installed wheel ships it (4.x), else the vendored copy."""
    data = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if data and os.path.isfile(os.path.join(data, CASCADE_NAME)):
        return os.path.join(data, CASCADE_NAME)
    return VENDORED_CASCADE


class HaarFaceDetector:
    """Frontal faces with the Haar cascade; ``backend``: "auto" (OpenCV's CascadeClassifier when
    the installed OpenCV has it, else numpy), "opencv" or "numpy"."""

    def __init__(self, cascade_path: str | None = None, scale_factor: float = 1.1,
                 min_neighbors: int = 4, min_face: float = 0.06, max_side: int = 800,
                 backend: str = "auto"):
        self.cascade_path = cascade_path or find_cascade()
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_face, self.max_side = min_face, max_side
        if backend == "auto":
            backend = "opencv" if hasattr(cv2, "CascadeClassifier") else "numpy"
        self.backend = backend
        if backend == "opencv":
            self._cv = cv2.CascadeClassifier(self.cascade_path)  # FileStorage reads .xml.gz
            if self._cv.empty():
                raise ValueError(f"OpenCV could not load the cascade {self.cascade_path}")
        elif backend == "numpy":
            self._np = HaarCascade.load(self.cascade_path)
        else:
            raise ValueError(f"unknown backend {backend!r}")

    def __call__(self, rgb: np.ndarray) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        gray = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                              interpolation=cv2.INTER_AREA)
        side = max(24, int(self.min_face * min(gray.shape)))
        if self.backend == "opencv":
            found = self._cv.detectMultiScale(gray, self.scale_factor, self.min_neighbors,
                                              minSize=(side, side))
            boxes = [tuple(int(v) for v in b) for b in np.asarray(found).reshape(-1, 4)]
        else:
            boxes = self._np.detect(gray, self.scale_factor, self.min_neighbors, (side, side))
        return [tuple(int(round(v / scale)) for v in b) for b in boxes]


# ---------------------------------------------------------------------------------------------
# Alignment and paste-back


def face_transform(box: FaceBox, crop_size: int = CROP_SIZE, crop_scale: float = 1.7,
                   center_shift: float = 0.1) -> np.ndarray:
    """2x3 affine (uniform scale + translation) from image pixels to the crop."""
    x, y, w, h = box
    side = max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0 - center_shift * side
    s = crop_size / (crop_scale * side)
    return np.array([[s, 0.0, crop_size / 2.0 - s * cx],
                     [0.0, s, crop_size / 2.0 - s * cy]], np.float64)


def feather_mask(crop_size: int = CROP_SIZE, margin: float = 0.02,
                 feather: float = 0.12) -> np.ndarray:
    """Square mask in crop space: 0 on the outer ``margin``, ramping to 1 over ``feather``."""
    i = np.arange(crop_size, dtype=np.float32)
    edge = np.minimum(i, crop_size - 1 - i)
    ramp = np.clip((edge - margin * crop_size) / (feather * crop_size), 0.0, 1.0)
    return np.minimum(ramp[:, None], ramp[None, :])


def paste_face(image: np.ndarray, restored: np.ndarray, matrix: np.ndarray,
               strength: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend a restored crop back into ``image`` (uint8 HxWx3); pixels with zero weight are
    returned unchanged."""
    h, w = image.shape[:2]
    mask = feather_mask(restored.shape[0]) if mask is None else mask
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    back = cv2.warpAffine(restored, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
    alpha = cv2.warpAffine(mask, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0.0) * float(strength)
    sel = alpha > 0
    out = image.copy()
    if sel.any():
        a = alpha[sel][:, None]
        mixed = image[sel].astype(np.float32) * (1.0 - a) + back[sel].astype(np.float32) * a
        out[sel] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Networks and the fixer


def unwrap_state_dict(sd: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Take ``params_ema`` (else ``params``) out of a BasicSR-style checkpoint."""
    for key in ("params_ema", "params", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor],
                assign: bool = False) -> nn.Module:
    """Load with every key and shape required to match; the error names the offenders.
    ``assign`` takes the given tensors as they are (for a module built on the meta device)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
                    for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        if extra:
            parts.append(f"unexpected keys: {extra[:10]}" + (" ..." if len(extra) > 10 else ""))
        if shapes:
            parts.append(f"shape mismatches: {shapes[:10]}")
        raise ValueError(f"{type(module).__name__} state dict does not match: "
                         + "; ".join(parts))
    module.load_state_dict(sd, strict=True, assign=assign)
    return module


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def gfpgan_from_state_dict(sd: Mapping[str, torch.Tensor]) -> GFPGANv1Clean:
    """Build the GFPGANv1Clean whose widths the state dict has (published or narrow)."""
    try:
        log_size = _count(sd, "conv_body_down.") + 2
        style_dim = sd["stylegan_decoder.style_mlp.1.weight"].shape[0]
        channels = {4: sd["stylegan_decoder.constant_input.weight"].shape[1]}
        for i in range(3, log_size + 1):
            rgb = sd[f"stylegan_decoder.to_rgbs.{i - 3}.modulated_conv.weight"]
            channels[2 ** i] = rgb.shape[2]
        unet0 = sd["condition_scale.0.0.weight"].shape[0]
        sft_half = sd["condition_scale.0.2.weight"].shape[0] == unet0
        n_latent = sd["final_linear.weight"].shape[0] // style_dim
        num_mlp = _count(sd, "stylegan_decoder.style_mlp.") // 2
    except KeyError as e:
        raise ValueError(f"not a GFPGANv1Clean state dict: missing key {e}") from None
    return GFPGANv1Clean(2 ** log_size, style_dim, channels, num_mlp, n_latent > 1, sft_half)


def codeformer_from_state_dict(sd: Mapping[str, torch.Tensor]) -> CodeFormer:
    """Build the CodeFormer whose widths the state dict has (published or narrow).

    Head count and GroupNorm groups are not in the file: 8 heads (the published value) and
    ``min(32, nf)`` groups (32 for the published nf=64)."""
    try:
        nf = sd["encoder.blocks.0.weight"].shape[0]
        codebook_size, emb_dim = sd["quantize.embedding.weight"].shape
        dim_embd = sd["position_emb"].shape[1]
        n_layers = _count(sd, "ft_layers.")
        connect = sorted(int(k.split(".")[1]) for k in sd
                         if k.startswith("fuse_convs_dict.") and k.endswith("scale.0.weight"))
    except KeyError as e:
        raise ValueError(f"not a CodeFormer state dict: missing key {e}") from None
    return CodeFormer(nf=nf, codebook_size=codebook_size, emb_dim=emb_dim, dim_embd=dim_embd,
                      n_head=8, n_layers=n_layers, connect_list=connect,
                      norm_groups=min(32, nf))


def _load_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return unwrap_state_dict(load_file(path))
    return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    if key == "gfpgan":
        return "GFPGAN"
    if key in ("codeformers", "codeformer"):
        return "CodeFormers"
    raise ValueError(f"unknown face fixer {name!r}; expected one of {FACE_FIXERS}")


def builtin_network(name: str, seed: int = 0) -> nn.Module:
    """Narrow random network with the published key layout (tests, offline runs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return gfpgan_tiny() if canonical_name(name) == "GFPGAN" else codeformer_tiny()


@dataclass
class FaceFixer:
    name: str  # "GFPGAN" | "CodeFormers"
    net: nn.Module
    detector: Detector = field(default_factory=HaarFaceDetector)
    crop_scale: float = 1.7
    center_shift: float = 0.1
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        self.net.eval().to(self.device)
        self._mask = feather_mask(CROP_SIZE)

    def restore_crop(self, crop: np.ndarray, strength: float) -> np.ndarray:
        """512x512x3 uint8 RGB -> restored uint8 RGB."""
        x = torch.from_numpy(crop).to(self.device, torch.float32).permute(2, 0, 1)[None]
        x = x / 127.5 - 1.0
        with torch.inference_mode():
            if self.name == "GFPGAN":
                y = self.net(x)
            else:
                y = self.net(x, w=float(strength), adain=True)
        y = ((y[0].clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(1, 2, 0)
        return np.ascontiguousarray(y.cpu().numpy())

    def __call__(self, image: Image.Image, strength: float,
                 boxes: Sequence[FaceBox] | None = None) -> Image.Image:
        """Restore every detected face (or the given ``boxes``) blended by ``strength``
        (0..1, the request's ``facefixer_strength``)."""
        strength = float(min(max(strength, 0.0), 1.0))
        alpha_band = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        rgb = np.asarray(image.convert("RGB"))
        faces = list(self.detector(rgb)) if boxes is None else list(boxes)
        if strength == 0.0 or not faces:
            return image.copy()
        out = rgb
        for box in faces:
            m = face_transform(box, CROP_SIZE, self.crop_scale, self.center_shift)
            crop = cv2.warpAffine(out, m, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REFLECT_101)
            out = paste_face(out, self.restore_crop(crop, strength), m, strength, self._mask)
        result = Image.fromarray(out, "RGB")
        if alpha_band is not None:
            result.putalpha(alpha_band)
        return result


def build_face_fixer(name: str, weights: str | os.PathLike | Mapping | None = None, *,
                     detector: Detector | None = None, device: str = "cpu",
                     seed: int = 0) -> FaceFixer:
    """``name``: "GFPGAN" or "CodeFormers"; ``weights``: a ``.pth`` / ``.safetensors`` file
    (``GFPGANv1.4.pth``, ``codeformer.pth``; a ``params_ema`` wrapper is unwrapped), a state
    dict, or None for builtin narrow random weights (seeded) with the same key layout."""
    name = canonical_name(name)
    if weights is None:
        net = builtin_network(name, seed)
    else:
        sd = unwrap_state_dict(weights) if isinstance(weights, Mapping) \
            else _load_file(os.fspath(weights))
        with torch.device("meta"):  # no random init of ~90 M parameters just to overwrite it
            net = gfpgan_from_state_dict(sd) if name == "GFPGAN" \
                else codeformer_from_state_dict(sd)
        load_strict(net, {k: v.float() for k, v in sd.items()}, assign=True)
    return FaceFixer(name, net, detector if detector is not None else HaarFaceDetector(),
                     device=device)
