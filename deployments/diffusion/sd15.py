"""Stable Diffusion 1.x: what is specific to the family. One CLIP text encoder, native side 512,
inpainting checkpoints with a 9-channel UNet. The tasks (txt2img, img2img, inpainting, hires
fix) are deployments/diffusion/tasks.py; the deployment is deployments/diffusion/deployment.py.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from deployments.diffusion.common import diffusers_clip_skip
from deployments.jobs import ImageJob
from models.catalog import Family

FAMILY = Family.stable_diffusion_1


def clip_skip_embeds(pipe: DiffusionPipeline, text: str, skip: int) -> torch.Tensor:
    """Prompt embeddings from `skip` layers before CLIP's last (diffusers' clip_skip meaning),
    through the final LayerNorm as the last layer's output is. Done here rather than by the
    pipeline's `clip_skip` because diffusers 0.42 reaches for `text_encoder.text_model`, gone
    from CLIPTextModel since transformers 5.6, and skips layers for the positive prompt only,
    where ComfyUI (the horde's backend) skips them for both prompts."""
    tok = pipe.tokenizer
    if hasattr(pipe, "maybe_convert_prompt"):  # a multi-vector TI's token becomes its tokens
        text = pipe.maybe_convert_prompt(text, tok)
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids.to(pipe.device), output_hidden_states=True).hidden_states
        clip = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        return clip.final_layer_norm(hidden[-(skip + 1)])


def text_inputs(pipe: DiffusionPipeline, job: ImageJob, prompt: str, negative_prompt: str) -> dict:
    """The pipeline's text arguments for the job's clip_skip: the prompts themselves, or
    embeddings taken further back in the encoder."""
    skip = diffusers_clip_skip(job.clip_skip, max_skip=pipe.text_encoder.config.num_hidden_layers - 1)
    if skip:
        return {"prompt_embeds": clip_skip_embeds(pipe, prompt, skip),
                "negative_prompt_embeds": clip_skip_embeds(pipe, negative_prompt, skip)}
    return {"prompt": prompt, "negative_prompt": negative_prompt}
