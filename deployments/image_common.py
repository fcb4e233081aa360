"""What the three image deployments (sd15, sdxl, cascade) share: the job contract, seeds ->
generators, horde clip_skip -> diffusers, WebP encoding, and the replica-side runner that keeps
one pipeline call at a time per replica. The family modules hold everything model-specific.

A job (the dict sent to `<Family>Deployment.generate`):
    model (str)            catalog name; also the request's multiplexed model id
    prompt (str)           positive prompt
    negative_prompt (str)  may be ""
    width, height (int)    pixels, multiples of 8
    steps (int)            sampling steps (Stable Cascade splits them between its two stages)
    cfg_scale (float)      classifier-free guidance scale
    sampler_name (str)     AI Horde name (models/samplers.py); ignored by Stable Cascade
    karras (bool)          Karras sigmas where the sampler supports them
    clip_skip (int)        horde semantics: 1 = use the last CLIP layer, k = skip k-1 layers
    seeds (list[int])      one image per seed, all made in one pipeline call
    tiling (bool)          accepted, not implemented (seamless tiling needs circular conv padding)
The reply: {"images": [webp bytes, one per seed, in order], "seeds": [...], "node_id": Ray node id,
"replica": Serve's full replica id, "seconds": the pipeline call + encoding (not model loading or
waiting for the replica's previous job)}.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from models.catalog import Family, ModelEntry

WEBP_QUALITY = 95


@dataclass(frozen=True)
class Job:
    model: str
    prompt: str
    seeds: tuple[int, ...]
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    cfg_scale: float = 7.0
    sampler_name: str = "k_euler"
    karras: bool = True
    clip_skip: int = 1
    tiling: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Job":
        """Parse and check a job dict; unknown keys are ignored, missing optional ones take
        the defaults above, types are coerced (JSON may send 7 for 7.0)."""
        missing = [k for k in ("model", "prompt", "seeds") if k not in d]
        if missing:
            raise ValueError(f"job is missing {missing}")
        defaults = cls("", "", ())
        get = lambda key: d[key] if d.get(key) is not None else getattr(defaults, key)  # noqa: E731
        job = cls(
            model=str(d["model"]), prompt=str(d["prompt"]), seeds=tuple(int(s) for s in d["seeds"]),
            negative_prompt=str(get("negative_prompt")), width=int(get("width")), height=int(get("height")),
            steps=int(get("steps")), cfg_scale=float(get("cfg_scale")), sampler_name=str(get("sampler_name")),
            karras=bool(get("karras")), clip_skip=int(get("clip_skip")), tiling=bool(get("tiling")),
        )
        if not job.seeds:
            raise ValueError("job needs at least one seed")
        if job.width <= 0 or job.height <= 0 or job.width % 8 or job.height % 8:
            raise ValueError(f"width and height must be positive multiples of 8, got {job.width}x{job.height}")
        if job.steps < 1 or job.clip_skip < 1:
            raise ValueError("steps and clip_skip must be at least 1")
        return job


def generators(seeds: tuple[int, ...] | list[int]) -> list[torch.Generator]:
    """One CPU generator per image. diffusers draws image i's noise from generator i only, so
    image i of a batch is the image a one-seed call with seeds[i] makes; CPU generators give
    the same noise whichever device the model runs on."""
    return [torch.Generator("cpu").manual_seed(int(s) % 2**64) for s in seeds]


def diffusers_clip_skip(horde_clip_skip: int, max_skip: int) -> int | None:
    """Horde clip_skip (A1111/ComfyUI meaning) -> diffusers' `clip_skip` argument.

    Horde 1 means no skip: the last layer, which is diffusers' `clip_skip=None`. Diffusers'
    `clip_skip=1` already skips one layer (it reads hidden_states[-2]), i.e. horde's 2; in
    general horde k == diffusers k-1. (For SDXL diffusers' None is itself the penultimate
    layer, SDXL's native conditioning; horde k then skips k-1 layers more.) Values past the
    text encoder's depth are clamped to `max_skip` rather than failing.
    """
    skip = min(horde_clip_skip - 1, max_skip)
    return skip if skip > 0 else None


def encode_webp(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=WEBP_QUALITY)
    return buf.getvalue()


def family_entries(models: list[dict] | list[ModelEntry], family: Family) -> dict[str, ModelEntry]:
    """The deployment's model table; every entry must be of its family."""
    entries = [m if isinstance(m, ModelEntry) else ModelEntry.model_validate(m) for m in models]
    wrong = [e.name for e in entries if e.family is not family]
    if wrong:
        raise ValueError(f"not {family.value} models: {wrong}")
    return {e.name: e for e in entries}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ReplicaRunner:
    """Runs a generator's blocking `generate` in a thread so the replica's event loop keeps
    answering (health checks, model loads), one pipeline call at a time: a diffusers pipeline
    holds per-call state (its scheduler), and two calls would only split the same cores."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def run(self, work: Callable[[Any, Job], list[Image.Image]], pipe: Any, job: Job) -> dict:
        from ray import get_runtime_context, serve  # here, so the plain generators need no Ray

        async with self._lock:
            start = time.perf_counter()
            images = await asyncio.to_thread(work, pipe, job)
            blobs = await asyncio.to_thread(lambda: [encode_webp(im) for im in images])
            seconds = time.perf_counter() - start
        return {
            "images": blobs,
            "seeds": list(job.seeds),
            "node_id": get_runtime_context().get_node_id(),
            "replica": serve.get_replica_context().replica_id.to_full_id_str(),
            "seconds": seconds,
        }


def check_model_id(job: Job) -> None:
    """The multiplexed model id routes the request; it must name the job's model."""
    from ray import serve

    model_id = serve.get_multiplexed_model_id()
    if model_id and model_id != job.model:
        raise ValueError(f"request routed for model {model_id!r} but the job is for {job.model!r}")


def base_scheduler_config(pipe: Any) -> dict:
    """The scheduler config the model came with, remembered on first use: each job's sampler
    is built from it, never from the previous job's scheduler, so no setting of one sampler
    (e.g. DDIM's set_alpha_to_one) leaks into the next job's."""
    config = getattr(pipe, "_horde_base_scheduler_config", None)
    if config is None:
        config = dict(pipe.scheduler.config)
        pipe._horde_base_scheduler_config = config
    return config
