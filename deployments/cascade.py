"""Stable Cascade: stage C (the prior) turns the prompt into 16-channel image embeddings at
1/42.67 of the image size, stage B (the decoder) turns those into the image. Its generator and
Ray Serve deployment.

    handle.options(multiplexed_model_id=job["model"]).generate.remote(job)

The job contract is in deployments/image_common.py, with these differences:
- `steps` is split: stage C runs round(0.67 * steps) at the job's cfg_scale, stage B
  round(0.33 * steps) at cfg 1.0 (at least one each), as Stability recommends (20 + 10).
- `sampler_name` and `karras` do not apply: both stages run DDPMWuerstchenScheduler, the only
  scheduler their timestep-ratio conditioning is defined for.
- Sides that are not multiples of 128 are generated at the next multiple and resized
  (`pipeline_side`).
- `clip_skip` does not apply: the Stable Cascade pipelines always read the text encoder's last
  hidden state and take no clip_skip argument.
"""

from __future__ import annotations

import asyncio

from diffusers import StableCascadeDecoderPipeline, StableCascadePriorPipeline
from PIL import Image
from ray import serve

from deployments import image_common
from deployments.image_common import Job, ReplicaRunner, check_model_id, generators
from models.catalog import Family, ModelEntry
from models.loaders import load_pipeline

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


class CascadeGenerator:
    def __init__(self, entries: list[ModelEntry] | list[dict], device: str | None = None):
        self.entries = image_common.family_entries(entries, FAMILY)
        self.device = device or image_common.device()

    def load(self, model_name: str) -> CascadePipes:
        if model_name not in self.entries:
            raise ValueError(f"{model_name!r} is not one of this deployment's models: {sorted(self.entries)}")
        return load_pipeline(self.entries[model_name], self.device)

    def generate(self, pipes: CascadePipes, job: Job | dict) -> list[Image.Image]:
        job = job if isinstance(job, Job) else Job.from_dict(job)
        prior, decoder = pipes
        prior_steps, decoder_steps = split_steps(job.steps)
        # The same generators go through both stages: each image's noise, in both stages, comes
        # from its own seed only, so image i equals the one-seed image for seeds[i].
        gens = generators(job.seeds)
        embeddings = prior(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            width=pipeline_side(job.width),
            height=pipeline_side(job.height),
            num_inference_steps=prior_steps,
            guidance_scale=job.cfg_scale,
            num_images_per_prompt=len(job.seeds),
            generator=gens,
        ).image_embeddings
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


@serve.deployment(name="cascade", max_ongoing_requests=2)
class CascadeDeployment:
    def __init__(self, models: list[dict]):  # ModelEntry.model_dump() dicts
        self.generator = CascadeGenerator(models)
        self.runner = ReplicaRunner()

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_pipeline(self, model_name: str) -> CascadePipes:
        return await asyncio.to_thread(self.generator.load, model_name)

    async def generate(self, job: dict) -> dict:
        parsed = Job.from_dict(job)
        check_model_id(parsed)
        pipes = await self.get_pipeline(parsed.model)
        return await self.runner.run(self.generator.generate, pipes, parsed)
