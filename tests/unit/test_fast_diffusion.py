"""The diffusion deployment's device set-up (deployments/diffusion/acceleration.py) and what it
promises, on the tiny models on a CPU: the dtype rule, SDPA attention everywhere, SDXL's VAE
kept safe in float16 (run here in float16 on the CPU, which torch supports, slowly), the
float16 VAE swapped in when the catalog names one, batched `n` equal to single-seed calls,
`compile: true` compiling the denoisers, and the replica's warm-up at construction.

What a CPU cannot show: the speed of any of it (bench/gpu.py measures that on a GPU), and
inductor's code generation for `compile: true`: these tests compile with the "eager" backend,
which traces the UNet through TorchDynamo as inductor would but runs it as is (an inductor
compile of even the tiny UNet takes about two minutes on this machine's CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from deployments.diffusion import acceleration
from deployments.diffusion.deployment import DiffusionDeployment, DiffusionGenerator
from deployments.jobs import ImageJob
from models.catalog import Family, ModelEntry

pytestmark = pytest.mark.timeout(180)

ENTRIES = {
    Family.stable_diffusion_1: {"name": "tiny-sd15", "family": "stable_diffusion_1",
                                "weights": {"kind": "builtin", "path": "tiny-sd15"}},
    Family.stable_diffusion_xl: {"name": "tiny-sdxl", "family": "stable_diffusion_xl",
                                 "weights": {"kind": "builtin", "path": "tiny-sdxl"}},
    Family.stable_cascade: {"name": "tiny-cascade", "family": "stable_cascade",
                            "weights": {"kind": "builtin", "path": "tiny-cascade"}},
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def generator(family: Family, **entry_overrides) -> DiffusionGenerator:
    return DiffusionGenerator(family, [{**ENTRIES[family], **entry_overrides}], device="cpu")


def job(family: Family, seeds, **overrides) -> ImageJob:
    side = 128 if family is Family.stable_cascade else 64
    return ImageJob(model=ENTRIES[family]["name"], prompt="a red castle on a mountain", seeds=tuple(seeds),
                    width=side, height=side, steps=4, **overrides)


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB"), dtype=np.int16) for im in images]


def test_dtype_rule():
    cases = [
        # (family, device, the entry's dtype, GPU has bfloat16) -> dtype
        (Family.stable_diffusion_1, "cpu", "float32", True, torch.float32),
        (Family.stable_diffusion_1, "cpu", "float16", True, torch.float32),  # CPU: always float32
        (Family.stable_cascade, "cpu", "bfloat16", True, torch.float32),
        (Family.stable_diffusion_1, "cuda", "float32", True, torch.float16),
        (Family.stable_diffusion_1, "cuda:1", "float16", False, torch.float16),
        (Family.stable_diffusion_xl, "cuda", "float16", True, torch.float16),
        (Family.stable_diffusion_xl, "cuda", "bfloat16", True, torch.bfloat16),
        (Family.stable_diffusion_xl, "cuda", "bfloat16", False, torch.float32),
        (Family.stable_cascade, "cuda", "float16", True, torch.bfloat16),  # stage C overflows float16
        (Family.stable_cascade, "cuda", "bfloat16", False, torch.float32),
    ]
    for family, device, named, bf16, want in cases:
        assert acceleration.pipeline_dtype(family, device, named, bf16_supported=bf16) is want, (family, device, named)


@pytest.mark.parametrize("family", list(ENTRIES))
def test_loaded_models_run_float32_and_sdpa_on_a_cpu(family):
    loaded = generator(family).load(ENTRIES[family]["name"])
    modules = [c for p in acceleration.pipelines(loaded) for c in p.components.values()
               if isinstance(c, torch.nn.Module)]
    assert all(p.dtype is torch.float32 for m in modules for p in m.parameters())
    attention = [a for m in modules for a in m.modules() if isinstance(a, Attention)]
    assert attention and all(type(a.processor) is AttnProcessor2_0 for a in attention)
    assert not any(acceleration.slow_attention(m) for m in modules)
    assert not any(acceleration.is_compiled(m) for m in acceleration.denoisers(loaded))


def test_the_slow_attention_path_is_replaced_and_changes_nothing():
    gen = generator(Family.stable_diffusion_1)
    pipe = gen.load("tiny-sd15")
    want = pixels(gen.generate(pipe, job(Family.stable_diffusion_1, [5])))
    pipe.unet.set_attn_processor(AttnProcessor())  # what set_default_attn_processor() would do
    assert acceleration.slow_attention(pipe.unet)
    assert acceleration.sdpa_everywhere(pipe.unet) == len([m for m in pipe.unet.modules() if isinstance(m, Attention)])
    assert not acceleration.slow_attention(pipe.unet)
    got = pixels(gen.generate(pipe, job(Family.stable_diffusion_1, [5])))
    assert np.abs(got[0] - want[0]).max() <= 1


def _decoder_input_dtypes(vae) -> list:
    seen = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


def test_sdxl_in_float16_decodes_with_its_vae_upcast():
    gen = generator(Family.stable_diffusion_xl)
    entry = gen.entries["tiny-sdxl"]
    pipe = acceleration.prepare(gen.load("tiny-sdxl"), entry, "cpu", dtype=torch.float16)
    assert pipe.unet.dtype is torch.float16 and pipe.vae.dtype is torch.float16
    assert pipe.vae.config.force_upcast  # the tiny VAE's config said False: put back
    decoded = _decoder_input_dtypes(pipe.vae)
    (image,) = gen.generate(pipe, job(Family.stable_diffusion_xl, [3]))
    assert decoded == [torch.float32] and pipe.vae.dtype is torch.float16  # upcast for the decode only
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_a_vae_named_in_the_catalog_replaces_the_checkpoints(tmp_path):
    base = generator(Family.stable_diffusion_xl).load("tiny-sdxl")
    config = {**base.vae.config, "force_upcast": False}  # as the fp16-fix VAE's config says
    torch.manual_seed(11)
    fixed = AutoencoderKL.from_config(config)
    fixed.save_pretrained(tmp_path / "vae")
    gen = generator(Family.stable_diffusion_xl, vae=str(tmp_path / "vae"))
    entry = gen.entries["tiny-sdxl"]
    pipe = acceleration.prepare(gen.load("tiny-sdxl"), entry, "cpu", dtype=torch.float16)
    assert pipe.vae.dtype is torch.float16 and not pipe.vae.config.force_upcast
    assert all(torch.equal(a.half(), b) for a, b in zip(fixed.state_dict().values(), pipe.vae.state_dict().values()))
    decoded = _decoder_input_dtypes(pipe.vae)
    gen.generate(pipe, job(Family.stable_diffusion_xl, [3]))
    assert decoded == [torch.float16]  # made for float16: no upcast
    with pytest.raises(ValueError, match="Stable Cascade has none"):
        ModelEntry.model_validate({**ENTRIES[Family.stable_cascade], "vae": "x"})


@pytest.mark.parametrize("family", list(ENTRIES))
def test_batched_n_is_one_pipeline_call_giving_each_seeds_own_image(family):
    gen = generator(family)
    loaded = gen.load(ENTRIES[family]["name"])
    batches: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda module, args, kwargs: batches.append(
        (args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True) for m in acceleration.denoisers(loaded)]
    seeds = [21, 22, 23]
    together = pixels(gen.generate(loaded, job(family, seeds)))
    calls_together = list(batches)
    for h in hooks:
        h.remove()
    alone = [pixels(gen.generate(loaded, job(family, [s])))[0] for s in seeds]
    # One call: every denoiser step saw all three images (times two for classifier-free
    # guidance where it applies), never one image at a time.
    assert calls_together and all(b in (3, 6) for b in calls_together)
    for a, b in zip(together, alone):
        assert np.abs(a - b).max() <= 2  # batched float32 kernels may round differently
    assert np.abs(together[0] - together[1]).max() > 10  # and the seeds do differ


@pytest.mark.parametrize("family", [Family.stable_diffusion_1, Family.stable_cascade])
def test_compile_flag_compiles_the_denoisers(family, monkeypatch):
    monkeypatch.setattr(acceleration, "COMPILE_OPTIONS", {"backend": "eager"})
    plain = generator(family)
    compiled = generator(family, compile=True)
    name = ENTRIES[family]["name"]
    loaded = compiled.load(name)
    assert all(acceleration.is_compiled(m) for m in acceleration.denoisers(loaded))
    assert len(acceleration.denoisers(loaded)) == (2 if family is Family.stable_cascade else 1)
    want = pixels(plain.generate(plain.load(name), job(family, [8, 9])))
    got = pixels(compiled.generate(loaded, job(family, [8, 9])))
    for a, b in zip(got, want):
        assert np.abs(a - b).max() <= 1
    with pytest.raises(ValueError, match="compile and vae are for image models"):
        ModelEntry.model_validate({"name": "t", "family": "llm", "weights": {"kind": "builtin", "path": "tiny-llm"},
                                   "compile": True})


def test_replica_warms_up_at_construction(monkeypatch):
    calls = []
    real_generate = DiffusionGenerator.generate

    def recording(self, pipe, job):
        images = real_generate(self, pipe, job)
        calls.append((pipe, job, [im.size for im in images]))
        return images

    monkeypatch.setattr(DiffusionGenerator, "generate", recording)
    inpainting = {"name": "tiny-sd15-inpainting", "family": "stable_diffusion_1", "inpainting": True,
                  "weights": {"kind": "builtin", "path": "tiny-sd15-inpainting"}}
    replica = DiffusionDeployment.func_or_class([inpainting, ENTRIES[Family.stable_diffusion_1]])
    # The first model that runs from a prompt alone was loaded and made one image, before any request.
    ((pipe, warm_job, sizes),) = calls
    assert warm_job.model == "tiny-sd15" and sizes == [(128, 128)] and warm_job.steps == 2
    assert replica._warmed == {"tiny-sd15": pipe}
    assert DiffusionDeployment.func_or_class([ENTRIES[Family.stable_diffusion_1]], warm_up=False)._warmed == {}
    assert len(calls) == 1
    # A model that cannot load does not keep the replica from starting; its jobs will say why.
    broken = {**ENTRIES[Family.stable_diffusion_1], "weights": {"kind": "builtin", "path": "no-such-model"}}
    assert DiffusionDeployment.func_or_class([broken])._warmed == {}
