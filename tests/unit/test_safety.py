"""models.safety: Stable Diffusion's safety checker (diffusers' StableDiffusionSafetyChecker) as a
batched NSFW classifier that leaves images alone.

The tiny checker is built so that, by construction (see build_tiny_checker), its concept 0 is the
embedding of a pure red image with a threshold halfway between the red calibration images and
the others: red images are flagged, green/blue/grey/noise are not. The other concepts are inert.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.safety import (INERT_THRESHOLD, TINY_FLAGGED_RGB, NsfwChecker, NsfwVerdict, build_tiny_checker,
                           calibration_images, load_checker, verdicts_from_cosines)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_checker(0)


def sample_images():
    rng = np.random.default_rng(7)
    images = [im for _, im, _ in calibration_images()]
    images += [Image.new("RGB", (48, 80), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(12)]
    images += [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    images += [Image.new("RGB", (100, 60), (230, 20, 25)), Image.new("RGBA", (32, 32), (255, 0, 0, 128)),
               Image.new("L", (50, 50), 200)]
    return images


def test_calibration_set_is_split_as_documented(tiny):
    calibration = calibration_images()
    verdicts = tiny.check([im for _, im, _ in calibration])
    assert [v.nsfw for v in verdicts] == [flagged for _, _, flagged in calibration]
    assert sum(v.nsfw for v in verdicts) == 2 and len(verdicts) == 10
    for v in verdicts:
        assert isinstance(v, NsfwVerdict) and v.nsfw == (v.score > 0) and v.score == round(v.score, 3)


def test_a_red_image_is_flagged_and_a_blue_one_is_not(tiny):
    """Not calibration images: other sizes, a slightly different red, and a sky blue."""
    red, blue = Image.new("RGB", (96, 64), (240, 10, 10)), Image.new("RGB", (64, 96), (40, 120, 230))
    flagged, clean = tiny.check([red, blue])
    assert flagged.nsfw and flagged.score > 0.05
    assert not clean.nsfw and clean.score < -0.05
    assert tiny.check([Image.new("RGB", (64, 64), TINY_FLAGGED_RGB)])[0].nsfw


def test_verdicts_are_deterministic(tiny):
    images = sample_images()
    first = tiny.check(images)
    assert tiny.check(images) == first
    state = torch.random.get_rng_state()
    again = build_tiny_checker(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert again.check(images) == first
    for (name, a), b in zip(tiny.checker.state_dict().items(), again.checker.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_tiny_checker(1)
    assert not torch.equal(other.checker.concept_embeds, tiny.checker.concept_embeds)
    calibration = calibration_images()
    assert [v.nsfw for v in other.check([im for _, im, _ in calibration])] == [f for _, _, f in calibration]


def test_batched_equals_one_by_one(tiny):
    images = sample_images()
    batched = tiny.check(images)
    assert len(batched) == len(images)
    assert [tiny.check([im])[0] for im in images] == batched
    assert NsfwChecker(tiny.checker, tiny.feature_extractor, max_batch=4).check(images) == batched
    assert tiny.check([]) == []
    concept_cos, _ = tiny.cosines(images)
    single = np.concatenate([tiny.cosines([im])[0] for im in images])
    assert np.allclose(concept_cos, single, atol=1e-5)


def test_images_are_not_modified(tiny):
    images = sample_images()
    before = [(im.mode, im.size, im.tobytes()) for im in images]
    verdicts = tiny.check(images)
    assert any(v.nsfw for v in verdicts)
    assert [(im.mode, im.size, im.tobytes()) for im in images] == before


def test_save_pretrained_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert {"config.json", "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = load_checker(tmp_path)
    images = sample_images()
    assert loaded.check(images) == tiny.check(images)
    for (name, a), b in zip(tiny.checker.state_dict().items(), loaded.checker.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.feature_extractor.crop_size == tiny.feature_extractor.crop_size


def test_compvis_layout_loads(tiny, tmp_path):
    """As CompVis/stable-diffusion-safety-checker ships it: a CLIPConfig with the old
    `vision_config_dict`, pytorch_model.bin, and a CLIPFeatureExtractor preprocessor config."""
    vision = tiny.checker.config.vision_config
    text = tiny.checker.config.text_config
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                 "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    vision_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
                   "patch_size")
    config = {
        "architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip", "projection_dim": 16,
        "text_config_dict": {k: getattr(text, k) for k in text_keys},
        "vision_config_dict": {k: getattr(vision, k) for k in vision_keys},
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save({k: v.clone() for k, v in tiny.checker.state_dict().items()}, tmp_path / "pytorch_model.bin")
    fe = tiny.feature_extractor
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(fe.image_mean),
        "image_std": list(fe.image_std), "resample": 3, "size": 32}))
    loaded = load_checker(tmp_path)
    assert loaded.checker.config.vision_config.hidden_size == vision.hidden_size
    images = sample_images()
    assert loaded.check(images) == tiny.check(images)


def test_incomplete_weights_are_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    state = {k: v.contiguous() for k, v in tiny.checker.state_dict().items() if "concept_embeds" not in k}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="concept_embeds"):
        load_checker(tmp_path)


def test_same_decisions_as_diffusers_forward(tiny):
    """Thresholds of a few concepts and one special-care concept put among the images' own
    cosines, so that they fire for some images and not others and the special-care adjustment
    decides some verdicts: ours equal diffusers' StableDiffusionSafetyChecker.forward."""
    checker, images = tiny.checker, sample_images()
    pixels = tiny.feature_extractor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    concept_cos, special_cos = tiny.cosines(images)
    saved = checker.concept_embeds_weights.clone(), checker.special_care_embeds_weights.clone()
    rng = np.random.default_rng(3)
    adjusted = 0
    try:
        for _ in range(12):
            concept_t, special_t = np.full(17, INERT_THRESHOLD), np.full(3, INERT_THRESHOLD)
            for c in rng.choice(17, 3, replace=False):
                concept_t[c] = np.quantile(concept_cos[:, c], rng.uniform(0.6, 0.95))
            s = rng.integers(3)
            special_t[s] = np.quantile(special_cos[:, s], rng.uniform(0.3, 0.9))
            with torch.no_grad():
                checker.concept_embeds_weights.copy_(torch.from_numpy(concept_t.astype(np.float32)))
                checker.special_care_embeds_weights.copy_(torch.from_numpy(special_t.astype(np.float32)))
            ours = tiny.check(images)
            _, theirs = checker(clip_input=pixels, images=np.zeros((len(images), 1)))
            assert [v.nsfw for v in ours] == list(theirs)
            plain = verdicts_from_cosines(concept_cos, special_cos, concept_t, np.full(3, INERT_THRESHOLD))
            adjusted += sum(o.nsfw and not p.nsfw for o, p in zip(ours, plain))
            assert 0 < sum(theirs) < len(images)
    finally:
        with torch.no_grad():
            checker.concept_embeds_weights.copy_(saved[0])
            checker.special_care_embeds_weights.copy_(saved[1])
    assert adjusted > 0  # the special-care adjustment decided at least one verdict


