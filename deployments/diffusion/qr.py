"""The `qr_code` workflow's diffusion (SD 1.5 and SDXL): one QR Code Monster ControlNet applied
three ways over a split sampling schedule, as the AI Horde's engine does it (horde-facts, "QR
code"). The layers come from models/qr.render_layers; the scan guarantee is models/qr's
`blend_until_scans` (see `ensure_scans`).

With S the job's steps and k the split step (11, see `split_steps`):

1. modules pass: steps [0, k) from the seed's noise, control = the module layer (finders
   painted out) at strength 1.0, the prompt. It stops at step k's noise level and keeps its
   leftover noise: the latents it returns are still noisy.
2. finders pass: steps [1, k) from the same seed's noise, added at step 1's (lower) noise level,
   control = the finder layer at strength 6, `function_prompt`. Also stops noisy at step k.
3. the finder latents pasted over the module latents through the feathered finder mask
   (downsampled to the latent size by area averaging): both are at the same noise level, so
   the composite is a valid noisy latent.
4. final pass: steps [k, S) from the composite without new noise, control = the whole code at
   strength 1.5, the prompt.

diffusers' SD 1.5 pipelines have no denoising_start / denoising_end, so `denoise` is our own
loop over the scheduler: the one loop for all three passes. Each pass gets a fresh scheduler
(as each of the engine's samplers is a fresh sampler call): multistep solvers (LMS, DPM++ 2M)
restart at first order after the split, and the singlestep DPM solvers lower their order where
a pass starts inside one of their groups (the scheduler does that itself).

Step k of the schedule is timestep index k * scheduler.order (diffusers' convention, as in its
img2img pipelines): Heun and DPM2 make two model calls per step, and index 2k is the first call
of step k, so a pass that ends there ends on a completed step.

The ControlNet is applied to both halves of the classifier-free-guidance batch (as ComfyUI's
ControlNetApplyAdvanced conditions both the positive and the negative, and as diffusers does
outside guess mode), on every step of every pass (start 0, end 1).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from deployments.diffusion.common import base_scheduler_config, generators
from deployments.jobs import ImageJob, JobRejected
from models.catalog import Family
from models.qr import QrLayers, blend_until_scans
from models.samplers import make_scheduler

SPLIT_STEP = 11  # where the module and finder passes stop and the whole-code pass takes over
FINDER_START_STEP = 1  # the finder pass starts one step later, at a lower noise level
REFERENCE_STEPS = 30  # the AI Horde's default steps: the split is 11 of these (see split_steps)
MODULES_SCALE = 1.0
FINDERS_SCALE = 6.0
CODE_SCALE = 1.5
QR_FAMILIES = (Family.stable_diffusion_1, Family.stable_diffusion_xl)


def split_steps(steps: int) -> tuple[int, int]:
    """(finder pass start, split step) for a job of `steps` steps.

    Above 11 steps: (1, 11), the engine's numbers. At 11 steps or fewer the engine's split
    would leave nothing for the whole-code pass (its passes would run to the end), so the split
    is scaled to the same fraction of the schedule it has at the AI Horde's default 30 steps:
    split = round(steps * 11 / 30), at least 1 and at most steps - 1 (so that every pass runs
    at least one step where the schedule has room: 2 steps -> split 1). The finder pass then
    starts at step 1 when that is before the split, else at 0 (with the module pass).
    Examples: 8 -> (1, 3), 11 -> (1, 4), 4 -> (0, 1), 1 -> (0, 1) (no whole-code pass).
    Note the jump at 12 steps (split 11, one whole-code step): that is the engine's own split.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > SPLIT_STEP:
        return FINDER_START_STEP, SPLIT_STEP
    split = max(1, min(steps - 1, round(steps * SPLIT_STEP / REFERENCE_STEPS)))
    return (FINDER_START_STEP if FINDER_START_STEP < split else 0), split


