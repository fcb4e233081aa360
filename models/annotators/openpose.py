"""Body and hand pose (`openpose`): the CMU OpenPose networks laid out as the published
`body_pose_model.pth` / `hand_pose_model.pth` (lllyasviel/Annotators), keypoint extraction
and the skeleton drawn on black. Written from the papers (Cao et al., "Realtime Multi-Person
2D Pose Estimation using Part Affinity Fields", CVPR 2017; Simon et al., "Hand Keypoint
Detection in Single Images using Multiview Bootstrapping", CVPR 2017) and the files' key
layouts; no OpenPose code is used.

Networks (every conv is a top-level module named as in the files, e.g. `conv1_1.weight`,
`Mconv3_stage4_L2.bias`; every conv but a branch's last is followed by ReLU):
- body: VGG-19 front conv1_1..conv4_2 (64, 64 | pool | 128, 128 | pool | 256 x4 | pool | 512,
  512), conv4_3_CPM (256), conv4_4_CPM (128) = features F. Stage 1, two branches (L1: 38
  PAF channels, L2: 19 heatmaps incl. background): conv5_1..3_CPM_L{b} 3x3 128,
  conv5_4_CPM_L{b} 1x1 512, conv5_5_CPM_L{b} 1x1 out. Stages 2..6: input [L1, L2, F]
  (185 channels), Mconv1..5_stage{s}_L{b} 7x7 128, Mconv6 1x1 128, Mconv7 1x1 out.
- hand: VGG front conv1_1..conv4_4 (conv4_x 512), conv5_1, conv5_2 (512), conv5_3_CPM (128)
  = F; conv6_1_CPM 1x1 512, conv6_2_CPM 1x1 22 heatmaps; stages 2..6 take [heatmaps, F]
  (150 channels): Mconv1..5_stage{s} 7x7 128, Mconv6 1x1 128, Mconv7 1x1 22.

Inference (the published models' conventions): BGR input / 256 - 0.5, the image scaled so
its height maps to 368 * 0.5 (body; hands at 0.5/1/1.5/2 x 368 and averaged), padded
right/bottom with 128 to a multiple of the stride 8, outputs upsampled x8 (bicubic),
unpadded, resized to the image. Body parts are the local maxima (4-neighbourhood) of the
Gaussian-smoothed (sigma 3) heatmaps above 0.1; limbs are scored by the PAF line integral
over 10 samples (dot product with the limb's unit vector, mean plus a length prior
min(0.5 * H / length - 1, 0), more than 80% of the samples above 0.05), greedily matched
and assembled into people (at least 4 parts, mean score at least 0.4). Hand boxes come from
wrist/elbow/shoulder; each hand keypoint is the maximum of the strongest connected region
of its heatmap above 0.05.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence

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

# 1-based part pairs of the 19 limbs (COCO 18-part model) and their PAF channels (x, y),
# counted from 19 as in the published network's output order.
LIMB_SEQ = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12),
            (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
MAP_IDX = ((31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22),
           (23, 24), (25, 26), (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52),
           (55, 56), (37, 38), (45, 46))
BODY_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0),
               (85, 255, 0), (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255),
               (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255), (170, 0, 255),
               (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
              (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18),
              (18, 19), (19, 20))
N_PARTS, N_PAF, N_HAND = 18, 38, 22
BOX, STRIDE, PAD_VALUE = 368, 8, 128

# Published widths; the builtin networks divide them by 8.
BODY_WIDTHS = dict(c1=64, c2=128, c3=256, c4=512, cpm3=256, cpm=128, s1=128, mid=512, st=128)
HAND_WIDTHS = dict(c1=64, c2=128, c3=256, c4=512, c5=512, cpm=128, mid=512, st=128)

Layer = tuple[str, int, int, int, bool]  # name, in, out, kernel, relu ("pool" for max-pool)


class _ConvNet(nn.Module):
    """Convolutions registered flat under their published names; chains run in order."""

    def _chain(self, layers: Sequence[Layer | str]) -> list:
        out = []
        for layer in layers:
            if layer == "pool":
                out.append("pool")
                continue
            name, cin, cout, k, relu = layer
            self.add_module(name, nn.Conv2d(cin, cout, k, padding=(k - 1) // 2))
            out.append((name, relu))
        return out

    def _run(self, chain: list, x: torch.Tensor) -> torch.Tensor:
        for step in chain:
            if step == "pool":
                x = F.max_pool2d(x, 2, 2)
            else:
                x = getattr(self, step[0])(x)
                if step[1]:
                    x = F.relu(x)
        return x


def _vgg(w: Mapping[str, int], deep: Sequence[tuple[str, int]]) -> list:
    return [("conv1_1", 3, w["c1"], 3, True), ("conv1_2", w["c1"], w["c1"], 3, True), "pool",
            ("conv2_1", w["c1"], w["c2"], 3, True), ("conv2_2", w["c2"], w["c2"], 3, True), "pool",
            ("conv3_1", w["c2"], w["c3"], 3, True)] + \
        [(f"conv3_{i}", w["c3"], w["c3"], 3, True) for i in (2, 3, 4)] + ["pool"] + \
        _seq(deep, w["c3"])


def _seq(names_widths: Sequence[tuple[str, int]], cin: int, k: int = 3) -> list:
    out = []
    for name, cout in names_widths:
        out.append((name, cin, cout, k, True))
        cin = cout
    return out


def _stage(suffix: str, cin: int, st: int, cout: int) -> list:
    layers = [(f"Mconv1_{suffix}", cin, st, 7, True)]
    layers += [(f"Mconv{i}_{suffix}", st, st, 7, True) for i in (2, 3, 4, 5)]
    return layers + [(f"Mconv6_{suffix}", st, st, 1, True),
                     (f"Mconv7_{suffix}", st, cout, 1, False)]


class BodyPoseNet(_ConvNet):
    def __init__(self, widths: Mapping[str, int] = BODY_WIDTHS):
        super().__init__()
        w = self.widths = dict(widths)
        self.front = self._chain(_vgg(w, [("conv4_1", w["c4"]), ("conv4_2", w["c4"]),
                                          ("conv4_3_CPM", w["cpm3"]), ("conv4_4_CPM", w["cpm"])]))
        self.stages = []
        for b, cout in ((1, N_PAF), (2, N_PARTS + 1)):
            layers = [(f"conv5_{i}_CPM_L{b}", w["cpm"] if i == 1 else w["s1"], w["s1"], 3, True)
                      for i in (1, 2, 3)]
            layers += [(f"conv5_4_CPM_L{b}", w["s1"], w["mid"], 1, True),
                       (f"conv5_5_CPM_L{b}", w["mid"], cout, 1, False)]
            self.stages.append([self._chain(layers)])
        cin = N_PAF + N_PARTS + 1 + w["cpm"]
        for s in range(2, 7):
            self.stages[0].append(self._chain(_stage(f"stage{s}_L1", cin, w["st"], N_PAF)))
            self.stages[1].append(self._chain(_stage(f"stage{s}_L2", cin, w["st"], N_PARTS + 1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(PAFs [B, 38, h/8, w/8], heatmaps [B, 19, h/8, w/8])."""
        feats = self._run(self.front, x)
        paf = heat = None
        for s in range(6):
            inp = feats if s == 0 else torch.cat([paf, heat, feats], dim=1)
            paf = self._run(self.stages[0][s], inp)
            heat = self._run(self.stages[1][s], inp)
        return paf, heat

    @staticmethod
    def widths_of(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
        keys = dict(c1="conv1_1", c2="conv2_1", c3="conv3_1", c4="conv4_1", cpm3="conv4_3_CPM",
                    cpm="conv4_4_CPM", s1="conv5_1_CPM_L1", mid="conv5_4_CPM_L1",
                    st="Mconv1_stage2_L1")
        return {k: channels(sd, f"{v}.weight") for k, v in keys.items()}


class HandPoseNet(_ConvNet):
    def __init__(self, widths: Mapping[str, int] = HAND_WIDTHS):
        super().__init__()
        w = self.widths = dict(widths)
        self.front = self._chain(_vgg(w, [(f"conv4_{i}", w["c4"]) for i in (1, 2, 3, 4)]
                                      + [("conv5_1", w["c5"]), ("conv5_2", w["c5"]),
                                         ("conv5_3_CPM", w["cpm"])]))
        self.stages = [self._chain([("conv6_1_CPM", w["cpm"], w["mid"], 1, True),
                                    ("conv6_2_CPM", w["mid"], N_HAND, 1, False)])]
        for s in range(2, 7):
            self.stages.append(self._chain(_stage(f"stage{s}", N_HAND + w["cpm"], w["st"], N_HAND)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmaps [B, 22, h/8, w/8] (21 keypoints and the background)."""
        feats = self._run(self.front, x)
        out = self._run(self.stages[0], feats)
        for chain in self.stages[1:]:
            out = self._run(chain, torch.cat([out, feats], dim=1))
        return out

    @staticmethod
    def widths_of(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
        keys = dict(c1="conv1_1", c2="conv2_1", c3="conv3_1", c4="conv4_1", c5="conv5_1",
                    cpm="conv5_3_CPM", mid="conv6_1_CPM", st="Mconv1_stage2")
        return {k: channels(sd, f"{v}.weight") for k, v in keys.items()}


def _quiet_outputs(net: _ConvNet) -> _ConvNet:
    """Scale each branch's last conv so untrained maps stay under the detection thresholds
    (an untrained net would otherwise "find" dozens of people and run a hand pass for each)."""
    with torch.no_grad():
        for name, module in net.named_children():
            if name.startswith(("conv5_5_CPM", "conv6_2_CPM", "Mconv7_")):
                module.weight.mul_(0.02)
                module.bias.zero_()
    return net


def build_builtin_body(seed: int = 0) -> BodyPoseNet:
    """The published layout at 1/8 of the widths, seeded (outputs kept near zero)."""
    net = BodyPoseNet({k: v // 8 for k, v in BODY_WIDTHS.items()})
    return _quiet_outputs(seeded_init(net, seed)).eval()


def build_builtin_hand(seed: int = 1) -> HandPoseNet:
    net = HandPoseNet({k: v // 8 for k, v in HAND_WIDTHS.items()})
    return _quiet_outputs(seeded_init(net, seed)).eval()


# ---------------------------------------------------------------- inference


def _smooth(x: np.ndarray) -> np.ndarray:
    """Gaussian sigma 3, radius 12, mirrored borders (the peak finder's smoothing)."""
    return cv2.GaussianBlur(x, (25, 25), 3, borderType=cv2.BORDER_REFLECT)


def _net_maps(net: nn.Module, bgr: np.ndarray, scales: Sequence[float]) -> np.ndarray:
    """Average over scales of the network's output maps, HxWxC at the size of `bgr`."""
    h, w = bgr.shape[:2]
    param = next(net.parameters())
    acc = None
    for m in scales:
        scale = m * BOX / h
        img = cv2.resize(bgr, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        ih, iw = img.shape[:2]
        ph, pw = (-ih) % STRIDE, (-iw) % STRIDE
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
        x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1)[None] / 256 - 0.5)
        with torch.inference_mode():
            out = net(x.to(param.device, param.dtype))
        outs = out if isinstance(out, tuple) else (out,)
        maps = np.concatenate([o[0].float().cpu().numpy().transpose(1, 2, 0) for o in outs], axis=2)
        maps = _resize_maps(maps, (maps.shape[1] * STRIDE, maps.shape[0] * STRIDE))
        maps = _resize_maps(maps[:ih, :iw], (w, h))
        acc = maps if acc is None else acc + maps
    return acc / len(scales)


def _resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize of many channels (OpenCV handles at most 512 at once)."""
    out = cv2.resize(np.ascontiguousarray(maps), size, interpolation=cv2.INTER_CUBIC)
    return out[:, :, None] if out.ndim == 2 else out


def find_body_peaks(heatmaps: np.ndarray, thre: float = 0.1) -> list[np.ndarray]:
    """Per part, an (n, 4) array x, y, score, global id."""
    peaks, count = [], 0
    for part in range(N_PARTS):
        raw = heatmaps[:, :, part]
        s = _smooth(np.ascontiguousarray(raw))
        pad = np.pad(s, 1, constant_values=0)
        c = pad[1:-1, 1:-1]
        is_peak = ((c >= pad[1:-1, :-2]) & (c >= pad[1:-1, 2:]) & (c >= pad[:-2, 1:-1])
                   & (c >= pad[2:, 1:-1]) & (c > thre))
        ys, xs = np.nonzero(is_peak)
        arr = np.stack([xs, ys, raw[ys, xs], np.arange(count, count + len(xs))], axis=1)
        peaks.append(arr.astype(np.float64).reshape(-1, 4))
        count += len(xs)
    return peaks


def connect_limbs(peaks: list[np.ndarray], paf: np.ndarray, height: int,
                  thre2: float = 0.05, samples: int = 10) -> list[np.ndarray | None]:
    """Per limb, an (m, 5) array of accepted connections: id A, id B, score, index A, index B
    (None where one of its parts has no candidate)."""
    h, w = paf.shape[:2]
    result: list[np.ndarray | None] = []
    for (a, b), (mx, my) in zip(LIMB_SEQ, MAP_IDX):
        ca, cb = peaks[a - 1], peaks[b - 1]
        if len(ca) == 0 or len(cb) == 0:
            result.append(None)
            continue
        pa, pb = ca[:, None, :2], cb[None, :, :2]  # (na, 1, 2), (1, nb, 2)
        vec = pb - pa
        norm = np.maximum(np.sqrt((vec ** 2).sum(-1)), 1e-3)  # (na, nb)
        unit = vec / norm[..., None]
        t = np.linspace(0.0, 1.0, samples)
        pts = pa[..., None, :] + vec[..., None, :] * t[:, None]  # (na, nb, samples, 2)
        xi = np.clip(np.round(pts[..., 0]).astype(int), 0, w - 1)
        yi = np.clip(np.round(pts[..., 1]).astype(int), 0, h - 1)
        along = (paf[yi, xi, mx - 19] * unit[..., None, 0]
                 + paf[yi, xi, my - 19] * unit[..., None, 1])
        score = along.mean(-1) + np.minimum(0.5 * height / norm - 1, 0)
        ok = ((along > thre2).sum(-1) > 0.8 * samples) & (score > 0)
        ii, jj = np.nonzero(ok)
        order = np.argsort(-score[ii, jj], kind="stable")
        used_a, used_b, rows = set(), set(), []
        for k in order:
            i, j = ii[k], jj[k]
            if i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            rows.append([ca[i, 3], cb[j, 3], score[i, j], i, j])
            if len(rows) >= min(len(ca), len(cb)):
                break
        result.append(np.array(rows, dtype=np.float64).reshape(-1, 5))
    return result


def group_people(peaks: list[np.ndarray], connections: list[np.ndarray | None]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(candidate (n, 4): x, y, score, id; subset (people, 20): the candidate id of each of
    the 18 parts or -1, total score, number of parts)."""
    candidate = np.concatenate(peaks, axis=0) if peaks else np.zeros((0, 4))
    subset = np.zeros((0, N_PARTS + 2))
    for k, conn in enumerate(connections):
        if conn is None:
            continue
        ia, ib = LIMB_SEQ[k][0] - 1, LIMB_SEQ[k][1] - 1
        for a_id, b_id, s, _, _ in conn:
            owners = [j for j in range(len(subset))
                      if subset[j, ia] == a_id or subset[j, ib] == b_id]
            if len(owners) == 1 or (len(owners) == 2 and np.any((subset[owners[0], :-2] >= 0)
                                                                  & (subset[owners[1], :-2] >= 0))):
                j = owners[0]
                if subset[j, ib] != b_id:
                    subset[j, ib] = b_id
                    subset[j, -1] += 1
                    subset[j, -2] += candidate[int(b_id), 2] + s
            elif len(owners) == 2:  # two disjoint partial people: merge them
                j1, j2 = owners
                subset[j1, :-2] += subset[j2, :-2] + 1
                subset[j1, -2:] += subset[j2, -2:]
                subset[j1, -2] += s
                subset = np.delete(subset, j2, axis=0)
            elif not owners and k < 17:
                row = -np.ones(N_PARTS + 2)
                row[ia], row[ib] = a_id, b_id
                row[-1] = 2
                row[-2] = candidate[int(a_id), 2] + candidate[int(b_id), 2] + s
                subset = np.vstack([subset, row])
    keep = (subset[:, -1] >= 4) & (subset[:, -2] / np.maximum(subset[:, -1], 1) >= 0.4)
    return candidate, subset[keep]


def detect_body(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = _net_maps(net, bgr, [0.5])
    paf, heat = maps[:, :, :N_PAF], maps[:, :, N_PAF:]
    peaks = find_body_peaks(heat)
    return group_people(peaks, connect_limbs(peaks, paf, bgr.shape[0]))


def hand_boxes(candidate: np.ndarray, subset: np.ndarray, width: int, height: int
               ) -> list[tuple[int, int, int, bool]]:
    """Square boxes (x, y, side, is_left) ahead of each wrist, sized by the forearm/upper arm."""
    boxes = []
    for person in subset.astype(int):
        for is_left, (sh, el, wr) in ((True, (5, 6, 7)), (False, (2, 3, 4))):
            if min(person[sh], person[el], person[wr]) < 0:
                continue
            (x1, y1), (x2, y2), (x3, y3) = (candidate[person[i], :2] for i in (sh, el, wr))
            x, y = x3 + 0.33 * (x3 - x2), y3 + 0.33 * (y3 - y2)
            side = 1.5 * max(math.hypot(x3 - x2, y3 - y2), 0.9 * math.hypot(x2 - x1, y2 - y1))
            x, y = max(x - side / 2, 0), max(y - side / 2, 0)
            side = min(side, width - x, height - y)
            if side >= 20:
                boxes.append((int(x), int(y), int(side), is_left))
    return boxes


def detect_hand(net: HandPoseNet, bgr_crop: np.ndarray, thre: float = 0.05) -> np.ndarray:
    """(21, 2) int keypoints in the crop; (0, 0) where a keypoint was not found."""
    maps = _net_maps(net, bgr_crop, [0.5, 1.0, 1.5, 2.0])
    out = np.zeros((N_HAND - 1, 2), dtype=int)
    for part in range(N_HAND - 1):
        raw = np.ascontiguousarray(maps[:, :, part])
        binary = (_smooth(raw) > thre).astype(np.uint8)
        if not binary.any():
            continue
        n, labels = cv2.connectedComponents(binary, connectivity=8)
        sums = np.bincount(labels.ravel(), weights=raw.ravel(), minlength=n)[1:]
        best = int(np.argmax(sums)) + 1
        masked = np.where(labels == best, raw, 0)
        y, x = np.unravel_index(int(np.argmax(masked)), masked.shape)
        out[part] = (x, y)
    return out


# ---------------------------------------------------------------- drawing


def draw_body(canvas: np.ndarray, candidate: np.ndarray, subset: np.ndarray,
              stickwidth: int = 4) -> np.ndarray:
    """Keypoints as filled circles (radius 4) in the 18 part colours, then each of the first 17
    limbs as a filled ellipse in its colour blended 60% over the canvas."""
    for i in range(N_PARTS):
        for person in subset:
            idx = int(person[i])
            if idx >= 0:
                x, y = candidate[idx, :2]
                cv2.circle(canvas, (int(x), int(y)), 4, BODY_COLORS[i], thickness=-1)
    for i in range(17):
        for person in subset:
            ids = person[np.array(LIMB_SEQ[i]) - 1].astype(int)
            if (ids < 0).any():
                continue
            ys, xs = candidate[ids, 0], candidate[ids, 1]  # image x, image y
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            poly = cv2.ellipse2Poly((int(ys.mean()), int(xs.mean())), (int(length / 2), stickwidth),
                                    int(angle), 0, 360, 1)
            limb = canvas.copy()
            cv2.fillConvexPoly(limb, poly, BODY_COLORS[i])
            canvas = cv2.addWeighted(canvas, 0.4, limb, 0.6, 0)
    return canvas


def draw_hands(canvas: np.ndarray, hands: Sequence[np.ndarray]) -> np.ndarray:
    """Bones 2 px wide in a rainbow (hue edge/20), keypoints as blue dots of radius 4."""
    for peaks in hands:
        for ie, (a, b) in enumerate(HAND_EDGES):
            if np.all(peaks[a] > 0) and np.all(peaks[b] > 0):
                color = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(ie / len(HAND_EDGES), 1, 1))
                cv2.line(canvas, tuple(int(v) for v in peaks[a]), tuple(int(v) for v in peaks[b]),
                         color, thickness=2)
        for x, y in peaks:
            if x > 0 and y > 0:
                cv2.circle(canvas, (int(x), int(y)), 4, (0, 0, 255), thickness=-1)
    return canvas


class OpenPoseAnnotator:
    def __init__(self, body: BodyPoseNet, hand: HandPoseNet | None = None, resolution: int = 512,
                 max_people: int = 16):
        self.body, self.hand, self.resolution = body.eval(), hand, resolution
        self.max_people = max_people  # bounds the hand passes an untrained net could trigger

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        small = resize_for_detection(rgb, self.resolution)
        bgr = np.ascontiguousarray(small[:, :, ::-1])
        candidate, subset = detect_body(self.body, bgr)
        if len(subset) > self.max_people:
            subset = subset[np.argsort(-subset[:, -2], kind="stable")[: self.max_people]]
        hands = []
        if self.hand is not None:
            sh, sw = small.shape[:2]
            for x, y, side, _ in hand_boxes(candidate, subset, sw, sh):
                peaks = detect_hand(self.hand, bgr[y:y + side, x:x + side])
                found = peaks > 0
                hands.append(np.where(found, peaks + np.array([x, y]), 0))
        canvas = np.zeros_like(small)
        canvas = draw_body(canvas, candidate, subset)
        canvas = draw_hands(canvas, hands)
        return to_map(canvas, (w, h), cv2.INTER_NEAREST)
