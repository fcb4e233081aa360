"""Stable Cascade: stage C (the prior) turns the prompt into 16-channel image embeddings at
1/42.67 of the image size, stage B (the decoder) turns those into the image. What is specific
to the family, including its own txt2img and hires fix (deployments/diffusion/tasks.py holds
the UNet families' tasks; the deployment is deployments/diffusion/deployment.py).

Differences from the ImageJob contract (deployments/jobs.py):
- `steps` is split: stage C runs round(0.67 * steps) at the job's cfg_scale, stage B
  round(0.33 * steps) at cfg 1.0 (at least one each), as Stability recommends (20 + 10).
- `sampler_name` and `karras` do not apply: both stages run DDPMWuerstchenScheduler, the only
  scheduler their timestep-ratio conditioning is defined for.
- Sides that are not multiples of 128 are generated at the next multiple and resized
  (`pipeline_side`).
- `clip_skip` does not apply: the Stable Cascade pipelines always read the text encoder's last
  hidden state and take no clip_skip argument.
- Hires fix (2 passes): stage C at the first-pass size (longer side capped at 1024), its
  embeddings upscaled to the full size, noised to `hires_fix_denoising_strength` and denoised
  again by stage C, then stage B at full size. The AI Horde decodes the first pass, upscales the
  pixels and re-encodes them for stage C; that encoder (EfficientNet) is not part of diffusers'
  Stable Cascade pipelines, so the upscale happens on stage C's embeddings instead.
- Source images (img2img, inpainting) are refused by the API: diffusers' Stable Cascade
  pipelines take images only as CLIP image prompts (the remix workflow).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline
from PIL import Image

from deployments.diffusion.common import generators
from deployments.jobs import ImageJob, JobRejected
from models.catalog import Family
from models.workflows import Workflow, first_pass_size

FAMILY = Family.stable_cascade

CascadePipes = tuple[StableCascadePriorPipeline, StableCascadeDecoderPipeline]


def pipeline_side(side: int) -> int:
    """The size the pipelines are run at for a requested side. Stage C's latents are
    ceil(side / 42.67) cells and stage B's int(cells * 10.67), which stage B (patch size 4) can
    only take when divisible by 4; that holds when the side is a multiple of 128 (3 cells -> 32).
    Other sides are generated at the next multiple of 128 and the image resized."""
    return max(128, -(-side // 128) * 128)


def split_steps(steps: int) -> tuple[int, int]:
    """(stage C steps, stage B steps) for a job's total."""
    return max(1, round(0.67 * steps)), max(1, round(0.33 * steps))


class PartialWuerstchenScheduler(DDPMWuerstchenScheduler):
    """Stage C's scheduler for a second pass that starts part-way: its schedule runs from
    `start` (the denoise) down to 0 instead of from 1. The prior pipeline always asks for
    `num_inference_steps` timesteps, so the start has to live in the scheduler."""

    def __init__(self, start: float = 1.0, **config):
        super().__init__(**config)
        self.start = start

    def set_timesteps(self, num_inference_steps=None, timesteps=None, device=None) -> None:
        if timesteps is None:
            timesteps = torch.linspace(self.start, 0.0, num_inference_steps + 1, device=device)
        super().set_timesteps(timesteps=timesteps, device=device)


def encode_image(pipes: CascadePipes, image: Image.Image) -> torch.Tensor:
    """One remix image as stage C's image conditioning: the prior's CLIP vision encoder's
    projected embedding of the image (center-cropped by its processor), [1, 1, D]."""
    prior = pipes[0]
    if prior.image_encoder is None or prior.feature_extractor is None:
        raise JobRejected("source_processing: this Stable Cascade model has no image encoder for remix")
    pixels = prior.feature_extractor(image.convert("RGB"), return_tensors="pt").pixel_values
    p = next(prior.image_encoder.parameters())
    with torch.inference_mode():
        return prior.image_encoder(pixels.to(p.device, p.dtype)).image_embeds.unsqueeze(1).float().cpu()


def generate(pipes: CascadePipes, job: ImageJob, image_embeds: torch.Tensor | None = None) -> list[Image.Image]:
    """The job's images: txt2img, the 2-pass hires fix, or remix (with `image_embeds`: each
    image's embedding already scaled by its strength, concatenated along the token axis)."""
    allowed = (Workflow.txt2img, Workflow.hires_fix, Workflow.remix)
    if job.workflow not in allowed or (job.source_image is not None and job.workflow is not Workflow.remix):
        raise JobRejected(f"source_processing: the {job.workflow.value} workflow does not run on "
                          "Stable Cascade (it takes source images only for remix)")
    if (job.workflow is Workflow.remix) != (image_embeds is not None):
        raise JobRejected("source_processing: remix needs its image embeddings, and only remix takes them")
    prior, decoder = pipes
    prior_steps, decoder_steps = split_steps(job.steps)
    # The same generators go through both stages: each image's noise, in both stages, comes
    # from its own seed only, so image i equals the one-seed image for seeds[i].
    gens = generators(job.seeds)
    text = {"prompt": job.prompt, "negative_prompt": job.negative_prompt,
            "guidance_scale": job.cfg_scale, "num_images_per_prompt": len(job.seeds), "generator": gens}
    if image_embeds is not None:
        p = next(prior.prior.parameters())
        text["image_embeds"] = image_embeds.to(p.device, p.dtype)
    width, height = pipeline_side(job.width), pipeline_side(job.height)
    if job.workflow is Workflow.hires_fix:
        w1, h1 = first_pass_size(FAMILY, job.width, job.height)
        first = prior(**text, width=w1, height=h1, num_inference_steps=prior_steps).image_embeddings
        embeddings = _second_stage_c(prior, text, first, width, height, prior_steps,
                                     job.hires_fix_denoising_strength, gens)
    else:
        embeddings = prior(**text, width=width, height=height,
                           num_inference_steps=prior_steps).image_embeddings
    images = decoder(
        image_embeddings=embeddings,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,  # unused at cfg 1.0, kept for clarity
        num_inference_steps=decoder_steps,
        guidance_scale=1.0,
        generator=gens,
        output_type="pil",
    ).images
    size = (job.width, job.height)
    return [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]


def _second_stage_c(prior: StableCascadePriorPipeline, text: dict, first: torch.Tensor, width: int,
                    height: int, steps: int, denoise: float, gens: list) -> torch.Tensor:
    """Stage C again at full size, from the first pass's embeddings upscaled and noised to
    `denoise`, over `steps` steps from there down to 0."""
    cells = (math.ceil(height / prior.config.resolution_multiple),
             math.ceil(width / prior.config.resolution_multiple))
    upscaled = F.interpolate(first.float(), size=cells, mode="bicubic", align_corners=False)
    noise = torch.stack([torch.randn(upscaled.shape[1:], generator=g) for g in gens]).to(upscaled)
    scheduler = PartialWuerstchenScheduler(start=denoise, **prior.scheduler.config)
    t = torch.full((upscaled.shape[0],), denoise)
    noised = scheduler.add_noise(upscaled, noise, t).to(first.dtype)
    original = prior.scheduler
    prior.scheduler = scheduler
    try:
        return prior(**text, width=width, height=height, num_inference_steps=steps,
                     latents=noised).image_embeddings
    finally:
        prior.scheduler = original