@dataclass(frozen=True)
class Conditioning:
    """One prompt's text conditioning for the whole batch, negative first when guided."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None  # SDXL's text_embeds / time_ids, else None


def _is_sdxl(pipe: DiffusionPipeline) -> bool:
    return pipe.unet.config.addition_embed_type == "text_time"


def encode(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str, negative: str,
           n: int, guided: bool, size: tuple[int, int]) -> Conditioning:
    """The prompt through the family's `text_inputs` (clip_skip) and the pipeline's own
    `encode_prompt`; for SDXL also the pooled embeddings and `_get_add_time_ids` for an
    uncropped image of `size` (width, height) generated at that size."""
    inputs = dict(family.text_inputs(pipe, job, prompt, negative))
    inputs.setdefault("prompt", None)
    device = pipe.unet.device
    if not _is_sdxl(pipe):
        pos, neg = pipe.encode_prompt(device=device, num_images_per_prompt=n,
                                      do_classifier_free_guidance=guided, **inputs)
        return Conditioning(torch.cat([neg, pos]) if guided else pos, None)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(device=device, num_images_per_prompt=n,
                                                      do_classifier_free_guidance=guided, **inputs)
    projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                  else pipe.text_encoder_2.config.projection_dim)
    width, height = size
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                      text_encoder_projection_dim=projection).to(device)
    if guided:
        pos, pooled = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
        time_ids = torch.cat([time_ids, time_ids])
    time_ids = time_ids.repeat(n, 1)  # one row per image; all rows are the same
    return Conditioning(pos, {"text_embeds": pooled, "time_ids": time_ids})


def control_tensor(image: Image.Image, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """A control image as the ControlNet takes it: RGB in [0, 1], [1, 3, H, W] (what
    diffusers' ControlNet pipelines make of a PIL image; no normalisation to [-1, 1]). One
    for the whole batch: every image of a QR job has the same control."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


class _FixedEmbedding(torch.nn.Module):
    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embedding = embedding

    def forward(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        return self.embedding  # [1, C, h, w]: broadcast over the batch by `sample + cond`


@contextmanager
def fixed_control(controlnet: ControlNetModel, control: torch.Tensor) -> Iterator[None]:
    """While in the block, the ControlNet's conditioning embedding (control image -> latent
    features, run at full image resolution) returns its output for `control`, computed once,
    instead of recomputing it on every call and for every image of the batch: a pass's control
    image never changes. The ControlNet's own forward does the rest unchanged. (On the tiny
    models this embedding is most of the ControlNet's cost; on the real ones a few percent.)
    Replicas run one job at a time (common.ReplicaRunner), so swapping the submodule is safe."""
    original = controlnet.controlnet_cond_embedding
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":
        control = torch.flip(control, dims=[1])  # as the forward would before embedding it
    fixed = _FixedEmbedding(original(control))
    controlnet.controlnet_cond_embedding = fixed
    try:
        yield
    finally:
        controlnet.controlnet_cond_embedding = original


def denoise(pipe: DiffusionPipeline, controlnet: ControlNetModel, job: ImageJob, start: int, end: int,
            cond: Conditioning, control: torch.Tensor, scale: float,
            gens: list[torch.Generator], *, latents: torch.Tensor | None = None,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run steps [start, end) of the job's `steps`-step schedule under one ControlNet
    application and return the latents at step `end`'s noise level (noisy unless `end` is the
    last step: the "leftover noise" is kept).

    Exactly one of `latents` (continue from them, no new noise: they are at step `start`'s
    noise level) and `noise` (an empty latent noised to step `start`'s level: the initial
    noise sigma at step 0, the scheduler's `add_noise` later) is given. `control` is the
    control image ([1, 3, H, W]); `scale` 0 skips the ControlNet (its residuals would be 0)."""
    if (latents is None) == (noise is None):
        raise ValueError("give exactly one of latents and noise")
    scheduler = make_scheduler(job.sampler_name, job.karras, base_scheduler_config(pipe))
    unet = pipe.unet
    scheduler.set_timesteps(job.steps, device=unet.device)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps
    first, last = start * order, min(end * order, len(timesteps))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first)
    if noise is not None:
        if first == 0:
            latents = noise * scheduler.init_noise_sigma
        elif first < len(timesteps):
            latents = scheduler.add_noise(torch.zeros_like(noise), noise, timesteps[first:first + 1])
        else:
            latents = torch.zeros_like(noise)
    guided = cond.embeds.shape[0] == 2 * latents.shape[0]
    timestep_cond = None
    if unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM)
        w = torch.tensor(job.cfg_scale - 1).repeat(latents.shape[0])
        timestep_cond = pipe.get_guidance_scale_embedding(
            w, embedding_dim=unet.config.time_cond_proj_dim).to(device=unet.device, dtype=unet.dtype)
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    embeds, added = cond.embeds.to(unet.dtype), cond.added
    use_control = scale != 0 and first < last
    with fixed_control(controlnet, control) if use_control else nullcontext():
        for t in timesteps[first:last]:
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t).to(unet.dtype)
            residuals = {}
            if use_control:
                down, mid = controlnet(x, t, encoder_hidden_states=embeds, controlnet_cond=control,
                                       conditioning_scale=float(scale), added_cond_kwargs=added,
                                       return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            eps = unet(x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
                       added_cond_kwargs=added, return_dict=False, **residuals)[0].float()
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + job.cfg_scale * (text - uncond)
            latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0].float()
    return latents


def latent_mask(mask: Image.Image, latent_hw: tuple[int, int], device: Any) -> torch.Tensor:
    """The feathered finder mask (L, 255 = finder) as [1, 1, h, w] in [0, 1] at latent size,
    each latent pixel the mean of the image pixels it covers."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(m, size=latent_hw, mode="area").to(device)


def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # SDXL's VAE overflows in fp16, as the SDXL pipeline knows
        vae.to(torch.float32)
    try:
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(images.float(), output_type="pil")


@torch.no_grad()
def qr_generate(family_module: ModuleType, pipe: DiffusionPipeline, controlnet: ControlNetModel,
                job: ImageJob, layers: QrLayers, function_prompt: str, prompt: str, negative: str, *,
                modules_scale: float = MODULES_SCALE, finders_scale: float = FINDERS_SCALE,
                code_scale: float = CODE_SCALE) -> list[Image.Image]:
    """One image per seed of `job`, the QR code worked into it by the split passes (module
    docstring). `layers` must be rendered at the job's size. `prompt` / `negative` are the
    job's (with LoRA/TI tokens put in); `function_prompt` conditions the finder pass. The
    strengths default to the engine's; tests set them to 0 to see what each application does.
    The images are not checked for scanning: see `ensure_scans`."""
    if getattr(family_module, "FAMILY", None) not in QR_FAMILIES:
        raise JobRejected("params.workflow: the qr_code workflow runs on SD 1.5 and SDXL only")
    width, height = job.width, job.height
    for name in ("code", "modules", "finders", "finder_mask"):
        if getattr(layers, name).size != (width, height):
            raise ValueError(f"QR layer {name} is {getattr(layers, name).size}, the job is {width}x{height}")
    if controlnet.config.addition_embed_type != pipe.unet.config.addition_embed_type:
        raise ValueError("the ControlNet is not of the pipeline's family")

    unet = pipe.unet
    n = len(job.seeds)
    gens = generators(job.seeds)
    guided = job.cfg_scale > 1 and unet.config.time_cond_proj_dim is None
    cond = encode(family_module, pipe, job, prompt, negative, n, guided, (width, height))
    fcond = cond if function_prompt == prompt else \
        encode(family_module, pipe, job, function_prompt, negative, n, guided, (width, height))
    cdtype = controlnet.dtype
    ctrl = {name: control_tensor(getattr(layers, name), unet.device, cdtype)
            for name in ("modules", "finders", "code")}

    f = pipe.vae_scale_factor
    shape = (n, unet.config.in_channels, height // f, width // f)
    noise = randn_tensor(shape, generator=gens, device=unet.device, dtype=torch.float32)
    finder_start, split = split_steps(job.steps)

    modules = denoise(pipe, controlnet, job, 0, split, cond, ctrl["modules"], modules_scale, gens,
                      noise=noise)
    finders = denoise(pipe, controlnet, job, finder_start, split, fcond, ctrl["finders"], finders_scale,
                      gens, noise=noise)
    m = latent_mask(layers.finder_mask, shape[-2:], unet.device)
    latents = finders * m + modules * (1 - m)
    latents = denoise(pipe, controlnet, job, split, job.steps, cond, ctrl["code"], code_scale, gens,
                      latents=latents)
    return decode_latents(pipe, latents)


def ensure_scans(images: list[Image.Image], layers: QrLayers, content: str) -> list[tuple[Image.Image, float]]:
    """Each image as delivered: unchanged when it already decodes to `content`, else the code
    blended in at the lowest strength that does (models/qr.blend_until_scans), with that
    strength (0.0: untouched)."""
    return [blend_until_scans(im, layers.code, content) for im in images]
