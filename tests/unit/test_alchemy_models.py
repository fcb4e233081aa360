"""The alchemy forms' models (caption: BLIP, interrogation: CLIP ranking our term lists, nsfw:
the safety checker) with tiny random weights built in code, through save_pretrained /
from_pretrained as published weights load, and the deployment's methods without Ray Serve."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import deployments.alchemy as alchemy_deployment
from deployments.alchemy import AlchemyDeployment
from deployments.jobs import JobRejected
from models.alchemy.caption import Captioner, build_tiny_captioner, load_captioner
from models.alchemy.interrogation import (
    CATEGORIES,
    TERMS_DIR,
    Interrogator,
    build_tiny_interrogator,
    load_interrogator,
    load_term_lists,
)
from models.alchemy.registry import AlchemyModelEntry, load
from models.safety import NsfwChecker, build_tiny_checker

pytestmark = pytest.mark.timeout(120)

RED = Image.new("RGB", (40, 40), (255, 0, 0))  # the tiny safety checker flags pure red
BLUE = Image.new("RGB", (48, 40), (0, 0, 255))
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return build_tiny_captioner(seed=0)


@pytest.fixture(scope="module")
def interrogator() -> Interrogator:
    return build_tiny_interrogator(seed=0)


# -- caption ----------------------------------------------------------------------------------------

def test_captions_are_non_empty_stripped_and_depend_on_the_image(captioner):
    captions = captioner.caption([RED, NOISE])
    assert len(captions) == 2
    for caption in captions:
        assert isinstance(caption, str) and caption and caption == caption.strip()
    assert captions[0] != captions[1]  # the tiny BLIP (seed 0) looks at the image
    assert captioner.caption([]) == []


def test_captions_are_deterministic_alone_or_batched(captioner):
    alone = captioner.caption([NOISE])
    assert captioner.caption([NOISE]) == alone
    assert captioner.caption([NOISE, NOISE]) == alone * 2
    assert captioner.caption([RED.convert("RGBA")]) == captioner.caption([RED])
    assert len(captioner.caption([NOISE], max_new_tokens=2)[0].split()) <= 2
    with pytest.raises(ValueError, match="max_new_tokens"):
        captioner.caption([NOISE], max_new_tokens=0)


def test_captioner_round_trip_gives_the_same_captions(captioner, tmp_path):
    captioner.save_pretrained(tmp_path)
    loaded = load_captioner(tmp_path)
    assert loaded.caption([RED, NOISE]) == captioner.caption([RED, NOISE])
    # Another seed's weights caption differently: the round trip is not trivially equal.
    assert build_tiny_captioner(seed=1).caption([RED, NOISE]) != captioner.caption([RED, NOISE])


def test_incomplete_captioner_weights_are_refused(captioner, tmp_path):
    captioner.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "vision_model" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_captioner(tmp_path)


# -- interrogation --------------------------------------------------------------------------------

def test_interrogation_ranks_the_shipped_terms_in_every_category(interrogator):
    terms = load_term_lists()
    result = interrogator.interrogate(NOISE, top_k=4)
    assert list(result) == list(CATEGORIES)
    for category in CATEGORIES:
        items = result[category]
        assert len(items) == 4
        assert all(set(item) == {"text", "confidence"} for item in items)
        assert all(item["text"] in terms[category] for item in items)
        confidences = [item["confidence"] for item in items]
        assert all(isinstance(c, float) and c == round(c, 2) for c in confidences)
        assert confidences == sorted(confidences, reverse=True)
    # top_k larger than a list gives the whole list
    assert len(interrogator.interrogate(NOISE, top_k=1000)["sites"]) == len(terms["sites"])
    with pytest.raises(ValueError, match="top_k"):
        interrogator.interrogate(NOISE, top_k=0)


def test_confidences_are_clip_cosines_times_100(interrogator):
    category = "mediums"
    terms = load_term_lists()[category]
    model = interrogator.model
    with torch.no_grad():  # the same computation, written out independently
        pixels = interrogator.image_processor(images=[NOISE], return_tensors="pt").pixel_values
        image = model.get_image_features(pixel_values=pixels).pooler_output[0]
        tokens = interrogator.tokenizer(terms, padding=True, return_tensors="pt")
        texts = model.get_text_features(input_ids=tokens.input_ids,
                                        attention_mask=tokens.attention_mask).pooler_output
        cosines = torch.nn.functional.cosine_similarity(texts, image[None], dim=-1)
    expected = {term: float(c) * 100 for term, c in zip(terms, cosines)}
    ranked = interrogator.interrogate(NOISE, top_k=len(terms))[category]
    assert sorted(item["text"] for item in ranked) == sorted(terms)
    for item in ranked:  # rounding to 2 places, and float noise between batch shapes
        assert item["confidence"] == pytest.approx(expected[item["text"]], abs=0.005 + 1e-4)
    for better, worse in zip(ranked, ranked[1:]):
        assert expected[better["text"]] >= expected[worse["text"]] - 1e-4
    assert ranked[0]["text"] == max(terms, key=expected.get)


def test_interrogator_round_trip_and_different_images(interrogator, tmp_path):
    interrogator.save_pretrained(tmp_path)
    loaded = load_interrogator(tmp_path)
    for image in (RED, NOISE):
        assert loaded.interrogate(image, top_k=5) == interrogator.interrogate(image, top_k=5)
    red, noise = interrogator.interrogate(RED), interrogator.interrogate(NOISE)
    assert any([i["text"] for i in red[c]] != [i["text"] for i in noise[c]] for c in CATEGORIES)
    # Another seed ranks differently: the round trip is not trivially equal.
    other = build_tiny_interrogator(seed=1).interrogate(NOISE)
    assert other != noise


def test_interrogator_takes_its_own_terms(tmp_path, interrogator):
    terms = {c: [f"{c} one", f"{c} two"] for c in CATEGORIES}
    interrogator.save_pretrained(tmp_path)
    result = load_interrogator(tmp_path, terms=terms).interrogate(NOISE, top_k=5)
    assert {c: sorted(i["text"] for i in items) for c, items in result.items()} == \
        {c: sorted(t) for c, t in terms.items()}
    with pytest.raises(ValueError, match="terms"):
        Interrogator(interrogator.model, interrogator.tokenizer, interrogator.image_processor, {"tags": ["a"]})


# -- term lists -----------------------------------------------------------------------------------

@pytest.mark.parametrize("category", CATEGORIES)
def test_term_list_files_are_clean(category):
    text = (TERMS_DIR / f"{category}.txt").read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert 30 <= len(lines) <= 150
    assert all(line and line == line.strip() for line in lines), "blank or padded line"
    assert len(set(lines)) == len(lines), "duplicate term"


def test_term_lists_refuse_duplicates_and_missing_files(tmp_path):
    for category in CATEGORIES:
        (tmp_path / f"{category}.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert load_term_lists(tmp_path)["tags"] == ["one", "two"]
    (tmp_path / "sites.txt").write_text("one\ntwo\none\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'one' more than once"):
        load_term_lists(tmp_path)
    (tmp_path / "sites.txt").unlink()
    with pytest.raises(FileNotFoundError, match="sites"):
        load_term_lists(tmp_path)


# -- registry -------------------------------------------------------------------------------------

def test_builtin_entries_load_the_tiny_models_through_files(captioner, interrogator):
    loaded_captioner = load(AlchemyModelEntry(name="caption"))
    assert isinstance(loaded_captioner, Captioner)
    assert loaded_captioner.caption([NOISE]) == captioner.caption([NOISE])
    loaded_interrogator = load(AlchemyModelEntry(name="interrogation"))
    assert isinstance(loaded_interrogator, Interrogator)
    assert loaded_interrogator.interrogate(NOISE) == interrogator.interrogate(NOISE)
    checker = load(AlchemyModelEntry(name="nsfw"))
    assert isinstance(checker, NsfwChecker)
    assert [v.nsfw for v in checker.check([RED, BLUE, NOISE])] == [True, False, False]


@pytest.mark.parametrize("name", ["caption", "interrogation", "nsfw"])
def test_directory_entries_load_a_saved_folder(name, tmp_path):
    builders = {"caption": build_tiny_captioner, "interrogation": build_tiny_interrogator,
                "nsfw": build_tiny_checker}
    builders[name](seed=3).save_pretrained(tmp_path)
    model = load(AlchemyModelEntry(name=name, kind="directory", path=str(tmp_path)))
    fresh = builders[name](seed=3)
    if name == "caption":
        assert model.caption([NOISE]) == fresh.caption([NOISE])
    elif name == "interrogation":
        assert model.interrogate(NOISE) == fresh.interrogate(NOISE)
    else:
        assert model.check([RED, NOISE]) == fresh.check([RED, NOISE])


def test_huggingface_entries_load_the_snapshot_folder(monkeypatch, tmp_path):
    full, no_safetensors = tmp_path / "full", tmp_path / "bin-only"
    build_tiny_checker(seed=0).save_pretrained(full)
    no_safetensors.mkdir()
    calls = []

    def fake_snapshot_download(repo, ignore_patterns=()):
        calls.append((repo, list(ignore_patterns)))
        return str(no_safetensors if repo == "someone/bin-only" and "*.bin" in ignore_patterns else full)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    checker = load(AlchemyModelEntry(name="nsfw", kind="huggingface", repo="someone/checker"))
    assert [v.nsfw for v in checker.check([RED, BLUE])] == [True, False]
    assert len(calls) == 1 and calls[0][0] == "someone/checker" and "*.bin" in calls[0][1]
    # A repo without safetensors files: a second pass fetches the .bin weights too.
    load(AlchemyModelEntry(name="nsfw", kind="huggingface", repo="someone/bin-only"))
    assert [c[0] for c in calls] == ["someone/checker", "someone/bin-only", "someone/bin-only"]
    assert "*.bin" not in calls[2][1] and "*.h5" in calls[2][1]


@pytest.mark.parametrize("fields", [
    {"name": "caption", "kind": "directory"},
    {"name": "interrogation", "kind": "huggingface"},
    {"name": "upscale"},
    {"name": "nsfw", "kind": "file", "path": "/x"},
    {"name": "nsfw", "filename": "x.bin"},
])
def test_invalid_entries_are_refused(fields):
    with pytest.raises(ValidationError):
        AlchemyModelEntry(**fields)


# -- the deployment, without Ray Serve --------------------------------------------------------------

ALL_ENTRIES = [{"name": "caption"}, {"name": "interrogation"}, {"name": "nsfw"}]


def test_the_deployment_serves_the_three_forms(captioner):
    deployment = AlchemyDeployment.func_or_class(ALL_ENTRIES)
    caption = asyncio.run(deployment.caption(png(NOISE)))
    assert isinstance(caption, str) and caption == captioner.caption([NOISE])[0]
    result = asyncio.run(deployment.interrogate(png(NOISE), top_k=2))
    assert isinstance(result, dict) and list(result) == list(CATEGORIES)
    assert all(1 <= len(items) <= 2 for items in result.values())
    assert all(isinstance(i["text"], str) and isinstance(i["confidence"], float)
               for items in result.values() for i in items)
    assert asyncio.run(deployment.nsfw([png(RED), png(BLUE), png(NOISE)])) == [True, False, False]
    assert asyncio.run(deployment.nsfw([])) == []


def test_the_deployment_rejects_bad_input():
    deployment = AlchemyDeployment.func_or_class(ALL_ENTRIES)
    with pytest.raises(JobRejected, match="source_image"):
        asyncio.run(deployment.caption(b"not an image"))
    with pytest.raises(JobRejected, match="source_image"):
        asyncio.run(deployment.interrogate(b"\x89PNG\r\n\x1a\n truncated"))
    with pytest.raises(JobRejected, match=r"source_image\[1\]"):
        asyncio.run(deployment.nsfw([png(RED), b"GIF89a"]))
    gif = io.BytesIO()
    RED.save(gif, format="GIF")
    with pytest.raises(JobRejected, match="GIF"):
        asyncio.run(deployment.caption(gif.getvalue()))
    for top_k in (0, -1, 2.5, True):
        with pytest.raises(JobRejected, match="top_k"):
            asyncio.run(deployment.interrogate(png(RED), top_k=top_k))


def test_forms_not_in_entries_are_rejected_by_name():
    deployment = AlchemyDeployment.func_or_class([{"name": "nsfw"}])
    with pytest.raises(JobRejected, match="'caption' is not served"):
        asyncio.run(deployment.caption(png(RED)))
    with pytest.raises(JobRejected, match="'interrogation' is not served"):
        asyncio.run(deployment.interrogate(png(RED)))
    assert asyncio.run(deployment.nsfw([png(RED)])) == [True]
    with pytest.raises(ValueError, match="more than once"):
        AlchemyDeployment.func_or_class([{"name": "nsfw"}, {"name": "nsfw", "kind": "builtin"}])
    with pytest.raises(ValidationError):
        AlchemyDeployment.func_or_class([{"name": "nsfw", "kind": "directory"}])


def test_concurrent_first_requests_load_a_model_once(monkeypatch):
    loads = []

    def counting_load(entry, device):
        loads.append(entry.name)
        return load(entry, device)

    monkeypatch.setattr(alchemy_deployment, "load", counting_load)
    deployment = AlchemyDeployment.func_or_class(ALL_ENTRIES)

    async def burst() -> list[str]:
        return await asyncio.gather(*(deployment.caption(png(image)) for image in (RED, NOISE, RED)))

    captions = asyncio.run(burst())
    assert loads == ["caption"]
    assert captions[0] == captions[2] and all(captions)
    asyncio.run(deployment.caption(png(BLUE)))
    assert loads == ["caption"]


def test_term_files_are_shipped_next_to_the_code():
    assert TERMS_DIR == Path(__file__).parents[2] / "models" / "alchemy" / "terms"
    assert sorted(p.stem for p in TERMS_DIR.glob("*.txt")) == sorted(CATEGORIES)
