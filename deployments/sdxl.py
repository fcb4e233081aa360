"""Stable Diffusion XL: the generator that runs jobs on a StableDiffusionXLPipeline (two text
encoders, both given the same prompt), and its Ray Serve deployment.

    handle.options(multiplexed_model_id=job["model"]).generate.remote(job)

The job contract is in deployments/image_common.py.
"""

from __future__ import annotations

import asyncio

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from ray import serve

from deployments import image_common
from deployments.image_common import Job, ReplicaRunner, check_model_id, diffusers_clip_skip, generators
from models.catalog import Family, ModelEntry
from models.loaders import load_pipeline
from models.samplers import make_scheduler

FAMILY = Family.stable_diffusion_xl


def clip_skip_embeds(pipe: StableDiffusionXLPipeline, job: Job, skip: int) -> dict:
    """Both prompts encoded `skip` layers further back. The pipeline's own `clip_skip` skips
    layers for the positive prompt only; ComfyUI (the horde's backend) does it for both, so
    each prompt goes through `encode_prompt` as a positive one here."""
    out = {}
    with torch.no_grad():
        for key, text in (("", job.prompt), ("negative_", job.negative_prompt)):
            embeds, _, pooled, _ = pipe.encode_prompt(
                text, device=pipe.device, do_classifier_free_guidance=False, clip_skip=skip
            )
            out[f"{key}prompt_embeds"], out[f"{key}pooled_prompt_embeds"] = embeds, pooled
    return out


class SDXLGenerator:
    def __init__(self, entries: list[ModelEntry] | list[dict], device: str | None = None):
        self.entries = image_common.family_entries(entries, FAMILY)
        self.device = device or image_common.device()

    def load(self, model_name: str) -> StableDiffusionXLPipeline:
        if model_name not in self.entries:
            raise ValueError(f"{model_name!r} is not one of this deployment's models: {sorted(self.entries)}")
        return load_pipeline(self.entries[model_name], self.device)

    def generate(self, pipe: StableDiffusionXLPipeline, job: Job | dict) -> list[Image.Image]:
        job = job if isinstance(job, Job) else Job.from_dict(job)
        pipe.scheduler = make_scheduler(job.sampler_name, job.karras, image_common.base_scheduler_config(pipe))
        # SDXL reads hidden_states[-(clip_skip + 2)]: keep at least the first layer's output.
        layers = min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers)
        skip = diffusers_clip_skip(job.clip_skip, max_skip=layers - 2)
        if skip:
            text = clip_skip_embeds(pipe, job, skip)
        else:
            # An explicit "" (not None): with None SDXL zeroes the negative embedding instead of
            # encoding the empty prompt, which is not what ComfyUI/the horde do.
            text = {"prompt": job.prompt, "negative_prompt": job.negative_prompt}
        return pipe(
            **text,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.cfg_scale,
            num_images_per_prompt=len(job.seeds),
            generator=generators(job.seeds),
        ).images


@serve.deployment(name="sdxl", max_ongoing_requests=2)
class SDXLDeployment:
    def __init__(self, models: list[dict]):  # ModelEntry.model_dump() dicts
        self.generator = SDXLGenerator(models)
        self.runner = ReplicaRunner()

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_pipeline(self, model_name: str) -> StableDiffusionXLPipeline:
        return await asyncio.to_thread(self.generator.load, model_name)

    async def generate(self, job: dict) -> dict:
        parsed = Job.from_dict(job)
        check_model_id(parsed)
        pipe = await self.get_pipeline(parsed.model)
        return await self.runner.run(self.generator.generate, pipe, parsed)
