"""LoRAs and textual inversions on the tiny SD 1.5 / SDXL pipelines (models/adapters.py,
models/adapter_loading.py, models/tiny_adapters.py). Every check compares real images made
with and without adapters at the same seed."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.adapter_loading import _inject_trigger, loaded_loras, loaded_tis
from models.adapters import (
    AdapterCatalog,
    AdapterMismatch,
    AdapterNotFound,
    AdapterRefused,
    AdapterResolver,
    LoraSpec,
    TiSpec,
    apply_adapters,
    check_request,
)
from models.tiny import build_tiny_sd15, build_tiny_sdxl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SD1, XL = "stable_diffusion_1", "stable_diffusion_xl"
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are too small to gain from threads; on shared cores, extra threads only
    wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def builtin(name, kind, baseline, **kw) -> dict:
    return {"name": name, "kind": kind, "baseline": baseline, "source": {"kind": "builtin", "path": name}, **kw}


@pytest.fixture(scope="module")
def resolver(tmp_path_factory) -> AdapterResolver:
    catalog = AdapterCatalog.model_validate({
        "cache_dir": str(tmp_path_factory.mktemp("adapters")),
        "adapters": [
            builtin("tiny-lora", "lora", SD1, triggers=["tinystyle", "Red Sky"]),
            builtin("tiny-lora-2", "lora", SD1),
            builtin("tiny-ti", "ti", SD1),
            builtin("tiny-lora-xl", "lora", XL),
            builtin("tiny-ti-xl", "ti", XL),
            builtin("spicy", "lora", SD1, nsfw=True) | {"source": {"kind": "builtin", "path": "tiny-lora-2"}},
        ],
    })
    return AdapterResolver(catalog)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15():
    return quiet(build_tiny_sd15())


@pytest.fixture(scope="module")
def sdxl():
    return quiet(build_tiny_sdxl())


def render(pipe, resolver, loras=(), tis=(), prompt=PROMPT, negative="", baseline=SD1) -> np.ndarray:
    """One 128x128, 3-step image at seed 42 with exactly these adapters; uint8 pixels."""
    lora_pairs = [(s, resolver.resolve("lora", s.name, s.is_version, baseline)) for s in loras]
    ti_pairs = [(s, resolver.resolve("ti", s.name, False, baseline)) for s in tis]
    prompt, negative = apply_adapters(pipe, lora_pairs, ti_pairs, prompt, negative)
    out = pipe(prompt=prompt, negative_prompt=negative, width=128, height=128, num_inference_steps=3,
               guidance_scale=7.0, generator=torch.Generator().manual_seed(42), output_type="np")
    return (out.images[0] * 255).round().astype(np.int16)


def diff(a, b) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def base(sd15, resolver):
    return render(sd15, resolver)


def test_lora_changes_the_image_and_strength_zero_does_not(sd15, resolver, base):
    with_lora = render(sd15, resolver, [LoraSpec(name="tiny-lora")])
    assert diff(with_lora, base) > 20
    assert diff(render(sd15, resolver, [LoraSpec(name="tiny-lora", model=0.0, clip=0.0)]), base) <= 1
    unet_only = render(sd15, resolver, [LoraSpec(name="tiny-lora", clip=0.0)])
    text_only = render(sd15, resolver, [LoraSpec(name="tiny-lora", model=0.0)])
    assert diff(unet_only, base) > 5 and diff(text_only, base) > 5 and diff(unet_only, with_lora) > 5
    assert diff(render(sd15, resolver, [LoraSpec(name="tiny-lora", model=-1.0)]), with_lora) > 5


def test_no_lora_after_lora_gives_the_plain_image(sd15, resolver, base):
    render(sd15, resolver, [LoraSpec(name="tiny-lora"), LoraSpec(name="tiny-lora-2", model=2.0)])
    assert diff(render(sd15, resolver), base) == 0


def test_two_loras_at_once(sd15, resolver, base):
    a = render(sd15, resolver, [LoraSpec(name="tiny-lora")])
    b = render(sd15, resolver, [LoraSpec(name="tiny-lora-2")])
    both = render(sd15, resolver, [LoraSpec(name="tiny-lora"), LoraSpec(name="tiny-lora-2")])
    assert min(diff(both, a), diff(both, b), diff(both, base), diff(a, b)) > 5
    # Order does not matter; the same LoRA twice adds its strengths.
    assert diff(render(sd15, resolver, [LoraSpec(name="tiny-lora-2"), LoraSpec(name="tiny-lora")]), both) <= 1
    twice = render(sd15, resolver, [LoraSpec(name="tiny-lora", model=0.5, clip=0.5)] * 2)
    assert diff(twice, a) <= 1


def test_switching_cached_loras_reproduces_images_without_reloading(resolver, monkeypatch):
    pipe = quiet(build_tiny_sd15())
    loads = []
    real = pipe.load_lora_weights
    monkeypatch.setattr(pipe, "load_lora_weights", lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    a1 = render(pipe, resolver, [LoraSpec(name="tiny-lora")])
    b1 = render(pipe, resolver, [LoraSpec(name="tiny-lora-2", model=0.7)])
    plain = render(pipe, resolver)
    for _ in range(2):
        assert diff(render(pipe, resolver, [LoraSpec(name="tiny-lora")]), a1) == 0
        assert diff(render(pipe, resolver, [LoraSpec(name="tiny-lora-2", model=0.7)]), b1) == 0
        assert diff(render(pipe, resolver), plain) == 0
    assert len(loads) == 2 and len(loaded_loras(pipe)) == 2


def test_lru_keeps_at_most_n_loras_per_pipeline(resolver):
    pipe = quiet(build_tiny_sd15())
    spec_a, spec_b = LoraSpec(name="tiny-lora"), LoraSpec(name="tiny-lora-2")
    ra, rb = resolver.resolve("lora", "tiny-lora"), resolver.resolve("lora", "tiny-lora-2")
    apply_adapters(pipe, [(spec_a, ra)], [], PROMPT, "")
    from models.adapter_loading import apply_adapters as apply_n

    apply_n(pipe, [(spec_b, rb)], [], PROMPT, "", max_loras=1)
    assert loaded_loras(pipe) == [rb.adapter_name]
    assert {n for names in pipe.get_list_adapters().values() for n in names} == {rb.adapter_name}


def test_builtin_files_load_through_the_file_path(sd15, resolver, tmp_path):
    res = resolver.resolve("lora", "tiny-lora", baseline=SD1)
    assert res.path.is_file() and res.path.suffix == ".safetensors"
    assert res.path.parent == resolver.cache_dir / "builtin"
    copy = shutil.copy(res.path, tmp_path / "copied.safetensors")
    as_file = AdapterResolver(AdapterCatalog.model_validate({"cache_dir": str(tmp_path / "c"), "adapters": [
        {"name": "from-disk", "kind": "lora", "baseline": SD1, "source": {"kind": "file", "path": str(copy)},
         "sha256": res.sha256}]}))
    other = as_file.resolve("lora", "from-disk", baseline=SD1)
    assert other.adapter_name == res.adapter_name and other.path != res.path
    assert diff(render(sd15, as_file, [LoraSpec(name="from-disk")]),
                render(sd15, resolver, [LoraSpec(name="tiny-lora")])) == 0
    bad = AdapterResolver(AdapterCatalog.model_validate({"cache_dir": str(tmp_path / "d"), "adapters": [
        {"name": "x", "kind": "lora", "baseline": SD1, "source": {"kind": "file", "path": str(copy)},
         "sha256": "0" * 64}]}))
    with pytest.raises(AdapterRefused, match="sha256"):
        bad.resolve("lora", "x")


def test_ti_in_prompt_and_negative_prompt(sd15, resolver, base):
    res = resolver.resolve("ti", "tiny-ti", baseline=SD1)
    prompt, neg = apply_adapters(sd15, [], [(TiSpec(name="tiny-ti", inject_ti="prompt"), res)], PROMPT, "blurry")
    assert prompt.endswith(PROMPT) and prompt != PROMPT and neg == "blurry"
    in_prompt = render(sd15, resolver, tis=[TiSpec(name="tiny-ti", inject_ti="prompt")])
    in_neg = render(sd15, resolver, tis=[TiSpec(name="tiny-ti", inject_ti="negprompt")])
    half = render(sd15, resolver, tis=[TiSpec(name="tiny-ti", inject_ti="prompt", strength=0.5)])
    assert min(diff(in_prompt, base), diff(in_neg, base)) > 5
    # CLIP normalises each layer's input, so scaling the vectors changes less than adding them.
    assert diff(half, in_prompt) > 0 and diff(half, base) > 0
    # Not injected: only where the prompt names it as the horde does, `embedding:NAME`.
    assert diff(render(sd15, resolver, tis=[TiSpec(name="tiny-ti")]), base) == 0
    named = render(sd15, resolver, tis=[TiSpec(name="tiny-ti")], prompt="embedding:tiny-ti " + PROMPT)
    assert diff(named, in_prompt) == 0
    assert len(loaded_tis(sd15)) == 2  # strengths 1 and 0.5


def test_sdxl_lora_and_ti(sdxl, resolver):
    plain = render(sdxl, resolver, baseline=XL)
    lora = render(sdxl, resolver, [LoraSpec(name="tiny-lora-xl")], baseline=XL)
    assert diff(lora, plain) > 20
    assert diff(render(sdxl, resolver, [LoraSpec(name="tiny-lora-xl", model=0.0)], baseline=XL), plain) > 5
    assert diff(render(sdxl, resolver, [LoraSpec(name="tiny-lora-xl", model=0, clip=0)], baseline=XL), plain) <= 1
    ti = render(sdxl, resolver, tis=[TiSpec(name="tiny-ti-xl", inject_ti="prompt")], baseline=XL)
    assert diff(ti, plain) > 5
    assert diff(render(sdxl, resolver, baseline=XL), plain) == 0


def test_unknown_mismatched_and_nsfw(resolver):
    with pytest.raises(AdapterNotFound):
        resolver.resolve("lora", "no-such-lora", baseline=SD1)
    with pytest.raises(AdapterNotFound):
        resolver.resolve("ti", "tiny-lora", baseline=SD1)  # a LoRA's name is no TI
    with pytest.raises(AdapterMismatch) as e:
        resolver.resolve("lora", "tiny-lora-xl", baseline=SD1)
    assert e.value.metadata == "baseline_mismatch"
    with pytest.raises(AdapterRefused, match="NSFW"):
        resolver.resolve("lora", "spicy", baseline=SD1, nsfw_ok=False)
    assert resolver.resolve("lora", "spicy", baseline=SD1).path.is_file()


def test_check_request(resolver):
    cat = resolver.catalog
    assert check_request(cat, [{"name": "tiny-lora", "model": 0.5}], [{"name": "tiny-ti", "inject_ti": "prompt"}], SD1) == []
    problems = check_request(cat, [{"name": "nope"}, {"name": "tiny-lora-xl"}, {"name": "x", "model": 9}],
                             [{"name": "tiny-ti", "bogus": 1}], SD1)
    assert len(problems) == 4 and "unknown lora 'nope'" in problems[0] and "stable_diffusion_xl" in problems[1]
    assert len(check_request(cat, [{"name": "tiny-lora"}] * 6, [{"name": "tiny-ti"}] * 21, SD1)) == 2
    open_cat = cat.model_copy(update={"allow_downloads": True})
    assert check_request(open_cat, [{"name": "12345", "is_version": True}, {"name": "any name"}], [], SD1) == []


def test_specs_are_strict_and_bounded():
    for bad in ({"name": "x", "model": 5.5}, {"name": "x", "clip": -6}, {"name": ""}, {"name": "x" * 256},
                {"name": "x", "extra": 1}, {"name": "abc", "is_version": True}, {"name": 5},
                {"name": "x", "inject_trigger": "t" * 256}):
        with pytest.raises(ValidationError):
            LoraSpec.model_validate(bad)
    assert LoraSpec.model_validate({"name": "7", "model": 2, "is_version": True}).model == 2.0
    with pytest.raises(ValidationError):
        TiSpec.model_validate({"name": "x", "inject_ti": "both"})


def test_inject_trigger():
    words = ["tinystyle", "Red Sky"]
    assert _inject_trigger("p", "any", words) == "p, tinystyle"
    assert _inject_trigger("p", "all", words) == "p, tinystyle, Red Sky"
    assert _inject_trigger("p", "red sky", words) == "p, red sky"
    assert _inject_trigger("p", "blue", words) == "p"
    assert _inject_trigger("p", None, words) == "p" and _inject_trigger("p", "any", []) == "p"


def test_trigger_reaches_the_prompt(sd15, resolver):
    res = resolver.resolve("lora", "tiny-lora", baseline=SD1)
    prompt, _ = apply_adapters(sd15, [(LoraSpec(name="tiny-lora", inject_trigger="all"), res)], [], PROMPT, "")
    assert prompt == f"{PROMPT}, tinystyle, Red Sky"


def test_adapters_module_imports_no_torch():
    code = "import sys, models.adapters; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
