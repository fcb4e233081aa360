"""What the diffusion families share: seeds -> generators, horde clip_skip -> diffusers, source
images and masks, WebP encoding, and the replica-side runner that keeps one pipeline call at a
time per replica. The job contract is `deployments/jobs.py` (ImageJob); the tasks
(`tasks.py`) and the family modules hold the rest.

The reply of a deployment's `generate`: {"images": [webp bytes, one per seed, in order],
"seeds": [...], "node_id": Ray node id, "replica": Serve's full replica id, "seconds": the
pipeline call + encoding (not model loading or waiting for the replica's previous job)}.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from deployments.jobs import ImageJob, JobRejected
from models.catalog import Family, ModelEntry

WEBP_QUALITY = 95


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
        self.lock = asyncio.Lock()

    async def run(self, work: Callable[[Any, ImageJob], list[Image.Image]], pipe: Any, job: ImageJob) -> dict:
        from ray import get_runtime_context, serve  # here, so the plain generators need no Ray

        async with self.lock:
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


def check_model_id(job: Any) -> None:
    """The multiplexed model id routes the request; it must name the job's model."""
    from ray import serve

    model_id = serve.get_multiplexed_model_id()
    if model_id and model_id != job.model:
        raise JobRejected(f"request routed for model {model_id!r} but the job is for {job.model!r}")


def base_scheduler_config(pipe: Any) -> dict:
    """The scheduler config the model came with, remembered on first use: each job's sampler
    is built from it, never from the previous job's scheduler, so no setting of one sampler
    (e.g. DDIM's set_alpha_to_one) leaks into the next job's."""
    config = getattr(pipe, "_horde_base_scheduler_config", None)
    if config is None:
        config = dict(pipe.scheduler.config)
        pipe._horde_base_scheduler_config = config
    return config


# Pixels a source image may have once decoded here: the API checked what it stored, but a
# worker's download comes from whoever answered the URL.
MAX_SOURCE_PIXELS = 3072 * 3072


def decode_source(data: bytes, field: str) -> Image.Image:
    """A job's source image or mask bytes as a loaded PIL image; JobRejected naming the field
    when they are not a WebP, PNG or JPEG image within MAX_SOURCE_PIXELS."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "WEBP", "JPEG"):
            raise JobRejected(f"{field}: {image.format} images are not accepted")
        if image.width * image.height > MAX_SOURCE_PIXELS:
            raise JobRejected(f"{field}: {image.width}x{image.height} is over {MAX_SOURCE_PIXELS} pixels")
        image.load()
    except JobRejected:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data
        raise JobRejected(f"{field}: not a readable image ({type(e).__name__})") from None
    return image


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The AI Horde resizes sources to the size being generated (LANCZOS)."""
    return image if image.size == (width, height) else \
        image.resize((width, height), Image.Resampling.LANCZOS)


def source_and_mask(job: ImageJob, width: int, height: int) -> tuple[Image.Image, Image.Image | None]:
    """The job's source as RGB at the generated size, and its mask (L, white = repaint): the
    job's `source_mask`, else the source's transparency (mask = 255 - alpha), else None."""
    source = decode_source(job.source_image, "source_image")
    mask = None
    if job.source_mask is not None:
        mask = fit(decode_source(job.source_mask, "source_mask").convert("L"), width, height)
    elif source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info:
        alpha = source.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            mask = fit(alpha.point(lambda a: 255 - a), width, height)
    return fit(source.convert("RGB"), width, height), mask
