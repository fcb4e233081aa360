"""Stable Diffusion 1.x: the generator that runs jobs on a StableDiffusionPipeline, and its
Ray Serve deployment (one replica holds up to 3 models, picked by multiplexed model id).

    handle.options(multiplexed_model_id=job["model"]).generate.remote(job)

The job contract is in deployments/image_common.py.
"""

from __future__ import annotations

import asyncio

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from ray import serve

from deployments import image_common
from deployments.image_common import Job, ReplicaRunner, check_model_id, diffusers_clip_skip, generators
from models.catalog import Family, ModelEntry
from models.loaders import load_pipeline
from models.samplers import make_scheduler

FAMILY = Family.stable_diffusion_1


def clip_skip_embeds(pipe: StableDiffusionPipeline, text: str, skip: int) -> torch.Tensor:
    """Prompt embeddings from `skip` layers before CLIP's last (diffusers' clip_skip meaning),
    through the final LayerNorm as the last layer's output is. Done here rather than by the
    pipeline's `clip_skip` because diffusers 0.42 reaches for `text_encoder.text_model`, gone
    from CLIPTextModel since transformers 5.6, and skips layers for the positive prompt only,
    where ComfyUI (the horde's backend) skips them for both prompts."""
    tok = pipe.tokenizer
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids.to(pipe.device), output_hidden_states=True).hidden_states
        clip = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        return clip.final_layer_norm(hidden[-(skip + 1)])


class SD15Generator:
    def __init__(self, entries: list[ModelEntry] | list[dict], device: str | None = None):
        self.entries = image_common.family_entries(entries, FAMILY)
        self.device = device or image_common.device()

    def load(self, model_name: str) -> StableDiffusionPipeline:
        if model_name not in self.entries:
            raise ValueError(f"{model_name!r} is not one of this deployment's models: {sorted(self.entries)}")
        return load_pipeline(self.entries[model_name], self.device)

    def generate(self, pipe: StableDiffusionPipeline, job: Job | dict) -> list[Image.Image]:
        job = job if isinstance(job, Job) else Job.from_dict(job)
        pipe.scheduler = make_scheduler(job.sampler_name, job.karras, image_common.base_scheduler_config(pipe))
        skip = diffusers_clip_skip(job.clip_skip, max_skip=pipe.text_encoder.config.num_hidden_layers - 1)
        if skip:
            text = {"prompt_embeds": clip_skip_embeds(pipe, job.prompt, skip),
                    "negative_prompt_embeds": clip_skip_embeds(pipe, job.negative_prompt, skip)}
        else:
            text = {"prompt": job.prompt, "negative_prompt": job.negative_prompt}
        return pipe(
            **text,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.cfg_scale,
            num_images_per_prompt=len(job.seeds),  # one batch; image i comes from generator i
            generator=generators(job.seeds),
        ).images


@serve.deployment(name="sd15", max_ongoing_requests=2)
class SD15Deployment:
    def __init__(self, models: list[dict]):  # ModelEntry.model_dump() dicts
        self.generator = SD15Generator(models)
        self.runner = ReplicaRunner()

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_pipeline(self, model_name: str) -> StableDiffusionPipeline:
        # Loading takes seconds to minutes: off the event loop, so the replica keeps answering.
        return await asyncio.to_thread(self.generator.load, model_name)

    async def generate(self, job: dict) -> dict:
        parsed = Job.from_dict(job)
        check_model_id(parsed)
        pipe = await self.get_pipeline(parsed.model)
        return await self.runner.run(self.generator.generate, pipe, parsed)
