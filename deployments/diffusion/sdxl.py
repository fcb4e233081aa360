"""Stable Diffusion XL: what is specific to the family. Two text encoders, both given the same
prompt; native side 1024 with aspect buckets (models/workflows.py). The tasks are
deployments/diffusion/tasks.py; the deployment is deployments/diffusion/deployment.py.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from deployments.diffusion.common import diffusers_clip_skip
from deployments.jobs import ImageJob
from models.catalog import Family

FAMILY = Family.stable_diffusion_xl


def clip_skip_embeds(pipe: DiffusionPipeline, prompt: str, negative_prompt: str, skip: int) -> dict:
    """Both prompts encoded `skip` layers further back. The pipeline's own `clip_skip` skips
    layers for the positive prompt only; ComfyUI (the horde's backend) does it for both, so
    each prompt goes through `encode_prompt` as a positive one here."""
    out = {}
    with torch.no_grad():
        for key, text in (("", prompt), ("negative_", negative_prompt)):
            embeds, _, pooled, _ = pipe.encode_prompt(
                text, device=pipe.device, do_classifier_free_guidance=False, clip_skip=skip
            )
            out[f"{key}prompt_embeds"], out[f"{key}pooled_prompt_embeds"] = embeds, pooled
    return out


def text_inputs(pipe: DiffusionPipeline, job: ImageJob, prompt: str, negative_prompt: str) -> dict:
    # SDXL reads hidden_states[-(clip_skip + 2)]: keep at least the first layer's output.
    layers = min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers)
    skip = diffusers_clip_skip(job.clip_skip, max_skip=layers - 2)
    if skip:
        return clip_skip_embeds(pipe, prompt, negative_prompt, skip)
    # An explicit "" (not None): with None SDXL zeroes the negative embedding instead of
    # encoding the empty prompt, which is not what ComfyUI/the horde do.
    return {"prompt": prompt, "negative_prompt": negative_prompt}
