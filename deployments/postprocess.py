"""The post-processing deployment: face fixers, upscalers and strip_background
(models/postprocess/registry.py), one Serve deployment apart from the diffusion replicas,
multiplexed by post-processor name, one image at a time per replica.

    handle.options(multiplexed_model_id=name).process.remote(name, image_bytes, strength)

Its replicas' size (CPU here, a GPU in configs/cluster.yaml) and autoscaling come from the
Serve config, as for every deployment.
"""

from __future__ import annotations

import asyncio
import io

from PIL import Image
from ray import serve

from deployments.diffusion.common import decode_source, encode_webp
from deployments.jobs import JobRejected
from models.postprocess.registry import PostProcess, PostProcessorEntry, load


@serve.deployment(name="postprocess", max_ongoing_requests=4)
class PostProcessDeployment:
    def __init__(self, entries: list[dict]):
        """`entries`: PostProcessorEntry dicts, the post-processors this cluster serves."""
        self.entries = {e.name: e for e in (PostProcessorEntry.model_validate(d) for d in entries)}
        self.device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
        self.lock = asyncio.Lock()

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_processor(self, name: str) -> PostProcess:
        if name not in self.entries:
            raise JobRejected(f"params.post_processing: {name} is not served here")
        return await asyncio.to_thread(load, self.entries[name], self.device)

    async def process(self, name: str, image: bytes, strength: float = 1.0) -> bytes:
        """One post-processor on one image (WebP, PNG or JPEG bytes) -> WebP bytes (RGBA after
        strip_background)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id and model_id != name:
            raise JobRejected(f"request routed for {model_id!r} but asks for {name!r}")
        processor = await self.get_processor(name)
        decoded = decode_source(image, "image")
        async with self.lock:
            return await asyncio.to_thread(lambda: encode_webp(processor(decoded, strength)))


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size