def test_verdicts_from_cosines_special_care_adjustment():
    concept = np.array([[0.295, 0.1], [0.295, 0.1], [0.31, 0.1]], np.float32)
    special = np.array([[0.5], [0.2], [0.2]], np.float32)
    verdicts = verdicts_from_cosines(concept, special, np.array([0.3, 0.9]), np.array([0.4]))
    assert verdicts == [NsfwVerdict(True, 0.005), NsfwVerdict(False, -0.005), NsfwVerdict(True, 0.01)]


def test_strictness_is_diffusers_adjustment(tiny):
    """`strictness` is added to every score, as diffusers' `adjustment`: the same verdicts as
    thresholds lowered by it, and a stricter check flags a superset of the images."""
    images = sample_images()
    concept_cos, special_cos = tiny.cosines(images)
    concept_t = tiny.checker.concept_embeds_weights.numpy()
    special_t = tiny.checker.special_care_embeds_weights.numpy()
    flagged = {}
    for strictness in (0.0, 0.05, 0.2, 0.5):
        ours = tiny.check(images, strictness=strictness)
        shifted = verdicts_from_cosines(concept_cos, special_cos, concept_t - np.float32(strictness),
                                        special_t - np.float32(strictness))
        assert [v.nsfw for v in ours] == [v.nsfw for v in shifted]
        flagged[strictness] = {i for i, v in enumerate(ours) if v.nsfw}
    assert flagged[0.0] <= flagged[0.05] <= flagged[0.2] <= flagged[0.5]
    assert len(flagged[0.5]) > len(flagged[0.0])
