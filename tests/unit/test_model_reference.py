"""The AI Horde model reference's facts in rayhorde's own format (models/reference): read from
the published format, written and read back, and how the catalog (models/catalog.py) takes a
known model's facts from it."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from models.catalog import Family, load_catalog
from models.reference import DATA_DIR, PUBLISHED_URLS, ReferenceError, load_reference
from models.reference.published import parse_published
from models.reference.reference import FORMAT, ReferenceModel, dump_models, read_models

BASE = {"baseline": "stable diffusion 1", "type": "ckpt", "inpainting": False, "nsfw": False,
        "config": {"files": [], "download": []}}


def test_the_shipped_files_are_what_their_manifest_says():
    manifest = json.loads((DATA_DIR / "pinned.json").read_text())
    reference = load_reference()
    for kind, models in (("image", reference.image), ("text", reference.text)):
        data = (DATA_DIR / manifest[kind]["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest[kind]["file_sha256"]
        assert len(models) == manifest[kind]["models"]
        assert manifest[kind]["url"] == PUBLISHED_URLS[kind]
        assert len(manifest[kind]["commit"]) == 40
        assert dump_models(models.values()) == data  # written by dump_models, as refresh does
    assert (len(reference.image), len(reference.text)) == (161, 2157)
    # Only rayhorde's files: none of the reference's published files, verbatim.
    assert sorted(p.name for p in DATA_DIR.iterdir()) == \
        ["README.md", "image_models.json", "pinned.json", "text_models.json"]
    assert load_reference() is reference  # parsed once


def test_records_carry_what_the_reference_says():
    ref = load_reference()
    cascade = ref.get("Stable Cascade 1.0")
    assert (cascade.type, cascade.family, cascade.baseline) == ("image", Family.stable_cascade, "stable_cascade")
    assert (cascade.requirements.min_steps, cascade.requirements.max_steps) == (20, 30)
    stage_b = cascade.downloads[0]
    assert stage_b.hub_file.repo_id == "stabilityai/stable-cascade"
    assert stage_b.hub_file.filename == "comfyui_checkpoints/stable_cascade_stage_b.safetensors"
    assert cascade.sha256_of("stable_cascade_stage_b.safetensors") == \
        "6c218dc948575e3b14b03dffe2014d7870ac505005770ce3abdc28e920a03c05"
    # Hashes are kept lowercase, whatever case the reference wrote them in.
    albedo = ref.get("AlbedoBase XL (SDXL)")
    assert albedo.family is Family.stable_diffusion_xl
    assert albedo.sha256_of("albedo_base_xl.safetensors") == \
        "1718b5bb2da1ef4815fee8af8a7fc2fa8ab8f467b279eded4d991ea0cce59a6d"
    assert ref.get("stable_diffusion_inpainting").inpainting is True
    assert ref.get("Deliberate").nsfw is True
    # No deployment here for SD 2 or Flux: their rules are SD 1.5's and SDXL's.
    sd2, flux = ref.get("stable_diffusion_2.1"), ref.get("Flux.1-Schnell fp8 (Compact)")
    assert (sd2.family, sd2.rules_family) == (None, Family.stable_diffusion_1)
    assert (flux.family, flux.rules_family) == (None, Family.stable_diffusion_xl)
    text = ref.get("koboldcpp/Marx-3B-V3")
    assert (text.type, text.family, text.hub_repo) == ("text", Family.llm, "acrastt/Marx-3B-V3")
    assert ref.get("koboldcpp/Marx-3B-V3", "image") is None and ref.get("Deliberate", "text") is None


@pytest.mark.parametrize("data, why", [
    (b"[1, 2]", "not an object"),
    (b"{}", "not an object"),
    (b"{\"m\": ", "not JSON"),
    (json.dumps({"m": {"name": "m"}}).encode(), "baseline"),
    (json.dumps({"m": {**BASE, "name": "other"}}).encode(), "names it"),
    (json.dumps({"m": {**BASE, "name": "m", "config": {"download": [
        {"file_name": "../../etc/x", "file_path": "", "file_url": "https://h/x"}]}}}).encode(),
     "plain relative path"),
    (json.dumps({"m": {**BASE, "name": "m", "config": {"files": [
        {"path": "x.ckpt", "sha256sum": "abc"}]}}}).encode(), "sha256"),
])
def test_a_bad_published_file_is_refused_naming_what_is_wrong(data, why):
    with pytest.raises(ReferenceError, match=why):
        parse_published("image", data)


PROSE = "A long description of the model, written by its author"


def test_only_facts_are_kept_in_a_stable_form():
    published = {
        "b": {**BASE, "name": "b", "description": PROSE, "showcases": ["https://h/show.webp"],
              "homepage": "https://h/home", "tags": ["tagged"], "trigger": ["triggerword"],
              "version": 2, "requirements": {"clip_skip": 2, "unknown_knob": 1},
              "config": {"files": [{"path": "b.ckpt", "sha256sum": "AB" * 32, "md5sum": "0" * 32}],
                         "download": [{"file_name": "b.ckpt", "file_path": "",
                                       "file_url": "https://h/b.ckpt"}]}},
        "a": {**BASE, "name": "a", "description": PROSE, "nsfw": True},
    }
    data = dump_models(parse_published("image", json.dumps(published).encode()).values())
    for prose in (PROSE, "show.webp", "home", "tagged", "triggerword", "md5", "unknown_knob"):
        assert prose.encode() not in data
    lines = data.decode().splitlines()
    assert json.loads(lines[1].rstrip(",")) == {"baseline": "stable_diffusion_1", "name": "a",
                                                "nsfw": True, "type": "image"}
    assert json.loads(lines[2]) == {
        "baseline": "stable_diffusion_1", "name": "b", "type": "image", "version": "2",
        "requirements": {"clip_skip": 2}, "files": [{"path": "b.ckpt", "sha256": "ab" * 32}],
        "downloads": [{"file_name": "b.ckpt", "url": "https://h/b.ckpt"}]}
    # The same models in another order give the same bytes; they read back as they were.
    reordered = json.dumps(dict(reversed(published.items()))).encode()
    assert dump_models(parse_published("image", reordered).values()) == data
    assert read_models("image", data) == parse_published("image", reordered)


def _ours(*records) -> bytes:
    return json.dumps({"format": FORMAT, "models": list(records)}).encode()


MODEL = {"name": "m", "type": "image", "baseline": "stable_diffusion_1"}


@pytest.mark.parametrize("data, why", [
    (b"{", "not JSON"),
    (json.dumps({"m": {**BASE, "name": "m"}}).encode(), "not a rayhorde-model-reference/1 file"),
    (json.dumps({"format": "other/9", "models": [MODEL]}).encode(), "not a rayhorde"),
    (_ours(), "none"),
    (_ours({**MODEL, "description": PROSE}), r"models\[0\] \('m'\): description: Extra inputs"),
    (_ours(MODEL, {**MODEL, "type": "text"}), r"models\[1\].*a text model in the image file"),
    (_ours(MODEL, MODEL), "'m' twice"),
    (_ours({**MODEL, "files": [{"path": "x", "sha256": "abc"}]}), "files.0.sha256"),
    (_ours({**MODEL, "downloads": [{"file_name": "/etc/x", "url": "https://h/x"}]}),
     "plain relative path"),
    (_ours({**MODEL, "name": "x" * 201}), "name"),
    (_ours("m"), r"models\[0\] \(None\)"),
])
def test_a_bad_file_of_ours_is_refused_naming_what_is_wrong(data, why):
    with pytest.raises(ReferenceError, match=why):
        read_models("image", data)


def test_the_loader_names_the_file_it_cannot_read(tmp_path):
    (tmp_path / "image_models.json").write_bytes(_ours(MODEL))
    with pytest.raises(ReferenceError, match="text_models.json: missing; `rayhorde models refresh`"):
        load_reference(tmp_path)
    (tmp_path / "text_models.json").write_bytes(_ours(MODEL))
    with pytest.raises(ReferenceError, match=r"text_models.json: models\[0\].*image model"):
        load_reference(tmp_path)
    (tmp_path / "text_models.json").write_bytes(_ours({"name": "t", "type": "text"}))
    assert load_reference(tmp_path).get("t", "text") == ReferenceModel(name="t", type="text")


def _catalog(tmp_path, *models):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": list(models)}))
    return load_catalog(path)


WEIGHTS = {"kind": "pretrained", "path": "some/repo"}


def test_catalog_entries_take_what_they_leave_out_from_the_reference(tmp_path):
    catalog = _catalog(
        tmp_path,
        {"name": "Deliberate", "weights": WEIGHTS},
        {"name": "Stable Cascade 1.0", "weights": WEIGHTS, "requirements": {"min_steps": 5}},
        {"name": "stable_diffusion_2.1", "family": "stable_diffusion_1", "weights": WEIGHTS},
        {"name": "stable_diffusion_inpainting", "weights": WEIGHTS, "description": "mine"},
        {"name": "koboldcpp/Marx-3B-V3", "weights": WEIGHTS},
    )
    deliberate = catalog.get("Deliberate")
    assert (deliberate.family, deliberate.nsfw) == (Family.stable_diffusion_1, True)
    assert deliberate.description == ""  # the reference's prose is not kept
    cascade = catalog.get("Stable Cascade 1.0")
    assert cascade.family is Family.stable_cascade
    assert (cascade.requirements.min_steps, cascade.requirements.max_steps) == (5, None)  # a whole override
    assert catalog.get("stable_diffusion_2.1").family is Family.stable_diffusion_1
    inpainting = catalog.get("stable_diffusion_inpainting")
    assert inpainting.inpainting is True and inpainting.description == "mine"
    assert catalog.get("koboldcpp/Marx-3B-V3").family is Family.llm
    shipped = load_catalog("configs/models.yaml")
    assert shipped.get("stable_diffusion_inpainting").inpainting is True
    assert shipped.get("SDXL 1.0").family is Family.stable_diffusion_xl


@pytest.mark.parametrize("entry, why", [
    ({"name": "Deliberate", "family": "stable_diffusion_xl", "weights": WEIGHTS}, "contradicts"),
    ({"name": "stable_diffusion_2.1", "weights": WEIGHTS}, "give the family"),
    ({"name": "Deliberate"}, "needs `weights`"),
    ({"name": "my-model", "weights": WEIGHTS}, "family"),
])
def test_catalog_entries_that_cannot_be_completed_are_refused(tmp_path, entry, why):
    with pytest.raises(ValueError, match=why):
        _catalog(tmp_path, entry)
