"""The image tasks, written once for the UNet families (SD 1.5, SDXL): txt2img, img2img,
inpainting (outpainting is inpainting of a padded source) and the hires fix. Each task's
pipeline is built from the loaded one with diffusers' `AutoPipelineFor*.from_pipe`, which shares
its components (no second copy of the weights), and is kept on it for the next job.

A family module (sd15.py, sdxl.py) supplies only `text_inputs(pipe, job, prompt, negative)`.

Denoise follows ComfyUI (the AI Horde's backend): a job of S steps at denoise d runs S steps
over a schedule of S/d (diffusers' `strength` would instead run S*d of a schedule of S), so a
low denoising_strength does not also mean fewer, coarser steps.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from PIL import Image

from deployments.diffusion.common import base_scheduler_config, fit, generators, source_and_mask
from deployments.jobs import ImageJob, JobRejected
from models.samplers import make_scheduler
from models.workflows import Workflow, first_pass_size, hires_second_pass_steps

_TASK_PIPELINES = {"img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}
MAX_SCHEDULE = 1000  # the models' training timesteps: a longer schedule only repeats steps


def task_pipeline(pipe: DiffusionPipeline, task: str) -> DiffusionPipeline:
    """The loaded pipeline itself for txt2img; for img2img / inpaint the matching pipeline on
    the same components, made once per loaded model."""
    if task == "txt2img":
        return pipe
    cache = pipe.__dict__.setdefault("_horde_task_pipelines", {})
    if task not in cache:
        derived = _TASK_PIPELINES[task].from_pipe(pipe)
        derived.set_progress_bar_config(disable=True)
        cache[task] = derived
    return cache[task]


def schedule_for(run_steps: int, denoise: float) -> int:
    """The schedule length N for which diffusers' `strength=denoise` runs `run_steps` steps
    (int(N * denoise) == run_steps where the cap allows)."""
    n = min(MAX_SCHEDULE, max(run_steps, round(run_steps / denoise)))
    while n < MAX_SCHEDULE and int(n * denoise) < run_steps:
        n += 1
    while n > run_steps and int((n - 1) * denoise) >= run_steps:
        n -= 1
    return n


def _common(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
            negative: str) -> dict[str, Any]:
    pipe.scheduler = make_scheduler(job.sampler_name, job.karras, base_scheduler_config(pipe))
    return {**family.text_inputs(pipe, job, prompt, negative), "guidance_scale": job.cfg_scale,
            "num_images_per_prompt": len(job.seeds), "generator": generators(job.seeds)}


def txt2img(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
            negative: str, size: tuple[int, int] | None = None, output_type: str = "pil") -> Any:
    width, height = size or (job.width, job.height)
    return pipe(**_common(family, pipe, job, prompt, negative), width=width, height=height,
                num_inference_steps=job.steps, output_type=output_type).images


def img2img(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
            negative: str, image: Image.Image | torch.Tensor, run_steps: int, denoise: float,
            size: tuple[int, int] | None = None, output_type: str = "pil") -> Any:
    """From a source image (or latents, for the hires fix's second pass)."""
    width, height = size or (job.width, job.height)
    task = task_pipeline(pipe, "img2img")
    images = [image] * len(job.seeds) if isinstance(image, Image.Image) else image
    return task(**_common(family, task, job, prompt, negative), image=images, strength=denoise,
                num_inference_steps=schedule_for(run_steps, denoise), height=height, width=width,
                output_type=output_type).images


def inpaint(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
            negative: str) -> list[Image.Image]:
    """Repaint the mask's white (or the source's transparent) part. A 9-channel inpainting UNet
    sees the masked source; a plain one is blended with the source outside the mask."""
    source, mask = source_and_mask(job, job.width, job.height)
    if mask is None:
        raise JobRejected("source_mask: inpainting needs a mask or a source with transparency")
    task = task_pipeline(pipe, "inpaint")
    n = len(job.seeds)
    return task(**_common(family, task, job, prompt, negative), image=[source] * n,
                mask_image=[mask] * n, strength=job.denoising_strength,
                num_inference_steps=schedule_for(job.steps, job.denoising_strength),
                height=job.height, width=job.width).images


def hires_fix(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
              negative: str) -> list[Image.Image]:
    """First pass at the family's native size (from the source when there is one), latent
    upscale (nearest-exact) to the requested size, second pass at hires_fix_denoising_strength
    with the horde's step count, same prompt, cfg, sampler and seeds."""
    fam = family.FAMILY
    size1 = first_pass_size(fam, job.width, job.height)
    if job.source_image is not None:
        source, _ = source_and_mask(job, *size1)
        latents = img2img(family, pipe, job, prompt, negative, source, job.steps,
                          job.denoising_strength, size=size1, output_type="latent")
    else:
        latents = txt2img(family, pipe, job, prompt, negative, size=size1, output_type="latent")
    latents = F.interpolate(latents, size=(job.height // 8, job.width // 8), mode="nearest-exact")
    d = job.hires_fix_denoising_strength
    steps = hires_second_pass_steps(job.steps, d, job.width, job.height, fam.native_side)
    return img2img(family, pipe, job, prompt, negative, latents, steps, d)


def controlnet(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
               negative: str, name: str, model: Any, control: Image.Image) -> list[Image.Image]:
    """txt2img guided by a ControlNet (`model`, catalog name `name`) through the control map
    `control` at `control_strength`; the ControlNet pipeline shares the loaded components."""
    cache = pipe.__dict__.setdefault("_horde_controlnet_pipelines", {})
    if name not in cache:
        task = AutoPipelineForText2Image.from_pipe(pipe, controlnet=model)
        task.set_progress_bar_config(disable=True)
        cache[name] = task
    task = cache[name]
    return task(**_common(family, task, job, prompt, negative), image=fit(control.convert("RGB"), job.width, job.height),
                controlnet_conditioning_scale=job.control_strength, width=job.width,
                height=job.height, num_inference_steps=job.steps).images


def transparent(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
                negative: str, files: Any) -> list[Image.Image]:
    """Layer Diffuse: txt2img under the UNet injection, then the transparent VAE decoder;
    RGBA images (models/layer_diffuse.py)."""
    from models.layer_diffuse import generate_transparent

    try:
        return generate_transparent(pipe, family.FAMILY.value, files,
                                    **_common(family, pipe, job, prompt, negative),
                                    width=job.width, height=job.height,
                                    num_inference_steps=job.steps)
    except ValueError as e:  # a size the decoder cannot take
        raise JobRejected(f"params.width, params.height: {e}") from None


def run(family: ModuleType, pipe: DiffusionPipeline, job: ImageJob, prompt: str,
        negative: str, layer_diffuse: Any = None) -> list[Image.Image]:
    """The job's workflow on a UNet family's loaded pipeline: one image per seed. `prompt` and
    `negative` are the job's with LoRA trigger words and TI tokens put in; `layer_diffuse`
    the model's Layer Diffuse files, for the transparent workflow."""
    w = job.workflow
    if w is Workflow.transparent:
        return transparent(family, pipe, job, prompt, negative, layer_diffuse)
    if w is Workflow.txt2img:
        return txt2img(family, pipe, job, prompt, negative)
    if w is Workflow.img2img:
        source, _ = source_and_mask(job, job.width, job.height)
        return img2img(family, pipe, job, prompt, negative, source, job.steps,
                       job.denoising_strength)
    if w.painting:
        return inpaint(family, pipe, job, prompt, negative)
    if w is Workflow.hires_fix:
        return hires_fix(family, pipe, job, prompt, negative)
    raise JobRejected(f"params: the {w.value} workflow does not run on {family.FAMILY.value} here")
