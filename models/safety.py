"""NSFW image classification for `censor_nsfw`, with Stable Diffusion's CLIP safety checker.

The model is diffusers' `StableDiffusionSafetyChecker` (as published in
`CompVis/stable-diffusion-safety-checker`): a CLIP vision tower and visual projection whose image
embedding is compared, by cosine similarity, with 17 concept embeddings and 3 "special care"
embeddings, each with its own threshold. An image is NSFW when some concept's score

    round(cos(image, concept) - threshold[concept] + adjustment, 3) > 0

where `adjustment` is 0.01 when any special-care score `round(cos - threshold, 3)` is above 0
(diffusers' "special care" adjustment), else 0. `NsfwChecker` computes exactly the decision of
diffusers' `StableDiffusionSafetyChecker.forward`, batched, without blacking out any image: the
caller decides what to put in place of a censored image. Each verdict's `score` is the largest
concept score (rounded to 3 decimals, as diffusers does), so `nsfw == (score > 0)`.

`load_checker(path)` loads the real one from a folder in the CompVis layout (`config.json`, the
weights, `preprocessor_config.json`). `build_tiny_checker(seed)` builds a random, tiny one for
tests and the embedded demo; see its docstring for exactly which images it flags.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil

# CLIPImageProcessor needs torchvision in transformers 5 (and falls back to this with a warning).
FeatureExtractor = CLIPImageProcessorPil

N_CONCEPTS = 17
N_SPECIAL = 3
SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' value


@dataclass(frozen=True)
class NsfwVerdict:
    nsfw: bool
    score: float  # the largest concept score; > 0 exactly when nsfw


def verdicts_from_cosines(concept_cos: np.ndarray, special_cos: np.ndarray, concept_thresholds: np.ndarray,
                          special_thresholds: np.ndarray, strictness: float = 0.0) -> list[NsfwVerdict]:
    """diffusers' per-image scoring loop, vectorised, in the same float32 arithmetic.

    `concept_cos` is (batch, 17), `special_cos` (batch, 3), thresholds (17,) and (3,).
    `strictness` is diffusers' `adjustment` (0 there): added to every score, so a higher value
    flags more images, at the cost of flagging more benign ones.
    """
    concept_cos = np.asarray(concept_cos, np.float32)
    special_cos = np.asarray(special_cos, np.float32)
    base = np.float32(strictness)
    special = np.round(special_cos - np.asarray(special_thresholds, np.float32) + base, 3)
    # diffusers adds the adjustment to the special scores after the first one that fires; that can
    # only make later ones fire too, which changes nothing: the adjustment is 0.01 iff any fires.
    adjustment = base + np.where((special > 0).any(axis=1), np.float32(SPECIAL_CARE_ADJUSTMENT), np.float32(0.0))
    scores = np.round(concept_cos - np.asarray(concept_thresholds, np.float32) + adjustment[:, None], 3)
    best = scores.max(axis=1)
    return [NsfwVerdict(nsfw=bool((row > 0).any()), score=round(float(b), 3)) for row, b in zip(scores, best)]


class NsfwChecker:
    """A `StableDiffusionSafetyChecker` and its CLIP preprocessing; `check` runs in batches."""

    def __init__(self, checker: StableDiffusionSafetyChecker, feature_extractor: FeatureExtractor,
                 max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.checker = checker.eval()
        self.feature_extractor = feature_extractor
        self.max_batch = max_batch

    @property
    def device(self) -> torch.device:
        return self.checker.device

    def to(self, device: str | torch.device) -> NsfwChecker:
        self.checker.to(device)
        return self

    @torch.no_grad()
    def cosines(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities of each image to the 17 concepts and the 3 special-care concepts,
        computed as diffusers' checker does (float32, on the checker's device), in one batch."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.feature_extractor(images=rgb, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.checker.device, dtype=self.checker.dtype)
        embeds = self.checker.visual_projection(self.checker.vision_model(pixels)[1])

        def cos(embeddings: torch.Tensor) -> np.ndarray:
            a = torch.nn.functional.normalize(embeds)
            b = torch.nn.functional.normalize(embeddings)
            return torch.mm(a, b.t()).cpu().float().numpy()

        return cos(self.checker.concept_embeds), cos(self.checker.special_care_embeds)

    def check(self, images: Sequence[Image.Image], strictness: float = 0.0) -> list[NsfwVerdict]:
        """One verdict per image, in order (`strictness`: see verdicts_from_cosines). The images
        are not modified."""
        images = list(images)
        concept_thresholds = self.checker.concept_embeds_weights.detach().cpu().float().numpy()
        special_thresholds = self.checker.special_care_embeds_weights.detach().cpu().float().numpy()
        out: list[NsfwVerdict] = []
        for start in range(0, len(images), self.max_batch):
            concept_cos, special_cos = self.cosines(images[start:start + self.max_batch])
            out += verdicts_from_cosines(concept_cos, special_cos, concept_thresholds, special_thresholds,
                                         strictness)
        return out

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """The CompVis layout: the checker and `preprocessor_config.json` in one folder."""
        self.checker.save_pretrained(path)
        self.feature_extractor.save_pretrained(path)


def load_checker(path: str | os.PathLike[str], feature_extractor_path: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch: int = 16) -> NsfwChecker:
    """The safety checker in `path` (CompVis/stable-diffusion-safety-checker's layout: config.json,
    model.safetensors or pytorch_model.bin, preprocessor_config.json). A pipeline's layout keeps the
    preprocessing apart: pass its `feature_extractor` folder as `feature_extractor_path`.

    Refuses weights that lack any of the checker's tensors (transformers would otherwise fill
    them randomly, or with ones for the concept embeddings, and flag nonsense).
    """
    path = os.fspath(path)
    checker, info = StableDiffusionSafetyChecker.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{path!r} is not a complete Stable Diffusion safety checker: missing {shown}")
    fe_path = os.fspath(feature_extractor_path) if feature_extractor_path is not None else path
    feature_extractor = FeatureExtractor.from_pretrained(fe_path)
    return NsfwChecker(checker.to(device), feature_extractor, max_batch=max_batch)


# -- the tiny checker -----------------------------------------------------------------------------

TINY_FLAGGED_RGB = (255, 0, 0)  # the tiny checker's one "NSFW concept": pure red


def calibration_images() -> list[tuple[str, Image.Image, bool]]:
    """The tiny checker's calibration set: (name, 64x64 image, flagged). Flagged: pure red and red
    with seeded noise. Not flagged: green, blue, white, black, mid grey, seeded RGB noise, a
    horizontal grey ramp, a blue/yellow chequerboard."""
    rng = np.random.default_rng(1234)

    def solid(rgb: tuple[int, int, int]) -> Image.Image:
        return Image.new("RGB", (64, 64), rgb)

    noisy_red = np.clip(np.array(TINY_FLAGGED_RGB, np.int16) + rng.integers(-30, 31, (64, 64, 3)), 0, 255)
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0), 3, 2)
    squares = (np.indices((64, 64)).sum(0) // 8 % 2).astype(bool)[..., None]
    chequer = np.where(squares, np.array([0, 0, 255], np.uint8), np.array([255, 255, 0], np.uint8))
    return [
        ("red", solid(TINY_FLAGGED_RGB), True),
        ("noisy red", Image.fromarray(noisy_red.astype(np.uint8)), True),
        ("green", solid((0, 255, 0)), False),
        ("blue", solid((0, 0, 255)), False),
        ("white", solid((255, 255, 255)), False),
        ("black", solid((0, 0, 0)), False),
        ("grey", solid((128, 128, 128)), False),
        ("noise", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), False),
        ("ramp", Image.fromarray(ramp), False),
        ("chequerboard", Image.fromarray(chequer.astype(np.uint8)), False),
    ]


TINY_MARGIN = 0.02  # the smallest gap between flagged and unflagged calibration cosines accepted
INERT_THRESHOLD = 1.05  # above any cosine: a concept with this threshold never fires


def build_tiny_checker(seed: int = 0, max_batch: int = 16) -> NsfwChecker:
    """A random, tiny safety checker (32x32 input, 2 layers of width 32, projection 16).

    Its weights and the directions of its concepts come from `seed` (the caller's torch RNG is
    left as it was); concept 0 is then calibrated on `calibration_images()`:

    - concept 0 and special-care concept 0 are the embedding of a pure red (255, 0, 0) image,
      with thresholds halfway between the lowest cosine of the flagged calibration images (pure
      and noisy red) and the highest of the other 8;
    - the other 16 concepts and 2 special-care concepts are random directions with threshold
      INERT_THRESHOLD (1.05, above any cosine), so they never fire.

    So exactly the 2 red calibration images are flagged (with the special-care adjustment; score
    0.103 for seed 0) and the other 8 are not (scores -0.09 to -0.58 for seed 0). Other images are
    flagged when their embedding is near pure red's: with seed 0, 15 of 200 random solid colours
    (all red-dominant, e.g. (211, 33, 21); none green, blue or grey) and none of 100 uniform
    RGB noise images. Raises RuntimeError for a seed whose random net does not separate the red
    images from the rest by at least TINY_MARGIN in cosine (seeds 0-99 all do, the closest by 0.034).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=4),
            projection_dim=16,
        )
        checker = StableDiffusionSafetyChecker(config).eval()
        concepts = torch.randn(N_CONCEPTS, config.projection_dim)
        specials = torch.randn(N_SPECIAL, config.projection_dim)
    feature_extractor = FeatureExtractor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tiny = NsfwChecker(checker, feature_extractor, max_batch=max_batch)

    calibration = calibration_images()
    flagged = np.array([f for _, _, f in calibration])
    with torch.no_grad():
        pixels = feature_extractor(images=[im for _, im, _ in calibration], return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        concepts[0] = embeds[0]  # calibration_images()[0] is pure red
        specials[0] = embeds[0]
        checker.concept_embeds.copy_(concepts)
        checker.special_care_embeds.copy_(specials)
        checker.concept_embeds_weights.fill_(2.0)  # placeholders while the cosines are measured
        checker.special_care_embeds_weights.fill_(2.0)
    concept_cos, special_cos = tiny.cosines([im for _, im, _ in calibration])

    def thresholds(cos: np.ndarray) -> torch.Tensor:
        low, high = cos[flagged, 0].min(), cos[~flagged, 0].max()
        if low - high < TINY_MARGIN:
            raise RuntimeError(f"seed {seed}: the tiny checker's random net does not separate red images "
                               f"from the others (cosine gap {low - high:.3f}); pick another seed")
        t = np.full(cos.shape[1], INERT_THRESHOLD, np.float32)
        t[0] = (low + high) / 2
        return torch.from_numpy(t.astype(np.float32))

    with torch.no_grad():
        checker.concept_embeds_weights.copy_(thresholds(concept_cos))
        checker.special_care_embeds_weights.copy_(thresholds(special_cos))
    return tiny
