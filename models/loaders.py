"""Load the diffusers pipeline(s) of a catalog entry, whatever its kind of weights.

- builtin:     the seeded tiny model from `models/tiny.py` named by `weights.path`.
- pretrained:  `Pipeline.from_pretrained(path)` (a Hugging Face repo id or a local diffusers folder).
- single_file: `Pipeline.from_single_file(path, config=weights.config)`; the config folder/repo
               supplies the component configs (and anything the checkpoint does not hold).

Stable Cascade is two pipelines: stage C (the prior, from `path`) and stage B (the decoder,
from `decoder_path`), returned as a `(prior, decoder)` tuple. Its single-file checkpoints hold
one stage's UNet each (as Stability ships stage_c / stage_b `.safetensors`), so the rest of
each pipeline (text encoder, tokenizer, scheduler, VQGAN) comes from a diffusers folder:
`weights.config` must then be a local folder with `prior/` and `decoder/` pipeline folders,
or None for Stability's own repos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from diffusers import (
    DDPMWuerstchenScheduler,
    DiffusionPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from models import tiny
from models.catalog import Family, ModelEntry, WeightsSource

CascadePipes = tuple[StableCascadePriorPipeline, StableCascadeDecoderPipeline]
Loaded = Union[DiffusionPipeline, CascadePipes]

PIPELINES: dict[Family, type[DiffusionPipeline]] = {
    Family.stable_diffusion_1: StableDiffusionPipeline,
    Family.stable_diffusion_xl: StableDiffusionXLPipeline,
}
CASCADE_REPOS = ("stabilityai/stable-cascade-prior", "stabilityai/stable-cascade")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(weights: WeightsSource, device: str | torch.device = "cpu") -> torch.dtype:
    """The entry's dtype, except that float16 on a CPU becomes float32: CPU kernels for
    half precision are missing or far slower (bfloat16 is kept, CPUs do run it)."""
    dtype = _DTYPES[weights.dtype]
    if dtype is torch.float16 and torch.device(device).type == "cpu":
        return torch.float32
    return dtype


def load_pipeline(entry: ModelEntry, device: str | torch.device = "cpu") -> Loaded:
    """The entry's pipeline (Stable Cascade: `(prior, decoder)`), on `device`, eval mode,
    progress bars off (they would flood the replica logs)."""
    w = entry.weights
    if w.kind == "builtin":
        pipes = _builtin(entry)
    elif entry.family is Family.stable_cascade:
        pipes = _load_cascade(w, torch_dtype(w, device))
    else:
        cls, dtype = PIPELINES[entry.family], torch_dtype(w, device)
        # The horde screens images itself; no SD safety checker (it would also cost ~1 GB).
        extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
        if w.kind == "pretrained":
            pipes = cls.from_pretrained(w.path, dtype=dtype, variant=w.variant, **extra)
        else:
            pipes = cls.from_single_file(w.path, config=w.config, dtype=dtype, **extra)
    for pipe in pipes if isinstance(pipes, tuple) else (pipes,):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    return pipes


def _builtin(entry: ModelEntry) -> Loaded:
    try:
        build = tiny.BUILTIN[entry.weights.path]
    except KeyError:
        raise ValueError(f"{entry.name}: no builtin model {entry.weights.path!r}; known: {sorted(tiny.BUILTIN)}")
    pipes = build()
    if entry.family is Family.stable_cascade:
        ok = isinstance(pipes, tuple)
    else:
        ok = isinstance(pipes, PIPELINES[entry.family])
    if not ok:
        raise ValueError(f"{entry.name}: builtin {entry.weights.path!r} is not a {entry.family.value} model")
    return pipes


def _load_cascade(w: WeightsSource, dtype: torch.dtype) -> CascadePipes:
    if not w.decoder_path:
        raise ValueError("Stable Cascade weights need decoder_path (stage B) as well as path (stage C)")
    kw = {"dtype": dtype, "variant": w.variant}
    if w.kind == "pretrained":
        prior = StableCascadeUNet.from_pretrained(w.path, subfolder="prior", **kw)
        decoder = StableCascadeUNet.from_pretrained(w.decoder_path, subfolder="decoder", **kw)
        prior_src, decoder_src = w.path, w.decoder_path
    else:
        prior_src, decoder_src = _cascade_configs(w.config)
        prior = StableCascadeUNet.from_single_file(w.path, config=prior_src, subfolder="prior", dtype=dtype)
        decoder = StableCascadeUNet.from_single_file(
            w.decoder_path, config=decoder_src, subfolder="decoder", dtype=dtype
        )
    # The prior keeps its image encoder (CLIP vision): the remix workflow's image prompts.
    prior_pipe = StableCascadePriorPipeline.from_pretrained(prior_src, prior=prior, **kw)
    return prior_pipe, _decoder_pipeline(decoder_src, decoder, kw)


def _decoder_pipeline(src: str, decoder: StableCascadeUNet, kw: dict) -> StableCascadeDecoderPipeline:
    """Stage B's pipeline from its parts. Not `from_pretrained`: diffusers 0.42 moved
    PaellaVQModel under pipelines/deprecated, and model_index.json's entry for it
    (["wuerstchen", ...] in Stability's repo, ["diffusers", ...] as save_pretrained now writes
    it) no longer resolves, even when the component is passed in."""
    return StableCascadeDecoderPipeline(
        decoder=decoder,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(src, subfolder="tokenizer"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(src, subfolder="scheduler"),
        vqgan=PaellaVQModel.from_pretrained(src, subfolder="vqgan", **kw),
        latent_dim_scale=StableCascadeDecoderPipeline.load_config(src).get("latent_dim_scale", 10.67),
    )


def _cascade_configs(config: str | None) -> tuple[str, str]:
    if config is None:
        return CASCADE_REPOS
    root = Path(config)
    prior, decoder = root / "prior", root / "decoder"
    if not ((prior / "model_index.json").is_file() and (decoder / "model_index.json").is_file()):
        raise ValueError(
            f"Stable Cascade single-file config {config!r} must be a folder holding the prior and "
            "decoder diffusers pipelines as prior/ and decoder/"
        )
    return str(prior), str(decoder)


def load_layer_diffuse_for(entry: ModelEntry, unet: torch.nn.Module, cache_dir: str | Path | None = None):
    """The entry's Layer Diffuse files (models/layer_diffuse.py `LayerDiffuse`: the injection,
    checked against `unet`, not applied, and the transparent decoder), loaded strictly from
    .safetensors files. Builtin ones are made for `unet` with seeded random weights, written to
    `cache_dir` (a temporary folder by default) and loaded back the same way."""
    from models import layer_diffuse

    ld = entry.layer_diffuse
    if ld is None:
        raise ValueError(f"{entry.name}: no Layer Diffuse weights in the catalog")
    family = entry.family.value
    if ld.kind == "builtin":
        import tempfile

        # A folder of its own: replicas on one machine must not write over each other's files.
        folder = Path(tempfile.mkdtemp(prefix=f"layer-diffuse-{entry.name}-", dir=cache_dir))
        injection, decoder = layer_diffuse.build_tiny_transparent(family, unet)
        injection_path, decoder_path = layer_diffuse.save_layer_diffuse(folder, family, injection, decoder)
    elif ld.kind == "file":
        injection_path, decoder_path = ld.injection, ld.decoder
    else:
        from huggingface_hub import hf_hub_download

        injection_path = hf_hub_download(ld.repo, ld.injection)
        decoder_path = hf_hub_download(ld.repo, ld.decoder)
    return layer_diffuse.load_layer_diffuse(injection_path, decoder_path, family, unet)


def _without_adapters(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet as loaded, without the LoRA layers a replica may have put in it since (PEFT
    renames the wrapped weights `*.base_layer.*`): what a ControlNet made from it must copy."""
    names = unet.state_dict()
    if not any("lora_" in k or ".base_layer." in k for k in names):
        return unet
    clean = type(unet).from_config(unet.config)
    clean.load_state_dict({k.replace(".base_layer", ""): v for k, v in names.items() if "lora_" not in k})
    return clean.to(next(unet.parameters()).device)


def load_controlnet(entry, unet: torch.nn.Module, device: str | torch.device = "cpu"):
    """A catalog ControlNet (models/catalog.py ControlNetEntry) for a pipeline whose UNet is
    `unet`: builtin ones are made from that UNet (models/tiny_controlnet.py); others load
    through from_pretrained / from_single_file, in the UNet's dtype."""
    from diffusers import ControlNetModel

    w = entry.weights
    if w.kind == "builtin":
        from models.tiny_controlnet import BUILTIN_CONTROLNETS

        if w.path not in BUILTIN_CONTROLNETS:
            raise ValueError(f"{entry.name}: no builtin ControlNet {w.path!r}; known: {sorted(BUILTIN_CONTROLNETS)}")
        controlnet = BUILTIN_CONTROLNETS[w.path](_without_adapters(unet))
    elif w.kind == "pretrained":
        controlnet = ControlNetModel.from_pretrained(w.path, dtype=torch_dtype(w, device), variant=w.variant)
    else:
        controlnet = ControlNetModel.from_single_file(w.path, config=w.config, dtype=torch_dtype(w, device))
    return controlnet.to(device=device, dtype=unet.dtype).eval()
